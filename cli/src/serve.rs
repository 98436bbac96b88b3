//! `hotroll serve`: run the coordinator.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use hotroll_coordinator::group::{self, GroupOptions};
use hotroll_coordinator::server::{self, ServerConfig};
use hotroll_coordinator::store::RedbStore;

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on for agents and the CLI.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Directory for the coordinator's store and artifacts.
    #[arg(long, default_value = "./hotroll-data")]
    pub data_dir: PathBuf,
    /// Heartbeat interval of the sessions of nodes a running rollout targets; a heartbeat
    /// unanswered for three intervals ends a session.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// Heartbeat interval of idle nodes' sessions (no running rollout targets them): an idle
    /// fleet costs next to nothing, and a node that dies while idle shows disconnected within
    /// this plus three heartbeat intervals. Raised to --heartbeat-interval when shorter, and
    /// stretched in large fleets to at most 200 idle heartbeats a second (10,000 nodes: 50 s).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub idle_heartbeat_interval: Duration,
    /// How long a node whose session dropped may take to come back during a rollout.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub session_grace: Duration,
    /// Time granted over an instruction's own timeout before a silent node counts as failed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub step_slack: Duration,
    /// Serve Prometheus metrics (OpenMetrics text) over HTTP on this address, path /metrics:
    /// connected agents, rollouts by state, instruction durations, barrier waits, rollbacks,
    /// artifact bytes sent. Not served unless given.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the web console on this address: the fleet, the rollouts and each rollout live, for
    /// viewer and operator tokens (a login exchanges one for a session cookie). HTTPS with the
    /// coordinator's certificate; plain HTTP under --insecure (tokens still required). Not served
    /// unless given.
    #[arg(long, value_name = "ADDR")]
    pub ui_listen: Option<SocketAddr>,
    /// The Prometheus that fleet gates ([[rollout.gates]]) query, e.g. http://127.0.0.1:9090
    /// (HTTP API, instant queries). Without it a rollout whose script has gates does not start.
    #[arg(long, value_name = "URL")]
    pub prometheus: Option<String>,
    /// Events buffered per rollout for live watchers; a watcher that falls further behind is
    /// told to reconnect from its last event (the CLI does so on its own). The rollout never
    /// waits for a watcher.
    #[arg(long, default_value_t = hotroll_coordinator::server::DEFAULT_WATCH_BUFFER, value_name = "EVENTS",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub watch_buffer: usize,
    /// Log format on stderr: `text` (human-readable; colours on a terminal) or `json` (one
    /// object per line, for log shippers). The level follows RUST_LOG (default: info).
    #[arg(long, value_enum, default_value_t)]
    pub log_format: LogFormat,
    /// Serve plaintext HTTP/2 with no authentication at all (agents and CLI then need
    /// --insecure too). Only for a trusted network or a test.
    #[arg(long)]
    pub insecure: bool,
    /// More names (DNS names or IP addresses) agents and the CLI reach this coordinator by,
    /// for its server certificate (it always names localhost, 127.0.0.1, ::1, this host's name
    /// and the --listen address). Repeatable.
    #[arg(long = "tls-san", value_name = "NAME")]
    pub tls_san: Vec<String>,
    /// Serve this certificate (PEM chain) instead of one issued by the coordinator's CA;
    /// reloaded when the file changes.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Use this CA (certificate and key, PEM) to issue and verify node and client
    /// certificates, instead of the one made in `<data-dir>/tls` on first start.
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The key of --ca-cert.
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Validity of node certificates; agents renew theirs when a third is left.
    #[arg(long, default_value = "30d", value_parser = crate::token::parse_long_duration)]
    pub node_cert_ttl: Duration,
    /// Validity of the server certificate the coordinator issues itself; it is reissued, while
    /// serving, when a third is left.
    #[arg(long, default_value = "90d", value_parser = crate::token::parse_long_duration)]
    pub server_cert_ttl: Duration,
    /// Where the coordinator keeps its durable state: `redb` (one file in --data-dir, for one
    /// coordinator) or `etcd` (a group of coordinators: one leader, the others standbys that
    /// take over when it is lost; needs --etcd-endpoints and --advertise).
    #[arg(long, value_enum, default_value_t = StoreKind::Redb)]
    pub store: StoreKind,
    /// Client URLs of the etcd cluster's members, comma-separated
    /// (`http://10.0.0.1:2379,http://10.0.0.2:2379`); with --store etcd.
    #[arg(long, value_name = "URL[,URL..]", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Every key of the group starts with this prefix: coordinators of one group share it.
    #[arg(long, default_value = "/hotroll", value_name = "PREFIX")]
    pub etcd_prefix: String,
    /// The URL agents and the CLI reach this coordinator at; standbys send them to the
    /// leader's. With --store etcd.
    #[arg(long, value_name = "URL")]
    pub advertise: Option<String>,
    /// The leader's lease in etcd: a leader that cannot renew it for this long stops acting,
    /// and a standby takes over after at most about this long.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    /// How often the server certificate is checked for renewal (or, with --tls-cert, reload).
    #[arg(long, default_value = "60s", value_parser = parse_duration, hide = true)]
    pub cert_check_interval: Duration,
}

