//! The console in a real browser: Debian's headless Chromium, driven over WebDriver
//! (`hotroll_tests::browser`), against a real in-process coordinator with TLS on, as in
//! production (the page is HTTPS and its session cookie `Secure`), and 3 real agents.
//!
//! * A viewer logs in through the form and watches a rollout in which one node fails after the
//!   point of no return: the others' rows reach `committed`, the failed one shows its error,
//!   each row's timeline has a bar per step, and no action button is drawn (screenshots of the
//!   fleet and of the rolled-back node go to `target/console-screenshots/`).
//! * An operator pauses, resumes, promotes and aborts with the page's buttons, and the
//!   coordinator's own status agrees each time.
//! * The page's network breaks mid-rollout (a proxy cuts its connections and refuses new ones
//!   for a while): once back it holds exactly the coordinator's history.
//! * The browser helpers themselves read and click through a page that keeps replacing its
//!   elements, as the console does while events arrive.
//!
//! Requests to an action without the cookie or with a viewer's are refused in `http.rs`.
#![allow(clippy::unwrap_used)] // Tests unwrap: a panic is the failure report.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hotroll_agent::HooksOnlyRuntime;
use hotroll_coordinator::auth::TokenRole;
use hotroll_local::{Fleet, NodeSlot, OperatorClient};
use hotroll_proto::v1 as pb;
use hotroll_tests::browser::Browser;
use hotroll_tests::proxy::Proxy;
use serde_json::Value;

const WITHIN: Duration = Duration::from_secs(30);
const DAY: Duration = Duration::from_secs(86_400);

/// Each node's hooks: `mark` succeeds, `post` fails on `failing` (exit 1 with a message on
/// stderr), `gate` waits until the file its argument names exists.
fn agent_toml(slot: &NodeSlot, failing: Option<&str>) -> String {
    let post = if failing == Some(slot.name.as_str()) {
        r#"["sh", "-c", "echo 'post-check: the new release answers 500' >&2; exit 1"]"#
    } else {
        r#"["true"]"#
    };
    format!(
        r#"node = "{name}"
coordinator = "{url}"
data_dir = "{data_dir}"

[hooks]
mark = {{ command = ["true"], timeout = "10s" }}
post = {{ command = {post}, timeout = "10s" }}
gate = {{ command = ["sh", "-c", "until [ -e \"$1\" ]; do sleep 0.05; done", "gate"], timeout = "60s" }}
"#,
        name = slot.name,
        url = slot.coordinator_url,
        data_dir = slot.data_dir.display(),
    )
}

/// A TLS fleet of 3 nodes (`zone` a, a, b) with the console on `ui`.
async fn fleet(ui: SocketAddr, failing: Option<&'static str>) -> Fleet {
    let _ = tracing_subscriber::fmt().with_env_filter("warn").try_init();
    let fleet = Fleet::builder()
        .agents(3)
        .server_config(move |config| {
            config.heartbeat_interval = Duration::from_millis(200);
            config.ui_listen = Some(ui);
        })
        .agent_toml(move |slot| agent_toml(slot, failing))
        .agent_config(|slot, config| {
            let zone = if slot.index < 2 { "a" } else { "b" };
            config.labels.insert("zone".into(), zone.into());
        })
        .runtime(|_| HooksOnlyRuntime)
        .build()
        .await
        .unwrap();
    fleet
        .wait_connected(3, Duration::from_secs(30))
        .await
        .unwrap();
    fleet
}

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], hotroll_tests::free_port().unwrap()))
}

