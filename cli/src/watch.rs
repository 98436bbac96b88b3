//! `hotroll rollout watch ID`, `hotroll rollout start FILE --watch` and `hotroll rollout events
//! ID`: a rollout's events as a live terminal view, as plain lines, or as JSON.
//!
//! * [`follow`]: the `WatchRollout` stream, resumed from the last event after a break or a
//!   `DATA_LOSS` (the watcher fell behind), so nothing is missed or seen twice.
//! * [`view`]: the view's state, folded from the events (pure).
//! * [`render`]: the view as lines for the terminal (pure).
//! * [`text`]: one plain line or one JSON object per event.
//!
//! Which output: `--output json` prints newline-delimited JSON events; otherwise a terminal on
//! stdout gets the live view, redrawn in place, and anything else (a pipe, a file, `TERM=dumb`)
//! one plain line per event with no escape codes.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::Context;
use hotroll_proto::v1 as pb;

use super::client::{CoordinatorArgs, connect, status_error};
use super::{Output, exit};
use crate::states::{rollout_state_name, wait_exit_code};

pub mod follow;
pub mod render;
pub mod text;
pub mod view;

pub use follow::{EventSource, FollowEnd, FollowMsg, GrpcSource, Until, spawn_follow};
pub use text::{describe, event_json, plain_line};
pub use view::View;

/// Exit code when the operator interrupts a watch (128 + SIGINT).
pub const INTERRUPTED: u8 = 130;

#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// Rollout id (as printed by `hotroll rollout start`).
    pub id: String,
    /// `text`: a live view on a terminal, one line per event elsewhere; `json`: one JSON
    /// object per event (newline-delimited).
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    /// Print events from this seq on (lines and JSON; the live view always folds the whole
    /// history). Resume a log you saved with the seq after its last event.
    #[arg(long, default_value_t = 0, value_name = "SEQ")]
    pub from_seq: u64,
    /// Give up (exit 1) if the rollout is not final after this long. Default: wait as long
    /// as it takes.
    #[arg(long, value_parser = super::serve::parse_duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct EventsArgs {
    /// Rollout id (as printed by `hotroll rollout start`).
    pub id: String,
    /// `text`: a table; `json`: one JSON object per event (newline-delimited), the same
    /// objects `watch --output json` prints.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

/// How `watch` shows the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The live view, redrawn in place.
    Live { color: bool },
    /// One plain line per event.
    Lines,
    /// One JSON object per event.
    Json,
}

impl Mode {
    /// The mode for `output` given where stdout goes.
    pub fn detect(output: Output) -> Self {
        if output == Output::Json {
            return Mode::Json;
        }
        let terminal =
            std::io::stdout().is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb");
        if terminal {
            Mode::Live {
                color: std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
            }
        } else {
            Mode::Lines
        }
    }
}

/// `hotroll rollout watch ID`.
pub async fn run_watch(args: WatchArgs) -> anyhow::Result<u8> {
    let mut client = connect(&args.coordinator).await?;
    watch(
        &mut client,
        Some(&args.coordinator),
        &args.id,
        Mode::detect(args.output),
        args.from_seq,
        args.timeout,
    )
    .await
}

/// Watch rollout `id` until it is final (or `timeout` passes); returns `--wait`'s exit code.
pub async fn watch(
    client: &mut super::client::Client,
    reconnect: Option<&super::client::CoordinatorArgs>,
    id: &str,
    mode: Mode,
    from_seq: u64,
    timeout: Option<Duration>,
) -> anyhow::Result<u8> {
    let status = first_status(client, reconnect, id).await?;
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let from_seq = match mode {
        Mode::Live { .. } => 0,
        Mode::Lines | Mode::Json => from_seq,
    };
    let rx = spawn_follow(
        GrpcSource {
            reconnect: reconnect.cloned(),
            ..GrpcSource::new(client.clone(), id)
        },
        from_seq,
        Until::Final,
    );
    let ended = match mode {
        Mode::Live { color } => live(client, status, rx, color, deadline).await?,
        Mode::Lines | Mode::Json => lines(rx, mode == Mode::Json, deadline).await?,
    };
    match ended {
        Ended::Final(state) => Ok(wait_exit_code(state as i32)),
        Ended::Failed(message) => {
            eprintln!("error: cannot follow rollout {id}: {message}");
            Ok(exit::ERROR)
        }
        Ended::TimedOut => {
            let state = get_status(client, id)
                .await
                .map_or("unknown", |s| rollout_state_name(s.state));
            eprintln!("error: rollout {id} is still {state}; stopped watching at the timeout");
            Ok(exit::ERROR)
        }
        Ended::Interrupted => Ok(INTERRUPTED),
        Ended::OutputClosed => Ok(exit::ERROR),
    }
}

