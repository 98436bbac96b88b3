//! The console over plain HTTP against a real in-process coordinator and 3 agents: login and
//! cookies, the fleet and rollouts views, a rollout followed to its end over server-sent events
//! (resumable by `Last-Event-ID`), and every way an action is refused.
#![allow(clippy::unwrap_used)] // Tests unwrap: a panic is the failure report.

use std::collections::BTreeMap;
use std::time::Duration;

use hotroll_agent::HooksOnlyRuntime;
use hotroll_coordinator::auth::{TokenRole, TokenStore};
use hotroll_local::{Fleet, NodeSlot};
use hotroll_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SCRIPT: &str = r#"
app = "x"
from = "1.0.0"
to = "2.0.0"
[rollout]
barrier_timeout = "60s"
step_timeout = "60s"
[script]
up = [
  { apply = { hook = "mark", args = ["pre"] } },
  { sync_nodes = "b" },
  "point_of_no_return",
  { apply = { hook = "mark", args = ["post"] } },
]
down = []
"#;

fn agent_toml(slot: &NodeSlot) -> String {
    format!(
        r#"node = "{name}"
coordinator = "{url}"
insecure = true
data_dir = "{data_dir}"

[hooks]
mark = {{ command = ["true"], timeout = "10s" }}
"#,
        name = slot.name,
        url = slot.coordinator_url,
        data_dir = slot.data_dir.display(),
    )
}

/// One HTTP/1.1 answer, its body de-chunked.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

fn dechunk(mut raw: &str) -> String {
    let mut out = String::new();
    loop {
        let Some((size, rest)) = raw.split_once("\r\n") else {
            return out;
        };
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            return out;
        };
        if size == 0 || rest.len() < size {
            out.push_str(&rest[..size.min(rest.len())]);
            return out;
        }
        out.push_str(&rest[..size]);
        raw = rest[size..].trim_start_matches("\r\n");
    }
}

/// A plain HTTP client: one request per connection, read to its end.
async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(text.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut raw))
        .await
        .expect("the answer did not end within 60 s")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Answer {
        status,
        headers,
        body,
    }
}