async fn start(control: &mut OperatorClient, script: &str) -> String {
    control
        .start_rollout(pb::StartRolloutRequest {
            script_name: "console.toml".into(),
            script_source: script.into(),
            select: BTreeMap::new().into_iter().collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rollout_id
}

async fn coordinator_state(control: &mut OperatorClient, id: &str) -> String {
    let status = control
        .get_rollout(pb::GetRolloutRequest {
            rollout_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    pb::RolloutState::try_from(status.state)
        .unwrap()
        .as_str_name()
        .trim_start_matches("ROLLOUT_STATE_")
        .to_lowercase()
}

async fn wait_coordinator_state(control: &mut OperatorClient, id: &str, want: &str) {
    let mut last = String::new();
    for _ in 0..600 {
        last = coordinator_state(control, id).await;
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("rollout {id} is {last}, not {want}");
}

/// The coordinator's history of a rollout, through Control (from its start to its end, or
/// what it holds so far when it is still running).
async fn coordinator_history(control: &mut OperatorClient, id: &str) -> Vec<pb::RolloutEvent> {
    let mut stream = control
        .watch_rollout(pb::WatchRolloutRequest {
            rollout_id: id.into(),
            from_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    // A finished rollout's stream ends; a running one's goes quiet once the past is replayed.
    while let Ok(event) = tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
        let Some(event) = event.unwrap() else { break };
        if event.seq > 0 {
            events.push(event);
        }
    }
    events
}

/// Log in through the form with `token`, and wait for the fleet page.
async fn log_in(browser: &Browser, base: &str, token: &str) {
    browser.goto(&format!("{base}/")).await.unwrap();
    browser
        .wait_until(
            "the login form",
            WITHIN,
            "!document.getElementById('login').hidden",
        )
        .await
        .unwrap();
    browser.type_into("#token", token).await.unwrap();
    browser.click("#login-button").await.unwrap();
    browser
        .wait_until(
            "the fleet page after the login",
            WITHIN,
            "document.querySelectorAll('#fleet-table tr.node-row').length === 3",
        )
        .await
        .unwrap();
}

async fn open_rollout(browser: &Browser, base: &str, id: &str) {
    browser
        .goto(&format!("{base}/#/rollout/{id}"))
        .await
        .unwrap();
    browser
        .wait_until(
            "the rollout page's rows",
            WITHIN,
            "document.querySelectorAll('#nodes .node-row').length === 3",
        )
        .await
        .unwrap();
}

fn js_string(text: &str) -> String {
    serde_json::to_string(text).unwrap()
}

async fn row_state(browser: &Browser, node: &str) -> String {
    browser
        .text(&format!("#nodes .node-row[data-node='{node}'] .state"))
        .await
        .unwrap()
}

/// Held at a gate after the point of no return (so the page sees it running), then `post`,
/// which fails on one node.
fn failing_after_ponr(gate_file: &Path) -> String {
    format!(
        r#"
app = "shop"
from = "1.4.2"
to = "1.5.0"
[rollout]
max_failures = 1
barrier_timeout = "30s"
step_timeout = "30s"
[script]
up = [
  {{ apply = {{ hook = "mark", args = ["pre"] }} }},
  {{ sync_nodes = "staged" }},
  "point_of_no_return",
  {{ apply = {{ hook = "gate", args = [{gate}] }} }},
  {{ apply = {{ hook = "post" }} }},
]
down = []
"#,
        gate = js_string(&gate_file.display().to_string()),
    )
}

#[tokio::test]
async fn a_viewer_watches_a_rollout_with_a_rolled_back_node_to_its_end() {
    let ui = free_addr();
    let fleet = fleet(ui, Some("node-2")).await;
    let mut control = fleet.control().await.unwrap();
    let viewer = fleet.token(TokenRole::Viewer, DAY, None).unwrap();
    let base = format!("https://{ui}");
    let browser = Browser::start().await.unwrap();

    log_in(&browser, &base, &viewer).await;
    // The session cookie is HttpOnly: the page's script cannot see it.
    assert_eq!(browser.eval("return document.cookie;").await.unwrap(), "");
    assert_eq!(browser.text("#who").await.unwrap(), "viewer");
    let count = browser.text("#fleet-count").await.unwrap();
    assert_eq!(count, "3 of 3 nodes, 3 connected");
    browser.type_into("#label-filter", "zone=b").await.unwrap();
    browser
        .wait_until(
            "the label filter",
            WITHIN,
            "document.querySelectorAll('#fleet-table tr.node-row').length === 1",
        )
        .await
        .unwrap();
    assert_eq!(
        browser.text("#fleet-table tr.node-row td").await.unwrap(),
        "node-3"
    );
    browser
        .eval("const f = document.getElementById('label-filter'); f.value = ''; f.dispatchEvent(new Event('input')); return true;")
        .await
        .unwrap();
    browser
        .wait_until(
            "the filter cleared",
            WITHIN,
            "document.querySelectorAll('#fleet-table tr.node-row').length === 3",
        )
        .await
        .unwrap();
    let shot = browser.screenshot("fleet.png").await.unwrap();
    eprintln!("screenshot: {}", shot.display());

    let gates = tempfile::tempdir().unwrap();
    let held = gate(gates.path(), "held");
    let id = start(&mut control, &failing_after_ponr(&held)).await;
    open_rollout(&browser, &base, &id).await;
    // Live: every node past the point of no return, its gate step a running bar.
    browser
        .wait_until(
            "every node running its gate step",
            WITHIN,
            "document.querySelectorAll(\"#nodes .node-row[data-state='committing'] .step-bar[data-step='3'][data-outcome='running']\").length === 3",
        )
        .await
        .unwrap();
    assert_eq!(browser.text("#rollout-state").await.unwrap(), "committing");
    std::fs::write(&held, "").unwrap();
    browser
        .wait_until(
            "the rollout's end on the page",
            WITHIN,
            "document.getElementById('live').dataset.state === 'ended'",
        )
        .await
        .unwrap();
    wait_coordinator_state(&mut control, &id, "partially_rolled_back").await;

    assert_eq!(
        browser.text("#rollout-state").await.unwrap(),
        "partially_rolled_back"
    );
    for node in ["node-1", "node-3"] {
        assert_eq!(row_state(&browser, node).await, "committed", "{node}");
    }
    assert_eq!(row_state(&browser, "node-2").await, "rolled_back");
    let error = browser
        .text("#nodes .node-row[data-node='node-2'] .error")
        .await
        .unwrap();
    assert!(!error.is_empty(), "node-2 shows no error");
    let error_title: Value = browser
        .eval(
            "return document.querySelector(\"#nodes .node-row[data-node='node-2'] .error\").title;",
        )
        .await
        .unwrap();
    assert!(
        error_title
            .as_str()
            .unwrap()
            .contains("the new release answers 500"),
        "{error_title}"
    );
    let header = browser.text("#rollout-header").await.unwrap();
    assert!(!header.contains("null"), "{header}");
    assert!(!header.contains("undefined"), "{header}");
    assert!(header.contains("shop 1.4.2 → 1.5.0"), "{header}");

    // One bar per step each node ran, as the coordinator's history has them; node-2's last
    // one failed.
    let history = coordinator_history(&mut control, &id).await;
    for node in ["node-1", "node-2", "node-3"] {
        let mut steps: Vec<i32> = history
            .iter()
            .filter(|e| e.kind == "step" && e.node == node)
            .map(|e| e.step)
            .collect();
        steps.sort_unstable();
        steps.dedup();
        assert_eq!(steps.len(), 5, "{node}: {steps:?}");
        let bars = browser
            .count(&format!(
                "#nodes .node-row[data-node='{node}'] .lane .step-bar"
            ))
            .await
            .unwrap();
        assert_eq!(bars, steps.len(), "{node}'s bars");
    }
    let failed_bars = browser
        .count("#nodes .node-row[data-node='node-2'] .step-bar[data-outcome='failed']")
        .await
        .unwrap();
    assert_eq!(failed_bars, 1);
    let failed_step = browser
        .eval("return document.querySelector(\"#nodes .node-row[data-node='node-2'] .step-bar[data-outcome='failed']\").dataset.step;")
        .await
        .unwrap();
    assert_eq!(failed_step, "4");
    assert_eq!(
        browser
            .count("#nodes .node-row .step-bar[data-outcome='succeeded']")
            .await
            .unwrap(),
        3 * 5 - 1
    );
    // Everything the coordinator recorded, once.
    let page_seqs: Vec<u64> = serde_json::from_value(
        browser
            .eval("return window.hotrollConsole.history();")
            .await
            .unwrap(),
    )
    .unwrap();
    let seqs: Vec<u64> = history.iter().map(|e| e.seq).collect();
    assert_eq!(page_seqs, seqs);

    // A viewer gets no action button at all.
    assert_eq!(browser.count("#actions button").await.unwrap(), 0);
    assert_eq!(browser.count("#action-pause").await.unwrap(), 0);

    browser
        .eval("document.getElementById('nodes').scrollTop = 0; window.scrollTo(0, 0); return true;")
        .await
        .unwrap();
    let shot = browser.screenshot("rollout-rolled-back.png").await.unwrap();
    eprintln!("screenshot: {}", shot.display());
    browser.close().await.unwrap();
    fleet.shutdown().await.unwrap();
}

/// A file the `gate` hook waits for.
fn gate(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

fn gated_script(gate_file: &Path, canary_pause: bool) -> String {
    format!(
        r#"
app = "shop"
from = "1.4.2"
to = "1.5.0"
[rollout]
canary = 1
max_in_flight = 1
pause_after_canary = {canary_pause}
barrier_timeout = "30s"
step_timeout = "30s"
[script]
up = [
  {{ apply = {{ hook = "mark", args = ["pre"] }} }},
  {{ sync_nodes = "staged" }},
  "point_of_no_return",
  {{ apply = {{ hook = "gate", args = [{gate}] }} }},
]
down = []
"#,
        gate = js_string(&gate_file.display().to_string()),
    )
}

async fn click_and_wait(browser: &Browser, action: &str) -> String {
    browser
        .eval("document.getElementById('action-result').textContent = ''; return true;")
        .await
        .unwrap();
    browser.click(&format!("#action-{action}")).await.unwrap();
    browser
        .wait_until(
            &format!("the answer to {action}"),
            WITHIN,
            "document.getElementById('action-result').textContent",
        )
        .await
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
}

async fn wait_page_state(browser: &Browser, state: &str) {
    browser
        .wait_until(
            &format!("the page showing {state}"),
            WITHIN,
            &format!(
                "(document.getElementById('rollout-state') || {{}}).textContent === {}",
                js_string(state)
            ),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn an_operator_pauses_resumes_promotes_and_aborts_from_the_page() {
    let ui = free_addr();
    let fleet = fleet(ui, None).await;
    let mut control = fleet.control().await.unwrap();
    let operator = fleet.token(TokenRole::Operator, DAY, None).unwrap();
    let base = format!("https://{ui}");
    let gates = tempfile::tempdir().unwrap();
    let browser = Browser::start().await.unwrap();
    log_in(&browser, &base, &operator).await;
    assert_eq!(browser.text("#who").await.unwrap(), "operator");

    // Pause while the canary is held at its gate: it takes effect after the wave.
    let first_gate = gate(gates.path(), "first");
    let id = start(&mut control, &gated_script(&first_gate, false)).await;
    open_rollout(&browser, &base, &id).await;
    assert_eq!(browser.count("#actions button").await.unwrap(), 4);
    wait_page_state(&browser, "committing").await;
    let answer = click_and_wait(&browser, "pause").await;
    assert_eq!(answer, "pause: now committing", "{answer}");
    std::fs::write(&first_gate, "").unwrap();
    wait_page_state(&browser, "paused").await;
    assert_eq!(coordinator_state(&mut control, &id).await, "paused");
    // Held: the next wave has not started.
    assert_eq!(row_state(&browser, "node-2").await, "prepared");
    let answer = click_and_wait(&browser, "resume").await;
    assert_eq!(answer, "resume: now committing", "{answer}");
    wait_page_state(&browser, "succeeded").await;
    wait_coordinator_state(&mut control, &id, "succeeded").await;

    // Paused after its canary wave: resume is refused with the reason, promote goes on.
    let second_gate = gate(gates.path(), "second");
    std::fs::write(&second_gate, "").unwrap();
    let id = start(&mut control, &gated_script(&second_gate, true)).await;
    open_rollout(&browser, &base, &id).await;
    wait_page_state(&browser, "paused").await;
    assert_eq!(coordinator_state(&mut control, &id).await, "paused");
    let answer = click_and_wait(&browser, "resume").await;
    assert!(
        answer.starts_with("resume refused:") && answer.contains("promote to continue"),
        "{answer}"
    );
    let answer = click_and_wait(&browser, "promote").await;
    assert_eq!(answer, "promote: now committing", "{answer}");
    wait_page_state(&browser, "succeeded").await;
    wait_coordinator_state(&mut control, &id, "succeeded").await;

    // Abort asks for a reason, which the coordinator's history keeps.
    let never = gate(gates.path(), "never");
    let id = start(&mut control, &gated_script(&never, false)).await;
    open_rollout(&browser, &base, &id).await;
    wait_page_state(&browser, "committing").await;
    browser.click("#action-abort").await.unwrap();
    browser
        .answer_prompt("the canary looks wrong")
        .await
        .unwrap();
    browser
        .wait_until(
            "the answer to abort",
            WITHIN,
            "document.getElementById('action-result').textContent",
        )
        .await
        .unwrap();
    // The canary was past the point of no return: everything rolls back.
    wait_page_state(&browser, "rolled_back").await;
    wait_coordinator_state(&mut control, &id, "rolled_back").await;
    let history = coordinator_history(&mut control, &id).await;
    assert!(
        history
            .iter()
            .any(|e| e.kind == "operator" && e.message.contains("the canary looks wrong")),
        "{history:?}"
    );
    // Its gate never opened: the hook is still waiting on node-1 until the agents stop.
    std::fs::write(&never, "").unwrap();
    browser.close().await.unwrap();
    fleet.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_page_whose_network_breaks_mid_rollout_ends_with_exactly_the_coordinators_history() {
    let ui = free_addr();
    let fleet = fleet(ui, None).await;
    let mut control = fleet.control().await.unwrap();
    let viewer = fleet.token(TokenRole::Viewer, DAY, None).unwrap();
    // The browser reaches the console through a proxy that can break its connections.
    let proxy = Proxy::start().unwrap();
    proxy.set_upstream_port(ui.port());
    let base = proxy.url();
    let gates = tempfile::tempdir().unwrap();
    let browser = Browser::start().await.unwrap();
    log_in(&browser, &base, &viewer).await;

    let first = gate(gates.path(), "first");
    let id = start(&mut control, &gated_script(&first, false)).await;
    open_rollout(&browser, &base, &id).await;
    // Quiet: the canary held at its gate, nothing else to record until it opens.
    browser
        .wait_until(
            "the canary at its gate",
            WITHIN,
            "document.querySelectorAll(\"#nodes .node-row[data-node='node-1'] .step-bar[data-step='3'][data-outcome='running']\").length === 1",
        )
        .await
        .unwrap();
    let before: Value = browser
        .eval("return window.hotrollConsole.stream();")
        .await
        .unwrap();
    assert_eq!(before["opens"], 1, "{before}");

    // The network goes: every connection cut, new ones refused. Meanwhile the rollout moves on.
    proxy.clear_upstream();
    proxy.cut();
    browser
        .wait_until(
            "the page noticing the break",
            WITHIN,
            "document.getElementById('live').dataset.state === 'reconnecting'",
        )
        .await
        .unwrap();
    let seen_before_break = before["last_seq"].as_u64().unwrap();
    std::fs::write(&first, "").unwrap();
    // Wait until the coordinator recorded more than the page saw (node-2's wave at least).
    let mut missed = 0;
    for _ in 0..600 {
        let history = coordinator_history(&mut control, &id).await;
        missed = history.len() as u64 - seen_before_break;
        if history
            .iter()
            .any(|e| e.kind == "wave_started" && e.wave == 3)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(missed > 0, "nothing happened while the page was cut off");
    let during: Value = browser
        .eval("return window.hotrollConsole.stream();")
        .await
        .unwrap();
    assert_eq!(during["last_seq"], before["last_seq"], "{during}");

    // Back: the browser's EventSource reconnects on its own with Last-Event-ID.
    proxy.set_upstream_port(ui.port());
    browser
        .wait_until(
            "the rollout's end on the page",
            WITHIN,
            "document.getElementById('live').dataset.state === 'ended'",
        )
        .await
        .unwrap();
    wait_coordinator_state(&mut control, &id, "succeeded").await;
    let history = coordinator_history(&mut control, &id).await;
    let seqs: Vec<u64> = history.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let page_seqs: Vec<u64> = serde_json::from_value(
        browser
            .eval("return window.hotrollConsole.history();")
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        page_seqs, seqs,
        "the page's history is not the coordinator's"
    );
    let after: Value = browser
        .eval("return window.hotrollConsole.stream();")
        .await
        .unwrap();
    assert!(after["opens"].as_u64().unwrap() >= 2, "{after}");
    // Resumed after its last entry: the server sent nothing twice.
    assert_eq!(after["duplicates"], 0, "{after}");
    assert_eq!(
        after["received"].as_u64().unwrap(),
        seqs.len() as u64,
        "{after}"
    );
    for node in ["node-1", "node-2", "node-3"] {
        assert_eq!(row_state(&browser, node).await, "committed", "{node}");
    }
    browser.close().await.unwrap();
    drop(proxy);
    fleet.shutdown().await.unwrap();
}

/// The console replaces rows as events arrive, so an element the test found may be gone by the
/// time it reads or clicks it. A page that replaces its only element ten times a second: every
/// read still gets the text, and every click lands.
#[tokio::test]
async fn reads_and_clicks_survive_a_page_that_replaces_its_elements() {
    let browser = Browser::start().await.unwrap();
    // The page is built by script on about:blank, so no URL has to carry it.
    browser.goto("about:blank").await.unwrap();
    browser
        .eval(
            "window.clicks = 0;
             function render() {
                 const button = document.createElement('button');
                 button.id = 'target';
                 button.textContent = 'clicked ' + clicks;
                 button.onclick = () => { clicks += 1; };
                 document.body.replaceChildren(button);
                 setTimeout(render, 100);
             }
             render();
             return true;",
        )
        .await
        .unwrap();
    for _ in 0..200 {
        let text = browser.text("#target").await.unwrap();
        assert!(text.starts_with("clicked "), "{text}");
    }
    for _ in 0..20 {
        browser.click("#target").await.unwrap();
    }
    let clicks = browser.eval("return clicks;").await.unwrap();
    assert_eq!(clicks, Value::from(20));
    browser.close().await.unwrap();
}
