//! How a rollout's targets form its commit waves: the one place that decides it. The engine,
//! `hotroll check`'s plan (with a count, a nodes file or the live fleet) and everything that
//! shows waves call [`plan_waves`], so what the plan prints is what the rollout does.
//!
//! The rules (docs/design.md §4, "Waves"):
//! * the canary wave comes first: the first `canary` targets in wave order;
//! * without `waves_by`, the other targets follow in waves of `max_in_flight` (0 = all at once);
//! * with `waves_by = "LABEL"`, the targets are grouped by the value of that label, the groups
//!   taken one at a time — the values named in `order` first, in that order, then the other
//!   values sorted, then the targets without the label — and each group is split in waves of
//!   `max_in_flight` *of the group*; a wave never holds two groups;
//! * a percentage (`"10%"`) is taken of all the targets for `canary` and of the group (of all
//!   the targets without `waves_by`) for `max_in_flight`, rounded up, at least one node.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::model::RolloutPolicy;

/// A target as waves see it: its name and labels.
#[derive(Debug, Clone, Copy)]
pub struct WaveTarget<'a> {
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// Labels of a target nobody told us about.
pub static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// One commit wave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Wave {
    /// Target names, in the order given.
    pub nodes: Vec<String>,
    pub canary: bool,
    /// The value of the `waves_by` label its nodes share; `None` for the canary, without
    /// `waves_by`, and for the targets that lack the label (see [`Wave::unlabelled`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// With `waves_by`: the nodes lack the label.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unlabelled: bool,
}

impl Wave {
    /// `zone=a`, `zone unset`, or `None` when the wave is not a group's.
    pub fn group_label(&self, policy: &RolloutPolicy) -> Option<String> {
        let key = policy.waves_by.as_ref()?;
        match (&self.group, self.unlabelled) {
            (Some(value), _) => Some(format!("{key}={value}")),
            (None, true) => Some(format!("{key} unset")),
            (None, false) => None,
        }
    }
}

