//! A real browser for the web console's tests and bench: Debian's headless Chromium driven over
//! WebDriver (`fantoccini`) through Debian's `chromedriver`, which [`Browser::start`] runs on a
//! free port of 127.0.0.1 with a profile in a temp dir of its own.
//!
//! Chromedriver runs in a process group of its own, and Chromium (its child) in the same group:
//! dropping the [`Browser`] SIGKILLs the whole group, so no browser outlives a failed test.
//! [`Browser::close`] ends the WebDriver session politely first.
//!
//! The browser accepts the coordinator's certificate without trusting its CA
//! (`acceptInsecureCerts`): the page is still HTTPS, so its session cookie is `Secure` as in
//! production.

use std::collections::HashSet;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fantoccini::elements::Element;
use fantoccini::error::CmdError;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// Where Debian puts them (`apt-get install chromium chromium-driver`).
pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// How long chromedriver may take to answer its first session request.
const DRIVER_START_TIMEOUT: Duration = Duration::from_secs(20);

/// How often [`Browser::wait_until`] asks the page.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How long [`Browser::click`] and [`Browser::type_into`] keep finding their element again
/// when the page replaced it under them. A time, not a count: on a loaded machine one find and
/// its action can take longer than the page takes to redraw, several times in a row.
const STALE_RETRY_WITHIN: Duration = Duration::from_secs(10);

/// The window the screenshots have.
pub const WINDOW: (u32, u32) = (1400, 1000);

/// Fails, naming the Debian packages, unless Chromium and chromedriver are installed.
pub fn require() -> anyhow::Result<()> {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|path| !Path::new(path).exists())
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "{} not installed: run `tests/run` (the README's test command installs what the suite \
         needs) or `apt-get install -y --no-install-recommends chromium chromium-driver`",
        missing.join(", ")
    );
    Ok(())
}

/// A headless Chromium under a chromedriver this process started.
pub struct Browser {
    client: Option<Client>,
    driver: Child,
    profile: tempfile::TempDir,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser")
            .field("driver_pid", &self.driver.id())
            .field("profile", &self.profile.path())
            .finish_non_exhaustive()
    }
}

impl Browser {
    /// Start chromedriver and open one headless Chromium session.
    pub async fn start() -> anyhow::Result<Self> {
        require()?;
        let profile = tempfile::Builder::new()
            .prefix("hotroll-chromium-")
            .tempdir()
            .context("cannot create a Chromium profile dir")?;
        let port = crate::free_port()?;
        let log = std::fs::File::create(profile.path().join("chromedriver.log"))
            .context("cannot create chromedriver's log")?;
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Its own group, which Chromium joins: Drop kills them together.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {CHROMEDRIVER}"))?;
        let mut browser = Self {
            client: None,
            driver,
            profile,
        };
        let client = browser.connect(port).await?;
        browser.client = Some(client);
        Ok(browser)
    }

