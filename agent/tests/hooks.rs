//! Hook runner: output capture, exit status, timeouts and cancellation kill the whole process
//! group. No coordinator and no parser needed.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{assert_gone, hang_pids};
use hotroll_agent::HookConfig;
use hotroll_agent::cancel::{CancelSource, CancelToken};
use hotroll_agent::hooks::{self, Ending, HookError, Invocation, OUTPUT_TAIL_BYTES};

fn sh(body: &str) -> HookConfig {
    HookConfig {
        command: vec!["sh".into(), "-c".into(), body.into(), "hook".into()],
        timeout: None,
    }
}

async fn run(
    hook: &HookConfig,
    args: &[String],
    cwd: &Path,
    timeout: Duration,
    cancel: &CancelToken,
) -> Result<hooks::HookRun, HookError> {
    let env = vec![("HOTROLL_STEP".to_string(), "7".to_string())];
    hooks::run(
        &Invocation {
            name: "test",
            hook,
            args,
            cwd,
            env: &env,
            timeout,
        },
        cancel,
    )
    .await
}

#[tokio::test]
async fn captures_output_args_env_and_cwd() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let hook = sh("echo \"arg=$1 step=$HOTROLL_STEP\"; echo oops >&2; pwd");
    let run = run(
        &hook,
        &["x y".into()],
        dir.path(),
        Duration::from_secs(10),
        &CancelToken::never(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(run.succeeded(), "{run:?}");
    assert_eq!(run.error(), None);
    let cwd = dir.path().canonicalize().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        run.output,
        format!("arg=x y step=7\noops\n{}\n", cwd.display())
    );
}

#[tokio::test]
async fn non_zero_exit_is_a_failure_with_the_output_tail() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let run = run(
        &sh("echo broken >&2; exit 3"),
        &[],
        dir.path(),
        Duration::from_secs(10),
        &CancelToken::never(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(run.ending, Ending::Exited(3));
    assert_eq!(
        run.error().as_deref(),
        Some("hook `test` exited with status 3: broken")
    );
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let pids_file = dir.path().join("pids");
    let hook = sh("echo $$ > \"$1\"; sleep 1000 & echo $! >> \"$1\"; sleep 1000");
    let started = Instant::now();
    let run = run(
        &hook,
        &[pids_file.display().to_string()],
        dir.path(),
        Duration::from_millis(500),
        &CancelToken::never(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(run.ending, Ending::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        run.error()
            .unwrap_or_default()
            .contains("timed out after 500ms"),
        "{run:?}"
    );
    let pids = hang_pids(&pids_file).await;
    assert_gone(&pids).await;
}

#[tokio::test]
async fn cancelling_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let pids_file = dir.path().join("pids");
    let hook = sh("echo $$ > \"$1\"; sleep 1000 & echo $! >> \"$1\"; sleep 1000");
    let cancel = CancelSource::new();
    let token = cancel.token();
    let args = [pids_file.display().to_string()];
    let running = run(&hook, &args, dir.path(), Duration::from_secs(60), &token);
    let canceller = async {
        let pids = hang_pids(&pids_file).await;
        cancel.cancel();
        pids
    };
    let (run, pids) = tokio::join!(running, canceller);
    let run = run.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(run.ending, Ending::Cancelled);
    assert_gone(&pids).await;
}

#[tokio::test]
async fn processes_left_behind_are_killed_when_the_hook_exits() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let pid_file = dir.path().join("pid");
    let hook = sh("sleep 1000 & echo $! > \"$1\"; echo done");
    let started = Instant::now();
    let run = run(
        &hook,
        &[pid_file.display().to_string()],
        dir.path(),
        Duration::from_secs(30),
        &CancelToken::never(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(run.succeeded(), "{run:?}");
    assert_eq!(run.output, "done\n");
    assert!(started.elapsed() < Duration::from_secs(5));
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_gone(&[pid]).await;
}

#[tokio::test]
async fn only_the_tail_of_the_output_is_kept() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // 2000 numbered lines, ~ 20 KiB.
    let hook = sh("i=0; while [ $i -lt 2000 ]; do echo \"line $i xxxxx\"; i=$((i+1)); done");
    let run = run(
        &hook,
        &[],
        dir.path(),
        Duration::from_secs(30),
        &CancelToken::never(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(run.succeeded());
    assert!(run.output.starts_with('['), "{}", &run.output[..40]);
    assert!(run.output.ends_with("line 1999 xxxxx\n"));
    assert!(run.output.len() <= OUTPUT_TAIL_BYTES + 64);
}

#[tokio::test]
async fn a_missing_program_is_reported() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let hook = HookConfig {
        command: vec!["/nonexistent/migrate".into()],
        timeout: None,
    };
    match run(
        &hook,
        &[],
        dir.path(),
        Duration::from_secs(1),
        &CancelToken::never(),
    )
    .await
    {
        Err(e @ HookError::Spawn { .. }) => {
            let text = e.to_string();
            assert!(text.contains("/nonexistent/migrate"), "{text}");
        }
        other => panic!("expected a spawn error, got {other:?}"),
    }
}