/// The commit waves of `targets` under `policy` (see the module's rules). A target named twice
/// takes part once, at its first position.
pub fn plan_waves(targets: &[WaveTarget<'_>], policy: &RolloutPolicy) -> Vec<Wave> {
    let mut seen = std::collections::BTreeSet::new();
    let targets: Vec<WaveTarget<'_>> = targets
        .iter()
        .filter(|t| seen.insert(t.name))
        .copied()
        .collect();
    // Groups in the order they are taken: (value, members). Without `waves_by`, one group.
    let groups: Vec<(Option<&str>, Vec<&str>)> = match &policy.waves_by {
        None => vec![(None, targets.iter().map(|t| t.name).collect())],
        Some(key) => {
            let mut by_value: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            let mut unlabelled = Vec::new();
            for t in &targets {
                match t.labels.get(key) {
                    Some(value) => by_value.entry(value.as_str()).or_default().push(t.name),
                    None => unlabelled.push(t.name),
                }
            }
            let mut groups = Vec::new();
            for value in &policy.order {
                if let Some(members) = by_value.remove(value.as_str()) {
                    groups.push((Some(value.as_str()), members));
                }
            }
            groups.extend(by_value.into_iter().map(|(v, m)| (Some(v), m)));
            if !unlabelled.is_empty() {
                groups.push((None, unlabelled));
            }
            groups
        }
    };
    let mut waves = Vec::new();
    let canary = policy.canary.of(targets.len());
    let mut canary_left = canary;
    if canary > 0 {
        waves.push(Wave {
            nodes: Vec::with_capacity(canary),
            canary: true,
            group: None,
            unlabelled: false,
        });
    }
    for (value, members) in groups {
        let per_wave = match policy.max_in_flight.of(members.len()) {
            0 => members.len(),
            n => n,
        };
        let mut rest = Vec::with_capacity(members.len());
        for name in &members {
            if canary_left > 0 {
                if let Some(first) = waves.first_mut() {
                    first.nodes.push(name.to_string());
                }
                canary_left -= 1;
            } else {
                rest.push(name.to_string());
            }
        }
        for chunk in rest.chunks(per_wave.max(1)) {
            waves.push(Wave {
                nodes: chunk.to_vec(),
                canary: false,
                group: value.map(str::to_string),
                unlabelled: policy.waves_by.is_some() && value.is_none(),
            });
        }
    }
    waves
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::count::NodeCount;

    fn policy(canary: NodeCount, max_in_flight: NodeCount) -> RolloutPolicy {
        RolloutPolicy {
            canary,
            max_in_flight,
            ..RolloutPolicy::default()
        }
    }

    fn sizes(n: usize, policy: &RolloutPolicy) -> Vec<usize> {
        let names: Vec<String> = (1..=n).map(|i| format!("node-{i}")).collect();
        let targets: Vec<WaveTarget<'_>> = names
            .iter()
            .map(|name| WaveTarget {
                name,
                labels: &NO_LABELS,
            })
            .collect();
        plan_waves(&targets, policy)
            .iter()
            .map(|w| w.nodes.len())
            .collect()
    }

    use NodeCount::{Nodes, None as Zero, Percent};

    #[test]
    fn waves_follow_canary_then_max_in_flight() {
        assert_eq!(sizes(3, &policy(Nodes(1), Nodes(1))), vec![1, 1, 1]);
        assert_eq!(sizes(5, &policy(Nodes(1), Nodes(2))), vec![1, 2, 2]);
        assert_eq!(sizes(5, &policy(Zero, Zero)), vec![5]);
        assert_eq!(sizes(5, &policy(Nodes(2), Zero)), vec![2, 3]);
        assert_eq!(sizes(1, &policy(Nodes(3), Nodes(2))), vec![1]);
        assert_eq!(sizes(0, &policy(Nodes(1), Nodes(1))), Vec::<usize>::new());
    }

    #[test]
    fn percentages_round_up_to_at_least_one_node() {
        assert_eq!(Percent(10).of(3), 1);
        assert_eq!(Percent(10).of(11), 2);
        assert_eq!(Percent(50).of(5), 3);
        assert_eq!(Percent(100).of(7), 7);
        assert_eq!(Percent(1).of(0), 0);
        assert_eq!(
            sizes(10, &policy(Percent(10), Percent(30))),
            vec![1, 3, 3, 3]
        );
    }

    fn zoned(zones: &[(&str, Option<&str>)]) -> Vec<(String, BTreeMap<String, String>)> {
        zones
            .iter()
            .map(|(name, zone)| {
                let labels = zone
                    .map(|z| BTreeMap::from([("zone".to_string(), z.to_string())]))
                    .unwrap_or_default();
                (name.to_string(), labels)
            })
            .collect()
    }

    fn waves_of(fleet: &[(String, BTreeMap<String, String>)], policy: &RolloutPolicy) -> Vec<Wave> {
        let targets: Vec<WaveTarget<'_>> = fleet
            .iter()
            .map(|(name, labels)| WaveTarget { name, labels })
            .collect();
        plan_waves(&targets, policy)
    }

    #[test]
    fn waves_by_a_label_take_one_group_at_a_time_in_the_stated_order() {
        let fleet = zoned(&[
            ("n1", Some("a")),
            ("n2", Some("b")),
            ("n3", Some("c")),
            ("n4", Some("a")),
            ("n5", Some("b")),
            ("n6", Some("c")),
            ("n7", None),
        ]);
        let mut p = policy(Nodes(1), Percent(50));
        p.waves_by = Some("zone".into());
        p.order = vec!["c".into(), "a".into()];
        let waves = waves_of(&fleet, &p);
        let shown: Vec<(Vec<&str>, Option<&str>, bool)> = waves
            .iter()
            .map(|w| {
                (
                    w.nodes.iter().map(String::as_str).collect(),
                    w.group.as_deref(),
                    w.canary,
                )
            })
            .collect();
        assert_eq!(
            shown,
            vec![
                (vec!["n3"], None, true),
                (vec!["n6"], Some("c"), false),
                (vec!["n1"], Some("a"), false),
                (vec!["n4"], Some("a"), false),
                (vec!["n2"], Some("b"), false),
                (vec!["n5"], Some("b"), false),
                (vec!["n7"], None, false),
            ]
        );
        assert!(waves[6].unlabelled);
        assert_eq!(waves[6].group_label(&p).as_deref(), Some("zone unset"));
        assert_eq!(waves[1].group_label(&p).as_deref(), Some("zone=c"));
    }

    #[test]
    fn a_whole_group_is_one_wave_without_max_in_flight() {
        let fleet = zoned(&[("n1", Some("b")), ("n2", Some("a")), ("n3", Some("b"))]);
        let mut p = policy(Zero, Zero);
        p.waves_by = Some("zone".into());
        let waves = waves_of(&fleet, &p);
        let nodes: Vec<Vec<String>> = waves.into_iter().map(|w| w.nodes).collect();
        assert_eq!(
            nodes,
            vec![vec!["n2".to_string()], vec!["n1".into(), "n3".into()]]
        );
    }
}