    fn capabilities(&self) -> serde_json::Map<String, Value> {
        let (width, height) = WINDOW;
        let options = json!({
            "binary": CHROMIUM,
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-extensions",
                "--disable-breakpad",
                // `performance.memory` with real figures instead of bucketed ones (the bench).
                "--enable-precise-memory-info",
                format!("--user-data-dir={}", self.profile.path().join("profile").display()),
                format!("--window-size={width},{height}"),
            ],
        });
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert("acceptInsecureCerts".into(), json!(true));
        // A prompt (the abort reason) stays open until the test answers it.
        caps.insert("unhandledPromptBehavior".into(), json!("ignore"));
        caps.insert("goog:chromeOptions".into(), options);
        caps
    }

    async fn connect(&mut self, port: u16) -> anyhow::Result<Client> {
        let url = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            let attempt = ClientBuilder::new(connector)
                .capabilities(self.capabilities())
                .connect(&url)
                .await;
            match attempt {
                Ok(client) => return Ok(client),
                Err(e) => {
                    if let Ok(Some(status)) = self.driver.try_wait() {
                        bail!("chromedriver exited ({status}): {}", self.driver_log());
                    }
                    if started.elapsed() > DRIVER_START_TIMEOUT {
                        bail!(
                            "no Chromium session within {DRIVER_START_TIMEOUT:?}: {e}; \
                             chromedriver said: {}",
                            self.driver_log()
                        );
                    }
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
            }
        }
    }

    fn driver_log(&self) -> String {
        let text = std::fs::read_to_string(self.profile.path().join("chromedriver.log"))
            .unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// The WebDriver client.
    pub fn client(&self) -> anyhow::Result<&Client> {
        self.client.as_ref().context("the browser was closed")
    }

    /// Open `url` and wait for its load event.
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.client()?
            .goto(url)
            .await
            .with_context(|| format!("cannot open {url}"))
    }

    /// Run `script` (a function body: `return ...`) in the page.
    pub async fn eval(&self, script: &str) -> anyhow::Result<Value> {
        self.client()?
            .execute(script, Vec::new())
            .await
            .with_context(|| format!("the page could not run `{script}`"))
    }

    /// Evaluate `expression` in the page until it is truthy (neither false, null, 0 nor "");
    /// its value. Fails after `within`, naming `what` and the last value.
    pub async fn wait_until(
        &self,
        what: &str,
        within: Duration,
        expression: &str,
    ) -> anyhow::Result<Value> {
        let script = format!("return ({expression});");
        let started = Instant::now();
        loop {
            let value = self.eval(&script).await?;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
                Value::String(s) => !s.is_empty(),
                Value::Array(_) | Value::Object(_) => true,
            };
            if truthy {
                return Ok(value);
            }
            if started.elapsed() > within {
                bail!("{what}: not so within {within:?} (`{expression}` is {value})");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The text of the first element matching `css` (its `innerText`). Found and read in one
    /// script, so a page that replaces the element cannot come in between.
    pub async fn text(&self, css: &str) -> anyhow::Result<String> {
        let found = self
            .client()?
            .execute(
                "const found = document.querySelector(arguments[0]); \
                 return found === null ? null : found.innerText;",
                vec![Value::from(css)],
            )
            .await
            .with_context(|| format!("cannot read `{css}`"))?;
        match found {
            Value::String(text) => Ok(text),
            _ => bail!("no element `{css}`"),
        }
    }

    /// How many elements match `css`.
    pub async fn count(&self, css: &str) -> anyhow::Result<usize> {
        Ok(self.client()?.find_all(Locator::Css(css)).await?.len())
    }

    /// Type `text` into the element matching `css`.
    pub async fn type_into(&self, css: &str, text: &str) -> anyhow::Result<()> {
        self.on_element(css, |element| async move { element.send_keys(text).await })
            .await
    }

    /// Click the element matching `css`.
    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        self.on_element(css, |element| async move { element.click().await })
            .await
    }

    /// Finds the first element matching `css` and runs `act` on it. The console re-renders
    /// rows as events arrive, so the element found may be replaced before `act` reaches it
    /// (a stale element reference): then it is found again, for up to [`STALE_RETRY_WITHIN`].
    async fn on_element<T, F, Fut>(&self, css: &str, act: F) -> anyhow::Result<T>
    where
        F: Fn(Element) -> Fut,
        Fut: Future<Output = Result<T, CmdError>>,
    {
        let started = Instant::now();
        loop {
            let element = self
                .client()?
                .find(Locator::Css(css))
                .await
                .with_context(|| format!("no element `{css}`"))?;
            match act(element).await {
                Err(error)
                    if error.is_stale_element_reference()
                        && started.elapsed() < STALE_RETRY_WITHIN => {}
                result => return result.with_context(|| format!("on element `{css}`")),
            }
        }
    }

    /// Answer the open prompt with `text` and accept it.
    pub async fn answer_prompt(&self, text: &str) -> anyhow::Result<()> {
        let client = self.client()?;
        client.send_alert_text(text).await?;
        client.accept_alert().await?;
        Ok(())
    }

    /// Save a PNG of the window as `<target>/console-screenshots/<name>`; its path.
    pub async fn screenshot(&self, name: &str) -> anyhow::Result<PathBuf> {
        let png = self.client()?.screenshot().await?;
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let path = dir.join(name);
        std::fs::write(&path, png).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }

    /// Chromium's renderer processes (pids), as found under chromedriver in /proc.
    pub fn renderer_pids(&self) -> Vec<u32> {
        descendants(self.driver.id())
            .into_iter()
            .filter(|pid| {
                // Zygote-forked processes rewrite their title: one string, spaces between
                // the arguments instead of NULs.
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|cmdline| {
                        String::from_utf8_lossy(&cmdline)
                            .split(['\0', ' '])
                            .any(|arg| arg == "--type=renderer")
                    })
                    .unwrap_or(false)
            })
            .collect()
    }

    /// End the WebDriver session (Chromium quits), then chromedriver.
    pub async fn close(mut self) -> anyhow::Result<()> {
        if let Some(client) = self.client.take() {
            client.close().await.context("closing the browser")?;
        }
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.driver.id()) {
            // The whole group: chromedriver and every Chromium process.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.driver.wait();
    }
}

/// `<target>/console-screenshots`: `CARGO_TARGET_DIR` when set, else the workspace's `target`.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap_or(Path::new("."))
                .join("target")
        });
    target.join("console-screenshots")
}

/// Every process under `root` (not `root` itself), read from each /proc/PID/stat's parent.
fn descendants(root: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // `pid (comm) state ppid ...`: comm may hold spaces, so split after its `)`.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parents.push((pid, ppid));
            }
        }
    }
    let mut found: HashSet<u32> = HashSet::from([root]);
    loop {
        let before = found.len();
        for &(pid, ppid) in &parents {
            if found.contains(&ppid) {
                found.insert(pid);
            }
        }
        if found.len() == before {
            break;
        }
    }
    found.remove(&root);
    let mut pids: Vec<u32> = found.into_iter().collect();
    pids.sort_unstable();
    pids
}