/// How a watch ended.
#[derive(Debug)]
enum Ended {
    Final(pb::RolloutState),
    Failed(String),
    TimedOut,
    Interrupted,
    /// Whatever reads our stdout went away (`| head`).
    OutputClosed,
}

/// The rollout's status before watching. With `reconnect`, a coordinator lost at that moment
/// (a group's leader failing over) is looked for again a few times rather than given up on.
async fn first_status(
    client: &mut super::client::Client,
    reconnect: Option<&super::client::CoordinatorArgs>,
    id: &str,
) -> anyhow::Result<pb::RolloutStatus> {
    const ATTEMPTS: u32 = 5;
    let mut attempt = 1;
    loop {
        let asked = client
            .get_rollout(pb::GetRolloutRequest {
                rollout_id: id.to_string(),
            })
            .await;
        match (asked, reconnect) {
            (Ok(status), _) => return Ok(status.into_inner()),
            (Err(status), Some(args))
                if attempt < ATTEMPTS
                    && matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                    ) =>
            {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                *client = super::client::connect(args).await?;
            }
            (Err(status), _) => return Err(status_error(status)),
        }
    }
}

async fn get_status(
    client: &mut super::client::Client,
    id: &str,
) -> anyhow::Result<pb::RolloutStatus> {
    Ok(client
        .get_rollout(pb::GetRolloutRequest {
            rollout_id: id.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner())
}

async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One line (or JSON object) per event on stdout; notes about the stream on stderr.
async fn lines(
    mut rx: tokio::sync::mpsc::Receiver<FollowMsg>,
    json: bool,
    deadline: Option<tokio::time::Instant>,
) -> anyhow::Result<Ended> {
    let stdout = std::io::stdout();
    let mut interrupt = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let msg = tokio::select! {
            msg = rx.recv() => msg,
            () = until(deadline) => return Ok(Ended::TimedOut),
            _ = &mut interrupt => return Ok(Ended::Interrupted),
        };
        let Some(msg) = msg else {
            return Ok(Ended::Failed("the event stream stopped".into()));
        };
        match msg {
            FollowMsg::Event(event) => {
                let line = if json {
                    event_json(&event).to_string()
                } else {
                    plain_line(&event)
                };
                let mut out = stdout.lock();
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    return Ok(Ended::OutputClosed);
                }
            }
            FollowMsg::Notice(note) => eprintln!("hotroll: {note}"),
            FollowMsg::End(FollowEnd::Final(state)) => return Ok(Ended::Final(state)),
            FollowMsg::End(FollowEnd::CaughtUp) => {
                return Ok(Ended::Failed("the event stream ended early".into()));
            }
            FollowMsg::End(FollowEnd::Failed(message)) => return Ok(Ended::Failed(message)),
        }
    }
}

/// Hides the cursor while the live view runs; shows it again however the view ends.
struct CursorGuard;

impl CursorGuard {
    fn hide() -> Self {
        let _ = crossterm::execute!(std::io::stdout(), crossterm::cursor::Hide);
        CursorGuard
    }
}

impl Drop for CursorGuard {
    fn drop(&mut self) {
        let _ = crossterm::execute!(std::io::stdout(), crossterm::cursor::Show);
    }
}

/// Draws frames in place: each frame replaces the previous one.
struct Screen {
    drawn: u16,
    size: (u16, u16),
    color: bool,
}

