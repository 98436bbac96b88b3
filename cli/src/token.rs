//! `hotroll token` and `hotroll cert`: credentials, made on the coordinator's machine from its
//! data dir. Whoever can read and write the data dir (`tls/ca.key.pem`, `tokens/`) is the
//! administrator; these commands need no running server and no other credential, which is how
//! the first one is made (docs/security.md). A coordinator group's tokens are in its etcd
//! (`--etcd-endpoints`): access to that etcd is then the administrator's credential for tokens,
//! and a running leader is needed, since every write to it is fenced by the leader's epoch
//! (docs/ha.md).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use hotroll_script::DurationLimit;
use hotroll_tls::identity::valid_name;
use hotroll_tls::{Identity, Role, files};

use super::Output;
use hotroll_coordinator::auth::{TokenRole, TokenStore};
use hotroll_coordinator::tls::Pki;

/// Where the coordinator keeps its state, and optionally a CA of the operator's.
#[derive(Debug, Clone, clap::Args)]
pub struct DataDirArgs {
    /// The coordinator's data dir (as given to `hotroll serve --data-dir`).
    #[arg(long, env = "HOTROLL_DATA_DIR", default_value = "./hotroll-data")]
    pub data_dir: PathBuf,
    /// The CA certificate, when `serve` was given one (`--ca-cert`).
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The CA key, when `serve` was given one (`--ca-key`).
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
}

impl DataDirArgs {
    fn pki(&self) -> anyhow::Result<Pki> {
        match (&self.ca_cert, &self.ca_key) {
            (Some(cert), Some(key)) => Ok(Pki::from_files(cert, key)?),
            _ => Pki::ensure(&self.data_dir)
                .with_context(|| format!("cannot open the CA in {}", self.data_dir.display())),
        }
    }
}

/// Where the tokens are: the data dir's, or a coordinator group's in etcd.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenStoreArgs {
    /// The tokens of a coordinator group (`serve --store etcd`): the etcd cluster's client
    /// URLs, comma-separated. A token made there works on every coordinator of the group; it is
    /// written under the epoch of the coordinator that leads, so one must be running. The CA
    /// (for the token's pin) is still read from --data-dir or --ca-cert.
    #[arg(long, value_name = "URL[,URL..]", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// The group's key prefix (`serve --etcd-prefix`).
    #[arg(long, default_value = "/hotroll", value_name = "PREFIX")]
    pub etcd_prefix: String,
}

impl TokenStoreArgs {
    fn open(&self, data: &DataDirArgs) -> anyhow::Result<TokenStore> {
        if self.etcd_endpoints.is_empty() {
            return Ok(TokenStore::new(&data.data_dir));
        }
        for url in &self.etcd_endpoints {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                bail!("--etcd-endpoints: `{url}` must be an http:// or https:// URL");
            }
        }
        Ok(TokenStore::for_group(
            self.etcd_endpoints.clone(),
            &self.etcd_prefix,
        )?)
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Issue a token and print it (only the token on stdout; keep it secret). `--role agent`:
    /// single-use, for `hotroll-agent --join TOKEN`. `--role operator|viewer`: a bearer token
    /// for the CLI (`--token` or HOTROLL_TOKEN), usable until it expires or is revoked.
    Create(CreateArgs),
    /// List tokens (ids, roles, expiry, use; never the secrets).
    List(ListArgs),
    /// Revoke a token by its id (at least 8 characters of it, from `hotroll token list`).
    Revoke(RevokeArgs),
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    #[arg(long, value_parser = token_role())]
    pub role: TokenRole,
    /// How long the token stays valid, e.g. 30m, 1h, 7d (default: 1h for agent tokens, 24h for
    /// operator and viewer tokens; at most 365d).
    #[arg(long, value_parser = parse_long_duration)]
    pub ttl: Option<Duration>,
    /// Agent tokens: the only node name the token may join as. Also lets a node that already
    /// has a certificate get a new one (e.g. after losing its data dir).
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    #[command(flatten)]
    pub data: DataDirArgs,
    #[command(flatten)]
    pub store: TokenStoreArgs,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub data: DataDirArgs,
    #[command(flatten)]
    pub store: TokenStoreArgs,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    pub id: String,
    #[command(flatten)]
    pub data: DataDirArgs,
    #[command(flatten)]
    pub store: TokenStoreArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum CertCommand {
    /// Issue a client certificate for the CLI (`--cert`, `--key`) into a directory:
    /// `<name>.pem`, `<name>.key` (0600) and `ca.pem`.
    Issue(IssueArgs),
}

#[derive(Debug, clap::Args)]
pub struct IssueArgs {
    #[arg(long, value_enum)]
    pub role: ClientRole,
    /// Who the certificate is for (1-253 characters of [A-Za-z0-9._-]).
    #[arg(long)]
    pub name: String,
    /// Directory to write the files to.
    #[arg(long)]
    pub out: PathBuf,
    /// Validity, e.g. 12h, 30d (default 30d, at most 365d).
    #[arg(long, value_parser = parse_long_duration, default_value = "30d")]
    pub ttl: Duration,
    #[command(flatten)]
    pub data: DataDirArgs,
}

/// `--role agent|operator|viewer`, listed in `--help` and checked by clap.
fn token_role() -> impl clap::builder::TypedValueParser<Value = TokenRole> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(TokenRole::ALL.map(TokenRole::as_str))
        .try_map(|text| text.parse::<TokenRole>())
}