/// Where `hotroll serve` keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    Redb,
    Etcd,
}

impl ServeArgs {
    /// The group this coordinator joins with --store etcd; `None` for redb.
    fn group(&self) -> anyhow::Result<Option<GroupOptions>> {
        if self.store == StoreKind::Redb {
            if !self.etcd_endpoints.is_empty() || self.advertise.is_some() {
                anyhow::bail!("--etcd-endpoints and --advertise need --store etcd");
            }
            return Ok(None);
        }
        if self.etcd_endpoints.is_empty() {
            anyhow::bail!("--store etcd needs --etcd-endpoints URL[,URL..]");
        }
        let Some(advertise) = self.advertise.clone() else {
            anyhow::bail!(
                "--store etcd needs --advertise URL: the address standbys send agents and the CLI to"
            );
        };
        if !(advertise.starts_with("http://") || advertise.starts_with("https://")) {
            anyhow::bail!("--advertise `{advertise}` must be an http:// or https:// URL");
        }
        for url in &self.etcd_endpoints {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                anyhow::bail!("--etcd-endpoints: `{url}` must be an http:// or https:// URL");
            }
        }
        if !self.etcd_prefix.starts_with('/') {
            anyhow::bail!("--etcd-prefix `{}` must start with /", self.etcd_prefix);
        }
        let mut group = GroupOptions::new(self.etcd_endpoints.clone(), advertise);
        group.prefix = self.etcd_prefix.clone();
        group.lease_ttl = self.lease_ttl.max(Duration::from_secs(1));
        Ok(Some(group))
    }

    /// The TLS setup these flags ask for; `None` with --insecure.
    pub fn tls(&self) -> anyhow::Result<Option<Arc<hotroll_coordinator::tls::ServerTls>>> {
        use hotroll_coordinator::tls::{ServerCertSource, ServerTls, TlsOptions};
        if self.insecure {
            return Ok(None);
        }
        let listen_ip = self.listen.parse::<SocketAddr>().ok().map(|a| a.ip());
        let mut options = TlsOptions::new(self.data_dir.clone(), listen_ip, &self.tls_san);
        if let (Some(cert), Some(key)) = (&self.ca_cert, &self.ca_key) {
            options.ca_files = Some((cert.clone(), key.clone()));
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                options.server_cert = ServerCertSource::Files {
                    cert: cert.clone(),
                    key: key.clone(),
                };
            }
            _ => {
                if let ServerCertSource::Managed { ttl, .. } = &mut options.server_cert {
                    *ttl = self.server_cert_ttl;
                }
            }
        }
        options.node_cert_ttl = self.node_cert_ttl;
        options.refresh_interval = self.cert_check_interval;
        let tls = ServerTls::new(options).context("cannot set up TLS")?;
        Ok(Some(Arc::new(tls)))
    }
}

/// `--log-format` of the daemons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Log through `tracing` to stderr in `format`, at the level RUST_LOG says (default: info).
pub fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(false)
            .flatten_event(true)
            .init(),
    }
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    hotroll_script::duration::parse_duration(text).map_err(|e| e.to_string())
}

/// `hotroll serve`: logs set up from `--log-format`, then the coordinator until SIGINT/SIGTERM.
pub async fn run(args: ServeArgs) -> anyhow::Result<u8> {
    init_tracing(args.log_format);
    serve(args).await.map(|()| crate::exit::OK)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let group = args.group()?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let mut config = ServerConfig::new(args.data_dir.clone());
    config.heartbeat_interval = args.heartbeat_interval;
    config.idle_heartbeat_interval = args.idle_heartbeat_interval;
    config.session_grace = args.session_grace;
    config.step_slack = args.step_slack;
    config.metrics_listen = args.metrics_listen;
    config.ui_listen = args.ui_listen;
    config.prometheus = args
        .prometheus
        .as_deref()
        .map(hotroll_coordinator::gate::Prometheus::new)
        .transpose()
        .context("--prometheus")?;
    config.watch_buffer = args.watch_buffer;
    config.tls = args.tls()?;
    if config.tls.is_none() {
        tracing::warn!(
            "TLS is off (--insecure): anyone who can reach {} can run rollouts on every node",
            args.listen
        );
    }
    match group {
        Some(group) => group::run(listener, config, group, shutdown_signal()).await?,
        None => {
            let store = RedbStore::open(&args.data_dir)
                .with_context(|| format!("cannot open the store in {}", args.data_dir.display()))?;
            server::run(listener, Arc::new(store), config, shutdown_signal()).await?
        }
    }
    tracing::info!("coordinator stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
