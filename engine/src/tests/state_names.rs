//! The state names: one spelling per state, the same from `as_str`, `Display`, `FromStr` and
//! serde (what the store and the history write).

use super::harness::*;

#[test]
fn rollout_state_names_agree_everywhere() {
    for state in RolloutState::ALL {
        let name = state.as_str();
        assert_eq!(state.to_string(), name);
        assert_eq!(name.parse::<RolloutState>(), Ok(state));
        assert_eq!(
            serde_json::to_value(state).unwrap(),
            serde_json::Value::from(name)
        );
    }
}

#[test]
fn node_state_names_agree_everywhere() {
    for state in NodeState::ALL {
        let name = state.as_str();
        assert_eq!(state.to_string(), name);
        assert_eq!(name.parse::<NodeState>(), Ok(state));
        assert_eq!(
            serde_json::to_value(state).unwrap(),
            serde_json::Value::from(name)
        );
    }
}

#[test]
fn unknown_state_names_are_refused() {
    let err = "permanent".parse::<NodeState>().unwrap_err();
    assert_eq!(err.to_string(), "`permanent` is not a node state");
    assert!("Succeeded".parse::<RolloutState>().is_err());
    assert!("".parse::<RolloutState>().is_err());
}