impl Screen {
    fn draw(&mut self, frame: &[render::Line]) -> std::io::Result<()> {
        use crossterm::{cursor, queue, terminal};
        let size = terminal::size().unwrap_or((80, 24));
        let mut out = std::io::stdout().lock();
        if self.drawn > 0 {
            if size != self.size {
                // Lines drawn for another width may have wrapped: start over on a clean screen.
                queue!(
                    out,
                    terminal::Clear(terminal::ClearType::All),
                    cursor::MoveTo(0, 0)
                )?;
            } else {
                queue!(out, cursor::MoveToPreviousLine(self.drawn))?;
            }
        }
        queue!(out, terminal::Clear(terminal::ClearType::FromCursorDown))?;
        for line in frame {
            let text = if self.color {
                render::ansi(line)
            } else {
                render::plain(line)
            };
            write!(out, "{text}\r\n")?;
        }
        out.flush()?;
        self.drawn = u16::try_from(frame.len()).unwrap_or(u16::MAX);
        self.size = size;
        Ok(())
    }

    fn frame(view: &View) -> Vec<render::Line> {
        let (cols, rows) = crossterm::terminal::size().unwrap_or((80, 24));
        // One column and one row spare: no auto-wrap, no scrolling.
        render::render(
            view,
            hotroll_coordinator::rollouts::now_ms(),
            usize::from(cols.saturating_sub(1)).max(20),
            usize::from(rows.saturating_sub(1)).max(8),
        )
    }
}

/// How often the live view redraws while nothing happens (elapsed times move).
const TICK: Duration = Duration::from_millis(250);
/// How often the live view asks for what the stream does not carry (the failure count).
const REFRESH: Duration = Duration::from_secs(1);
/// At most one frame per this while events stream in.
const MIN_FRAME: Duration = Duration::from_millis(50);

