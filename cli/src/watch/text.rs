//! Rollout events as text: one plain line per event (pipes, logs, `hotroll demo`), one JSON
//! object per event (`--output json`), and the time and duration formats the views share.

use hotroll_proto::v1 as pb;

use crate::states::{node_state_name, rollout_state_name};

/// `started`, `ok` or `FAILED` for a step event.
pub fn step_phase_name(phase: i32) -> &'static str {
    match pb::StepPhase::try_from(phase) {
        Ok(pb::StepPhase::Started) => "started",
        Ok(pb::StepPhase::Succeeded) => "ok",
        Ok(pb::StepPhase::Failed) => "FAILED",
        _ => "?",
    }
}

/// One line for a rollout event, without its timestamp: who (`rollout` or the node), then what.
pub fn describe(event: &pb::RolloutEvent) -> String {
    let who = if event.node.is_empty() {
        "rollout"
    } else {
        event.node.as_str()
    };
    let what = match event.kind.as_str() {
        "rollout_state" => format!("state {}", rollout_state_name(event.rollout_state)),
        "node_state" => format!("node {}", node_state_name(event.node_state)),
        "step" => {
            let mut what = format!(
                "step {} {} {}",
                event.step + 1,
                event.instruction,
                step_phase_name(event.step_phase)
            );
            if event.step_phase != pb::StepPhase::Started as i32 && event.duration_ms > 0 {
                what.push_str(&format!(" ({})", format_duration_ms(event.duration_ms)));
            }
            what
        }
        "barrier_arrived" => format!(
            "arrived at barrier `{}` ({})",
            event.barrier_id, event.message
        ),
        "barrier_released" => format!("barrier `{}` released", event.barrier_id),
        "barrier_failed" => format!("barrier `{}` FAILED", event.barrier_id),
        "wave_started" => format!(
            "wave {} crosses the point of no return: {}",
            event.wave, event.message
        ),
        "operator" => format!("operator: {}", event.message),
        "gate" => gate_line(event),
        "dry_run_verdict" if event.error.is_empty() => format!("dry run: {}", event.message),
        "dry_run_verdict" => "dry run: would not commit".to_string(),
        "held_on_store" => format!("HELD: {}", event.message),
        "store_recovered" => format!("resumed: {}", event.message),
        other => other.to_string(),
    };
    let mut line = format!("{who:<10} {what}");
    if !event.error.is_empty() {
        line.push_str(&format!(" — {}", event.error));
    } else if !event.warning.is_empty() {
        line.push_str(&format!(
            " — WARNING: {}",
            event.warning.replace('\n', "; ")
        ));
    } else if !event.message.is_empty() && event.kind == "rollout_state" {
        line.push_str(&format!(" — {}", event.message));
    }
    line
}

/// `gate errors after wave 1 passed (value 0.1): …`, what a fleet gate did.
fn gate_line(event: &pb::RolloutEvent) -> String {
    let phase = match event.gate_phase.as_str() {
        "failed" => "FAILED",
        other => other,
    };
    let mut line = format!(
        "gate `{}` after wave {} {phase}",
        event.gate_name, event.wave
    );
    if !event.gate_value.is_empty() {
        line.push_str(&format!(" (value {})", event.gate_value));
    }
    if event.error.is_empty() && !event.message.is_empty() {
        line.push_str(&format!(": {}", event.message));
    }
    line
}

/// What `watch` prints per event when stdout is not a terminal: `<UTC time>  <describe>`.
pub fn plain_line(event: &pb::RolloutEvent) -> String {
    format!("{}  {}", format_unix_ms(event.at_unix_ms), describe(event))
}

/// A rollout event as one JSON object (`--output json` of `watch` and `events`).
pub fn event_json(event: &pb::RolloutEvent) -> serde_json::Value {
    let step = event.kind == "step";
    let finished_step = step && event.step_phase != pb::StepPhase::Started as i32;
    serde_json::json!({
        "rollout": event.rollout_id,
        "seq": event.seq,
        "at": format_unix_ms(event.at_unix_ms),
        "at_unix_ms": event.at_unix_ms,
        "kind": event.kind,
        "node": (!event.node.is_empty()).then_some(&event.node),
        "rollout_state": (event.kind == "rollout_state").then(|| rollout_state_name(event.rollout_state)),
        "node_state": (event.kind == "node_state").then(|| node_state_name(event.node_state)),
        "step": (event.step >= 0).then_some(event.step),
        "instruction": (!event.instruction.is_empty()).then_some(&event.instruction),
        "phase": step.then(|| match pb::StepPhase::try_from(event.step_phase) {
            Ok(pb::StepPhase::Started) => "started",
            Ok(pb::StepPhase::Succeeded) => "succeeded",
            Ok(pb::StepPhase::Failed) => "failed",
            _ => "unknown",
        }),
        "duration_ms": finished_step.then_some(event.duration_ms),
        "barrier": (!event.barrier_id.is_empty()).then_some(&event.barrier_id),
        "wave": (event.wave > 0).then_some(event.wave),
        "error": (!event.error.is_empty()).then_some(&event.error),
        "warning": (!event.warning.is_empty()).then_some(&event.warning),
        "message": (!event.message.is_empty()).then_some(&event.message),
        "gate": (!event.gate_name.is_empty()).then_some(&event.gate_name),
        "gate_phase": (!event.gate_phase.is_empty()).then_some(&event.gate_phase),
        "gate_value": (!event.gate_value.is_empty()).then_some(&event.gate_value),
    })
}

/// `2026-03-21T14:05:09.042Z`: a Unix time in milliseconds as RFC 3339 UTC.
pub fn format_unix_ms(ms: u64) -> String {
    hotroll_script::format_utc_millis(ms)
}

/// A short human duration: `850 ms`, `12.3 s`, `4m05s`, `2h03m`.
pub fn format_duration_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, (ms % 3_600_000) / 60_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_times_format_as_rfc3339_utc() {
        assert_eq!(format_unix_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_unix_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(
            format_unix_ms(1_700_000_000_000),
            "2023-11-14T22:13:20.000Z"
        );
        assert_eq!(
            format_unix_ms(4_102_444_799_999),
            "2099-12-31T23:59:59.999Z"
        );
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(format_duration_ms(0), "0 ms");
        assert_eq!(format_duration_ms(999), "999 ms");
        assert_eq!(format_duration_ms(12_345), "12.3 s");
        assert_eq!(format_duration_ms(245_000), "4m05s");
        assert_eq!(format_duration_ms(7_380_000), "2h03m");
    }

    #[test]
    fn step_lines_carry_the_duration() {
        let event = pb::RolloutEvent {
            seq: 7,
            at_unix_ms: 1_700_000_000_000,
            kind: "step".into(),
            node: "node-2".into(),
            step: 1,
            instruction: "apply".into(),
            step_phase: pb::StepPhase::Failed as i32,
            duration_ms: 1500,
            error: "hook `x` exited 1".into(),
            ..Default::default()
        };
        assert_eq!(
            plain_line(&event),
            "2023-11-14T22:13:20.000Z  node-2     step 2 apply FAILED (1.5 s) — hook `x` exited 1"
        );
        let json = event_json(&event);
        assert_eq!(json["phase"], "failed");
        assert_eq!(json["duration_ms"], 1500);
        assert_eq!(json["node"], "node-2");
        assert_eq!(json["rollout_state"], serde_json::Value::Null);
    }
}