/// The roles a CLI certificate can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientRole {
    Operator,
    Viewer,
}

/// Longest `--ttl` of tokens and client certificates.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// `<integer><unit>` with unit ms, s, m, h or d, greater than zero and at most [`MAX_TTL`].
pub fn parse_long_duration(text: &str) -> Result<Duration, String> {
    hotroll_script::parse_duration_within(text, DurationLimit::with_days(MAX_TTL))
        .map_err(|e| e.to_string())
}

/// `hotroll token ...` (local: reads and writes the data dir, no server needed).
pub async fn run_token(command: TokenCommand) -> anyhow::Result<u8> {
    token(&command).map(|()| crate::exit::OK)
}

fn token(command: &TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create(args) => create(args),
        TokenCommand::List(args) => list(args),
        TokenCommand::Revoke(args) => {
            let removed = args.store.open(&args.data)?.revoke(&args.id)?;
            if removed == 0 {
                bail!("no live token has an id starting with `{}`", args.id);
            }
            eprintln!("revoked {removed} token(s)");
            Ok(())
        }
    }
}

fn create(args: &CreateArgs) -> anyhow::Result<()> {
    if let Some(node) = &args.node {
        if args.role != TokenRole::Agent {
            bail!("--node is for agent tokens");
        }
        if !valid_name(node) {
            bail!("`{node}` is not a valid node name: use 1-253 characters of [A-Za-z0-9._-]");
        }
    }
    let ttl = args.ttl.unwrap_or(match args.role {
        TokenRole::Agent => hotroll_coordinator::auth::DEFAULT_TOKEN_TTL,
        TokenRole::Operator | TokenRole::Viewer => Duration::from_secs(24 * 3600),
    });
    let pki = args.data.pki()?;
    let store = args.store.open(&args.data)?;
    let (token, record) = store.create(pki.ca_pin(), args.role, ttl, args.node.clone())?;
    match args.output {
        Output::Text => {
            println!("{}", token.expose());
            eprintln!(
                "{} token {} valid for {}{}",
                args.role.as_str(),
                hotroll_tls::token::short_id(&token.id()),
                humanize(ttl),
                match (&args.node, args.role) {
                    (Some(node), _) => format!(", single-use, for node `{node}`"),
                    (None, TokenRole::Agent) => ", single-use".to_string(),
                    _ => String::new(),
                }
            );
        }
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "token": token.expose(),
                "id": hotroll_tls::token::short_id(&token.id()),
                "role": record.role,
                "node": record.node,
                "expires_unix_ms": record.expires_unix_ms,
            })
        ),
    }
    Ok(())
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

fn list(args: &ListArgs) -> anyhow::Result<()> {
    let tokens = args.store.open(&args.data)?.list()?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&tokens)?),
        Output::Text => {
            let mut table = comfy_table::Table::new();
            table.load_preset(comfy_table::presets::NOTHING);
            table.set_header(["ID", "ROLE", "NODE", "EXPIRES (unix ms)", "STATE"]);
            for t in tokens {
                let state = match (&t.record.used_by, t.used, t.expired) {
                    (Some(by), _, _) => format!("used by {by}"),
                    (None, true, _) => "used".to_string(),
                    (None, false, true) => "expired".to_string(),
                    (None, false, false) => "live".to_string(),
                };
                table.add_row([
                    t.id,
                    t.record.role.as_str().to_string(),
                    t.record.node.unwrap_or_default(),
                    t.record.expires_unix_ms.to_string(),
                    state,
                ]);
            }
            println!("{table}");
        }
    }
    Ok(())
}

/// `hotroll cert issue` (local, like `token`).
pub async fn run_cert(command: CertCommand) -> anyhow::Result<u8> {
    cert(&command).map(|()| crate::exit::OK)
}

fn cert(command: &CertCommand) -> anyhow::Result<()> {
    let CertCommand::Issue(args) = command;
    if !valid_name(&args.name) {
        bail!(
            "`{}` is not a valid name: use 1-253 characters of [A-Za-z0-9._-]",
            args.name
        );
    }
    let role = match args.role {
        ClientRole::Operator => Role::Operator,
        ClientRole::Viewer => Role::Viewer,
    };
    let pki = args.data.pki()?;
    let key = rcgen::KeyPair::generate()?;
    let (cert, info) = pki.issue_client(&Identity::new(role, &args.name), &key, args.ttl)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let key_path = args.out.join(format!("{}.key", args.name));
    let cert_path = args.out.join(format!("{}.pem", args.name));
    files::write_secret(&key_path, key.serialize_pem().as_bytes())?;
    files::write_public(&cert_path, cert.as_bytes())?;
    files::write_public(&args.out.join("ca.pem"), pki.ca_pem().as_bytes())?;
    println!(
        "{role} certificate for `{}` (serial {}) in {}: --cert {} --key {} --ca {}",
        args.name,
        info.serial,
        args.out.display(),
        cert_path.display(),
        key_path.display(),
        args.out.join("ca.pem").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_durations() {
        assert_eq!(
            parse_long_duration("7d"),
            Ok(Duration::from_secs(7 * 86_400))
        );
        assert_eq!(parse_long_duration("90m"), Ok(Duration::from_secs(5_400)));
        assert!(parse_long_duration("0s").is_err());
        assert!(parse_long_duration("366d").is_err());
        assert!(parse_long_duration("1y").is_err());
        assert!(parse_long_duration("d").is_err());
        assert!(parse_long_duration("99999999999999999999d").is_err());
    }
}