/// Log in with `token`; the session cookie (`name=value`).
async fn login(addr: std::net::SocketAddr, token: &str) -> String {
    let answer = request(
        addr,
        "POST",
        "/login",
        &[("content-type", "application/json")],
        &serde_json::json!({ "token": token }).to_string(),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let set_cookie = answer.header("set-cookie").unwrap();
    assert!(set_cookie.contains("HttpOnly"), "{set_cookie}");
    assert!(set_cookie.contains("SameSite=Strict"), "{set_cookie}");
    // Plain HTTP (an insecure coordinator): a Secure cookie would not come back.
    assert!(
        !set_cookie.contains("Secure;") && !set_cookie.ends_with("Secure"),
        "{set_cookie}"
    );
    set_cookie.split(';').next().unwrap().to_string()
}

/// One server-sent event: its name, id and data.
#[derive(Debug)]
struct Sse {
    event: String,
    id: Option<u64>,
    data: String,
}

fn parse_sse(body: &str) -> Vec<Sse> {
    body.split("\n\n")
        .filter_map(|block| {
            let mut event = String::from("message");
            let mut id = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            (!data.is_empty()).then_some(Sse { event, id, data })
        })
        .collect()
}

fn free_port() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn a_viewer_follows_a_rollout_and_only_an_operator_with_its_csrf_token_may_act() {
    let _ = tracing_subscriber::fmt().with_env_filter("info").try_init();
    let ui = free_port();
    let fleet = Fleet::builder()
        .agents(3)
        .insecure()
        .label("zone", "a")
        .server_config(move |config| {
            config.heartbeat_interval = Duration::from_millis(200);
            config.ui_listen = Some(ui);
        })
        .agent_toml(agent_toml)
        .runtime(|_| HooksOnlyRuntime)
        .build()
        .await
        .unwrap();
    fleet
        .wait_connected(3, Duration::from_secs(20))
        .await
        .unwrap();
    let mut control = fleet.control().await.unwrap();
    let tokens = TokenStore::new(fleet.coordinator_dir());
    let day = Duration::from_secs(86_400);
    let (viewer, _) = tokens
        .create([0; 32], TokenRole::Viewer, day, None)
        .unwrap();
    let (operator, _) = tokens
        .create([0; 32], TokenRole::Operator, day, None)
        .unwrap();
    let (agent, _) = tokens
        .create([0; 32], TokenRole::Agent, day, Some("node-9".into()))
        .unwrap();

    // The page itself is public; everything it shows needs a session.
    let page = request(ui, "GET", "/", &[], "").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("/assets/app.js"), "{}", page.body);
    assert!(page.header("content-security-policy").is_some());
    let anonymous = request(ui, "GET", "/api/fleet", &[], "").await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);
    for bad in ["not-a-token", &agent.expose()] {
        let refused = request(
            ui,
            "POST",
            "/login",
            &[("content-type", "application/json")],
            &serde_json::json!({ "token": bad }).to_string(),
        )
        .await;
        assert_eq!(refused.status, 401, "{bad}: {}", refused.body);
        assert!(refused.header("set-cookie").is_none());
    }

    let viewer_cookie = login(ui, &viewer.expose()).await;
    let as_viewer = [("cookie", viewer_cookie.as_str())];
    let me = request(ui, "GET", "/api/me", &as_viewer, "").await.json();
    assert_eq!(me["role"], "viewer");
    assert_eq!(me["may_act"], false);
    let fleet_view = request(ui, "GET", "/api/fleet", &as_viewer, "")
        .await
        .json();
    let nodes = fleet_view["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{fleet_view}");
    assert!(
        nodes
            .iter()
            .all(|n| n["connected"] == true && n["labels"]["zone"] == "a"),
        "{fleet_view}"
    );

    let started = control
        .start_rollout(pb::StartRolloutRequest {
            script_name: "s.toml".into(),
            script_source: SCRIPT.into(),
            select: BTreeMap::new().into_iter().collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let id = started.rollout_id;

    // Followed live to the end: every entry of the history once, in order, then `end`.
    let events = request(
        ui,
        "GET",
        &format!("/api/rollouts/{id}/events"),
        &as_viewer,
        "",
    )
    .await;
    assert_eq!(events.status, 200, "{}", events.body);
    assert!(
        events
            .header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = parse_sse(&events.body);
    let seqs: Vec<u64> = events
        .iter()
        .filter(|e| e.event == "history")
        .map(|e| e.id.unwrap())
        .collect();
    assert!(!seqs.is_empty());
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "{events:?}"
    );
    assert_eq!(events.last().unwrap().event, "end", "{events:?}");
    let last_status: serde_json::Value = serde_json::from_str(
        &events
            .iter()
            .rev()
            .find(|e| e.event == "status")
            .unwrap()
            .data,
    )
    .unwrap();
    assert_eq!(last_status["status"]["state"], "succeeded", "{last_status}");
    let rows = last_status["status"]["nodes"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert!(
        rows.iter().all(|n| n["state"] == "committed"),
        "{last_status}"
    );
    let step_records = events
        .iter()
        .filter(|e| e.event == "history" && e.data.contains("\"kind\":\"step\""))
        .count();
    assert!(step_records >= 3 * 2, "{events:?}");

    // A reconnect with Last-Event-ID resumes right after it.
    let resumed = request(
        ui,
        "GET",
        &format!("/api/rollouts/{id}/events"),
        &[("cookie", viewer_cookie.as_str()), ("last-event-id", "3")],
        "",
    )
    .await;
    let resumed_seqs: Vec<u64> = parse_sse(&resumed.body)
        .iter()
        .filter(|e| e.event == "history")
        .map(|e| e.id.unwrap())
        .collect();
    assert_eq!(resumed_seqs, (4..=seqs.len() as u64).collect::<Vec<_>>());

    let list = request(ui, "GET", "/api/rollouts", &as_viewer, "")
        .await
        .json();
    assert_eq!(list["rollouts"][0]["id"], id.as_str(), "{list}");
    assert_eq!(list["rollouts"][0]["nodes"], 3, "{list}");

    // Actions: no cookie, a viewer's, an operator's without or with a wrong CSRF token or from
    // another origin are all refused; with everything right it reaches the rollout (which has
    // finished, so the engine says no).
    let pause = format!("/api/rollouts/{id}/pause");
    let viewer_csrf = me["csrf"].as_str().unwrap().to_string();
    let no_cookie = request(ui, "POST", &pause, &[("x-hotroll-csrf", &viewer_csrf)], "").await;
    assert_eq!(no_cookie.status, 401, "{}", no_cookie.body);
    let by_viewer = request(
        ui,
        "POST",
        &pause,
        &[
            ("cookie", viewer_cookie.as_str()),
            ("x-hotroll-csrf", &viewer_csrf),
        ],
        "",
    )
    .await;
    assert_eq!(by_viewer.status, 403, "{}", by_viewer.body);
    assert!(by_viewer.body.contains("viewer"), "{}", by_viewer.body);

    let operator_cookie = login(ui, &operator.expose()).await;
    let operator_me = request(
        ui,
        "GET",
        "/api/me",
        &[("cookie", operator_cookie.as_str())],
        "",
    )
    .await
    .json();
    assert_eq!(operator_me["may_act"], true);
    let csrf = operator_me["csrf"].as_str().unwrap().to_string();
    let origin = format!("http://{ui}");
    for (what, headers) in [
        ("no CSRF token", vec![("cookie", operator_cookie.as_str())]),
        (
            "another session's CSRF token",
            vec![
                ("cookie", operator_cookie.as_str()),
                ("x-hotroll-csrf", viewer_csrf.as_str()),
            ],
        ),
        (
            "another origin",
            vec![
                ("cookie", operator_cookie.as_str()),
                ("x-hotroll-csrf", csrf.as_str()),
                ("origin", "http://evil.example"),
            ],
        ),
    ] {
        let refused = request(ui, "POST", &pause, &headers, "").await;
        assert_eq!(refused.status, 403, "{what}: {}", refused.body);
    }
    let taken = request(
        ui,
        "POST",
        &pause,
        &[
            ("cookie", operator_cookie.as_str()),
            ("x-hotroll-csrf", csrf.as_str()),
            ("origin", origin.as_str()),
        ],
        "",
    )
    .await;
    assert_eq!(taken.status, 409, "{}", taken.body);
    assert!(taken.body.contains("already finished"), "{}", taken.body);

    // Logged out, the cookie is worth nothing.
    request(
        ui,
        "POST",
        "/logout",
        &[("cookie", operator_cookie.as_str())],
        "",
    )
    .await;
    let after = request(
        ui,
        "GET",
        "/api/me",
        &[("cookie", operator_cookie.as_str())],
        "",
    )
    .await;
    assert_eq!(after.status, 401);
    fleet.shutdown().await.unwrap();
}