async fn live(
    client: &mut super::client::Client,
    status: pb::RolloutStatus,
    mut rx: tokio::sync::mpsc::Receiver<FollowMsg>,
    color: bool,
    deadline: Option<tokio::time::Instant>,
) -> anyhow::Result<Ended> {
    let mut view = View::new(&status);
    let _cursor = CursorGuard::hide();
    let mut screen = Screen {
        drawn: 0,
        size: (0, 0),
        color,
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refresh = tokio::time::interval(REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dirty = true;
    let mut last_draw = tokio::time::Instant::now();
    let mut interrupt = std::pin::pin!(tokio::signal::ctrl_c());
    let ended = loop {
        tokio::select! {
            biased;
            _ = &mut interrupt => break Ended::Interrupted,
            () = until(deadline) => break Ended::TimedOut,
            msg = rx.recv() => match msg {
                Some(FollowMsg::Event(event)) => {
                    view.apply(&event);
                    dirty = true;
                }
                Some(FollowMsg::Notice(note)) => {
                    view.notice = Some(note);
                    dirty = true;
                }
                Some(FollowMsg::End(FollowEnd::Final(state))) => break Ended::Final(state),
                Some(FollowMsg::End(FollowEnd::CaughtUp)) => {
                    break Ended::Failed("the event stream ended early".into())
                }
                Some(FollowMsg::End(FollowEnd::Failed(message))) => break Ended::Failed(message),
                None => break Ended::Failed("the event stream stopped".into()),
            },
            _ = refresh.tick() => {
                if let Ok(Ok(status)) = tokio::time::timeout(
                    Duration::from_secs(2),
                    get_status(client, &status.id),
                ).await {
                    view.refresh(&status);
                    dirty = true;
                }
            }
            _ = tick.tick() => dirty = true,
        }
        // A burst of events (the replay of a long history) is folded before one frame shows it.
        if dirty && (rx.is_empty() || last_draw.elapsed() >= MIN_FRAME) {
            screen
                .draw(&Screen::frame(&view))
                .context("cannot draw on the terminal")?;
            dirty = false;
            last_draw = tokio::time::Instant::now();
        }
    };
    // The last frame stays on the screen: with the final counts when the rollout ended.
    while let Ok(msg) = rx.try_recv() {
        if let FollowMsg::Event(event) = msg {
            view.apply(&event);
        }
    }
    if matches!(ended, Ended::Final(_))
        && let Ok(Ok(status)) =
            tokio::time::timeout(Duration::from_secs(2), get_status(client, &status.id)).await
    {
        view.refresh(&status);
    }
    screen
        .draw(&Screen::frame(&view))
        .context("cannot draw on the terminal")?;
    Ok(ended)
}

/// `hotroll rollout events ID`: the rollout's history up to now.
/// The stored history of rollout `id` as far as it goes now.
pub async fn history(
    client: crate::client::Client,
    reconnect: Option<&CoordinatorArgs>,
    id: &str,
) -> anyhow::Result<Vec<pb::RolloutEvent>> {
    let mut rx = spawn_follow(
        GrpcSource {
            reconnect: reconnect.cloned(),
            ..GrpcSource::new(client, id)
        },
        0,
        Until::Now,
    );
    let mut events = Vec::new();
    while let Some(msg) = rx.recv().await {
        match msg {
            FollowMsg::Event(event) => events.push(*event),
            FollowMsg::Notice(note) => eprintln!("hotroll: {note}"),
            FollowMsg::End(FollowEnd::Final(_) | FollowEnd::CaughtUp) => break,
            FollowMsg::End(FollowEnd::Failed(message)) => {
                anyhow::bail!("cannot read the history of rollout {id}: {message}")
            }
        }
    }
    Ok(events)
}

pub async fn run_events(args: EventsArgs) -> anyhow::Result<u8> {
    let client = connect(&args.coordinator).await?;
    let mut rx = spawn_follow(
        GrpcSource {
            reconnect: Some(args.coordinator.clone()),
            ..GrpcSource::new(client, &args.id)
        },
        0,
        Until::Now,
    );
    let mut events = Vec::new();
    let mut finished = false;
    while let Some(msg) = rx.recv().await {
        match msg {
            FollowMsg::Event(event) => events.push(*event),
            FollowMsg::Notice(note) => eprintln!("hotroll: {note}"),
            FollowMsg::End(FollowEnd::Final(_)) => {
                finished = true;
                break;
            }
            FollowMsg::End(FollowEnd::CaughtUp) => break,
            FollowMsg::End(FollowEnd::Failed(message)) => {
                anyhow::bail!("cannot read the history of rollout {}: {message}", args.id)
            }
        }
    }
    let mut out = std::io::stdout().lock();
    let written = match args.output {
        Output::Json => events
            .iter()
            .try_for_each(|e| writeln!(out, "{}", event_json(e))),
        Output::Text => writeln!(out, "{}", events_table(&events)),
    };
    if written.and_then(|()| out.flush()).is_err() {
        return Ok(exit::ERROR);
    }
    if !finished && args.output == Output::Text {
        eprintln!(
            "rollout {} is still running; `hotroll rollout watch {}` follows it",
            args.id, args.id
        );
    }
    Ok(exit::OK)
}

/// The history as a table: seq, time, node, what, outcome, duration, error or detail.
pub fn events_table(events: &[pb::RolloutEvent]) -> comfy_table::Table {
    use crate::states::node_state_name;
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header([
        "SEQ", "TIME", "NODE", "WHAT", "OUTCOME", "DURATION", "DETAIL",
    ]);
    for e in events {
        let (what, outcome, duration) = match e.kind.as_str() {
            "rollout_state" => (
                "rollout".to_string(),
                rollout_state_name(e.rollout_state).to_string(),
                String::new(),
            ),
            "node_state" => (
                "node".to_string(),
                node_state_name(e.node_state).to_string(),
                String::new(),
            ),
            "step" => {
                let finished = e.step_phase != pb::StepPhase::Started as i32;
                (
                    format!("#{} {}", e.step + 1, e.instruction),
                    match pb::StepPhase::try_from(e.step_phase) {
                        Ok(pb::StepPhase::Started) => "started",
                        Ok(pb::StepPhase::Succeeded) => "succeeded",
                        Ok(pb::StepPhase::Failed) => "failed",
                        _ => "unknown",
                    }
                    .to_string(),
                    if finished {
                        text::format_duration_ms(e.duration_ms)
                    } else {
                        String::new()
                    },
                )
            }
            "barrier_arrived" => (
                format!("barrier {}", e.barrier_id),
                format!("arrived {}", e.message.trim_end_matches(" arrived")),
                String::new(),
            ),
            "barrier_released" => (
                format!("barrier {}", e.barrier_id),
                "released".to_string(),
                String::new(),
            ),
            "barrier_failed" => (
                format!("barrier {}", e.barrier_id),
                "failed".to_string(),
                String::new(),
            ),
            "wave_started" => (
                format!("wave {}", e.wave),
                "started".to_string(),
                String::new(),
            ),
            "operator" => ("operator".to_string(), String::new(), String::new()),
            "gate" => (
                format!("gate {} (wave {})", e.gate_name, e.wave),
                if e.gate_value.is_empty() {
                    e.gate_phase.clone()
                } else {
                    format!("{} (value {})", e.gate_phase, e.gate_value)
                },
                String::new(),
            ),
            other => (other.to_string(), String::new(), String::new()),
        };
        let detail = if !e.error.is_empty() {
            e.error.clone()
        } else if !e.warning.is_empty() {
            format!("WARNING: {}", e.warning.replace('\n', "; "))
        } else {
            e.message.clone()
        };
        let detail = if e.kind == "barrier_arrived" {
            String::new()
        } else {
            detail
        };
        table.add_row([
            e.seq.to_string(),
            text::format_unix_ms(e.at_unix_ms),
            if e.node.is_empty() {
                "-".to_string()
            } else {
                e.node.clone()
            },
            what,
            outcome,
            duration,
            detail,
        ]);
    }
    table
}

/// Wait until rollout `id` is final and return its status: follows the event stream (so it
/// returns as soon as the final event is out), and polls `GetRollout` if the stream breaks
/// for good.
pub async fn wait_final(
    client: &mut super::client::Client,
    id: &str,
    timeout: Duration,
) -> anyhow::Result<pb::RolloutStatus> {
    let deadline = tokio::time::Instant::now() + timeout;
    let status = get_status(client, id).await?;
    if view::is_final_state(
        pb::RolloutState::try_from(status.state).unwrap_or(pb::RolloutState::Unspecified),
    ) {
        return Ok(status);
    }
    let mut rx = spawn_follow(GrpcSource::new(client.clone(), id), 0, Until::Final);
    let streamed = tokio::time::timeout_at(deadline, async {
        while let Some(msg) = rx.recv().await {
            match msg {
                FollowMsg::End(FollowEnd::Final(_)) => return true,
                FollowMsg::End(_) => return false,
                FollowMsg::Event(_) | FollowMsg::Notice(_) => {}
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    drop(rx);
    if !streamed {
        tracing::debug!(rollout = id, "event stream lost; polling the status");
    }
    // After the final event the status is final too (the coordinator stores it first); after
    // a lost stream this polls until the end.
    loop {
        let status = get_status(client, id).await?;
        let state =
            pb::RolloutState::try_from(status.state).unwrap_or(pb::RolloutState::Unspecified);
        if view::is_final_state(state) {
            return Ok(status);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "rollout {id} is still {} after {timeout:?}",
                rollout_state_name(status.state)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::view::tests::three_node_rollout;
    use super::*;

    /// The plain lines of a scripted 3-node rollout, as `watch` prints them in a pipe.
    #[test]
    fn plain_lines_match_the_golden_file() {
        let script = three_node_rollout();
        let mut got: String = script.events.iter().map(|e| plain_line(e) + "\n").collect();
        got = got.replace('\r', "");
        let golden = include_str!("watch/testdata/three_nodes.lines");
        if got != golden && std::env::var_os("HOTROLL_BLESS").is_some() {
            let path = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/src/watch/testdata/three_nodes.lines"
            );
            std::fs::write(path, &got).unwrap();
        }
        assert_eq!(got, golden, "HOTROLL_BLESS=1 rewrites the golden file");
    }

    #[test]
    fn the_events_table_has_every_event() {
        let script = three_node_rollout();
        let table = events_table(&script.events).to_string();
        assert_eq!(table.lines().count(), script.events.len() + 1);
        assert!(table.contains("#4 apply"), "{table}");
        assert!(table.contains("194 ms"), "{table}");
        assert!(table.contains("hook `apply` exited 1"), "{table}");
        assert!(table.contains("partially_rolled_back"), "{table}");
    }
}
