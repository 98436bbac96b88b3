//! `evaluate` against a real HTTP server on 127.0.0.1 that answers as Prometheus' query API does
//! (the answers each test scripts), and against a port nobody listens on. The end-to-end test
//! with Debian's Prometheus is `local/tests/gates.rs`.

#![allow(clippy::unwrap_used)] // Tests unwrap: a panic is the failure report.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{StatusCode, Uri};
use hotroll_gate::{Gate, GateOutcome, Prometheus, evaluate};
use hotroll_script::Comparison;

/// A real HTTP server answering as Prometheus' query API, with the answers the test lists (the last one
/// repeats), recording every query string it was sent.
struct Server {
    url: String,
    queries: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn vector(value: &str) -> (StatusCode, String) {
    (
        StatusCode::OK,
        format!(
            r#"{{"status":"success","data":{{"resultType":"vector","result":[{{"metric":{{"job":"svc"}},"value":[1700000000.0,"{value}"]}}]}}}}"#
        ),
    )
}

async fn serve(answers: Vec<(StatusCode, String)>) -> Server {
    let answers = Arc::new(Mutex::new(VecDeque::from(answers)));
    let queries = Arc::new(Mutex::new(Vec::new()));
    let seen = queries.clone();
    let app = axum::Router::new().route(
        "/api/v1/query",
        axum::routing::get(move |uri: Uri| {
            let answers = answers.clone();
            let seen = seen.clone();
            async move {
                seen.lock()
                    .unwrap()
                    .push(uri.query().unwrap_or_default().to_string());
                let mut answers = answers.lock().unwrap();
                let answer = if answers.len() > 1 {
                    answers.pop_front().unwrap()
                } else {
                    answers.front().cloned().unwrap()
                };
                (
                    answer.0,
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    answer.1,
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Server { url, queries, task }
}

fn gate(pass_if: &str, hold_ms: u64) -> Gate {
    Gate {
        query: "rate(errors_total{job=\"svc\"}[5s])".to_string(),
        pass_if: Comparison::parse(pass_if).unwrap(),
        hold: Duration::from_millis(hold_ms),
        interval: Duration::from_millis(50),
        timeout: Duration::from_secs(10),
    }
}

async fn run(server: &Server, gate: &Gate) -> GateOutcome {
    evaluate(&Prometheus::new(&server.url).unwrap(), gate).await
}

fn failure(outcome: &GateOutcome) -> (Option<f64>, String) {
    match outcome {
        GateOutcome::Failed { value, reason } => (*value, reason.clone()),
        passed => panic!("the gate passed: {passed:?}"),
    }
}

#[tokio::test]
async fn a_condition_that_holds_for_the_hold_passes_with_the_last_value() {
    let server = serve(vec![vector("0.1"), vector("0.2"), vector("0.05")]).await;
    let gate = gate("< 0.5", 300);
    let outcome = run(&server, &gate).await;
    let GateOutcome::Passed { value, held_for } = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(value, 0.05);
    assert!(held_for >= gate.hold, "{held_for:?}");
    let queries = server.queries.lock().unwrap().clone();
    assert!(queries.len() >= 4, "sampled every interval: {queries:?}");
    assert_eq!(
        queries[0],
        "query=rate%28errors_total%7Bjob%3D%22svc%22%7D%5B5s%5D%29"
    );
}

#[tokio::test]
async fn one_sample_that_violates_the_condition_fails_at_once_with_its_value() {
    let server = serve(vec![vector("0.1"), vector("0.1"), vector("7.5")]).await;
    let (value, reason) = failure(&run(&server, &gate("< 0.5", 60_000)).await);
    assert_eq!(value, Some(7.5));
    assert_eq!(
        reason,
        "`rate(errors_total{job=\"svc\"}[5s])` = 7.5, not < 0.5"
    );
    assert_eq!(server.queries.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn a_nan_never_passes() {
    let server = serve(vec![vector("NaN")]).await;
    let (_, reason) = failure(&run(&server, &gate("< 0.5", 0)).await);
    assert!(reason.contains("= NaN, not < 0.5"), "{reason}");
}

#[tokio::test]
async fn a_promql_error_fails_with_prometheus_message() {
    let server = serve(vec![(
        StatusCode::BAD_REQUEST,
        r#"{"status":"error","errorType":"bad_data","error":"invalid parameter \"query\": 1:6: parse error: unexpected \"}\""}"#.to_string(),
    )])
    .await;
    let (value, reason) = failure(&run(&server, &gate("< 0.5", 0)).await);
    assert_eq!(value, None);
    assert!(
        reason.contains("Prometheus refused the query (bad_data): invalid parameter"),
        "{reason}"
    );
}

#[tokio::test]
async fn an_empty_result_fails() {
    let server = serve(vec![(
        StatusCode::OK,
        r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#.to_string(),
    )])
    .await;
    let (_, reason) = failure(&run(&server, &gate("< 0.5", 0)).await);
    assert!(reason.contains("returned no series"), "{reason}");
}

#[tokio::test]
async fn an_http_error_fails_with_its_status() {
    let server = serve(vec![(
        StatusCode::SERVICE_UNAVAILABLE,
        "Service Unavailable".to_string(),
    )])
    .await;
    let (_, reason) = failure(&run(&server, &gate("< 0.5", 0)).await);
    assert!(
        reason.contains("Prometheus answered HTTP 503 Service Unavailable"),
        "{reason}"
    );
}

#[tokio::test]
async fn an_unreachable_prometheus_fails_with_connection_refused() {
    // A port that was just free: nobody listens on it.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let prometheus = Prometheus::new(&format!("http://127.0.0.1:{port}")).unwrap();
    let outcome = evaluate(&prometheus, &gate("< 0.5", 0)).await;
    let (value, reason) = failure(&outcome);
    assert_eq!(value, None);
    assert!(
        reason.contains(&format!(
            "cannot reach Prometheus at http://127.0.0.1:{port}"
        )) && reason.contains("Connection refused"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_condition_that_breaks_before_the_hold_is_reached_fails() {
    // Good, good, then a violation before the hold is reached: the gate fails, never passes.
    let server = serve(vec![vector("1"), vector("2"), vector("0")]).await;
    let (value, reason) = failure(&run(&server, &gate(">= 1", 60_000)).await);
    assert_eq!(value, Some(0.0));
    assert!(reason.ends_with("= 0, not >= 1"), "{reason}");
}
