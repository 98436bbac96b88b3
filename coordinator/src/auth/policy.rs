//! Who may call what: the callers ([`Principal`], [`NodeIdentity`]), what each gRPC method
//! needs ([`METHODS`], one row per method, deny by default), and the one check that needs a
//! decoded message, an agent's Hello against its certificate ([`check_hello`]).

use std::net::IpAddr;
use std::time::SystemTime;

use hotroll_proto::v1 as pb;
use hotroll_tls::{Identity, Role};
use tonic::Status;

use super::limits::hello_out_of_bounds;
use super::tokens::TokenRole;

/// What a gRPC method needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Nothing at the door: the request carries its own credential, which the service checks
    /// (Join: a join token).
    Open,
    /// A node certificate (agent sessions, artifact download, certificate renewal).
    Node,
    /// An operator or viewer: list, show, watch.
    Read,
    /// An operator: upload, start, abort, pause, resume, promote.
    Write,
}

/// One gRPC method and what it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodRule {
    /// The request path, `/<package>.<Service>/<Method>`.
    pub path: &'static str,
    pub access: Access,
    /// What a caller refused it was trying to do, in words ("may not {action}").
    pub action: &'static str,
}

const fn rule(path: &'static str, access: Access, action: &'static str) -> MethodRule {
    MethodRule {
        path,
        access,
        action,
    }
}

/// Every method the coordinator serves. A method missing here is refused (a unit test checks
/// that every method of the proto's services has its row).
pub const METHODS: &[MethodRule] = &[
    rule("/hotroll.v1.Agent/Session", Access::Node, "open a session"),
    rule(
        "/hotroll.v1.Agent/FetchArtifact",
        Access::Node,
        "fetch an artifact",
    ),
    rule(
        "/hotroll.v1.Control/UploadArtifact",
        Access::Write,
        "start rollout (upload its artifacts)",
    ),
    rule(
        "/hotroll.v1.Control/HasArtifacts",
        Access::Write,
        "start rollout (check its artifacts)",
    ),
    rule(
        "/hotroll.v1.Control/StartRollout",
        Access::Write,
        "start rollout",
    ),
    rule(
        "/hotroll.v1.Control/GetRollout",
        Access::Read,
        "get rollout",
    ),
    rule(
        "/hotroll.v1.Control/ListRollouts",
        Access::Read,
        "list rollouts",
    ),
    rule(
        "/hotroll.v1.Control/WatchRollout",
        Access::Read,
        "watch rollout",
    ),
    rule("/hotroll.v1.Control/ListNodes", Access::Read, "list nodes"),
    rule(
        "/hotroll.v1.Control/AbortRollout",
        Access::Write,
        "abort rollout",
    ),
    rule(
        "/hotroll.v1.Control/PauseRollout",
        Access::Write,
        "pause rollout",
    ),
    rule(
        "/hotroll.v1.Control/ResumeRollout",
        Access::Write,
        "resume rollout",
    ),
    rule(
        "/hotroll.v1.Control/PromoteRollout",
        Access::Write,
        "promote rollout",
    ),
    rule("/hotroll.v1.Identity/Join", Access::Open, "join"),
    rule(
        "/hotroll.v1.Identity/Renew",
        Access::Node,
        "renew a node certificate",
    ),
];

/// The rule of the method at `path`; `None` (refuse) for a method the table does not know.
pub fn rule_for(path: &str) -> Option<&'static MethodRule> {
    METHODS.iter().find(|rule| rule.path == path)
}

/// Who is calling the Control service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// TLS is off: no identity, every right.
    Anonymous(Option<IpAddr>),
    /// A client certificate's identity.
    Cert(Identity),
    /// A bearer token (its short id) and its role.
    Token { id: String, role: TokenRole },
}

impl Principal {
    /// Whether this principal may call a method that needs `access`.
    pub fn may(&self, access: Access) -> bool {
        match (self, access) {
            (Principal::Anonymous(_), _) | (_, Access::Open) => true,
            // Node access is a node certificate's, never a CLI credential's.
            (_, Access::Node) => false,
            (Principal::Cert(id), Access::Read) => matches!(id.role, Role::Operator | Role::Viewer),
            (Principal::Cert(id), Access::Write) => id.role == Role::Operator,
            (Principal::Token { role, .. }, Access::Read) => {
                matches!(role, TokenRole::Operator | TokenRole::Viewer)
            }
            (Principal::Token { role, .. }, Access::Write) => *role == TokenRole::Operator,
        }
    }

    /// The key per-client limits are counted under.
    pub fn client_key(&self) -> String {
        match self {
            Principal::Anonymous(Some(ip)) => format!("ip:{ip}"),
            Principal::Anonymous(None) => "anonymous".into(),
            Principal::Cert(id) => format!("cert:{}", id.uri()),
            Principal::Token { id, .. } => format!("token:{id}"),
        }
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Anonymous(_) => f.write_str("anonymous (TLS off)"),
            Principal::Cert(id) => write!(f, "{id} (certificate)"),
            Principal::Token { id, role } => write!(f, "{} token {id}…", role.as_str()),
        }
    }
}

/// The node a caller's certificate names, put in the request's extensions by the guard (see
/// `guards`) for the services to compare with what the caller says (Hello, artifact fetch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    pub name: String,
    pub not_after: SystemTime,
}

/// Refuse a Hello whose node name is not the certificate's, or that is out of bounds.
#[allow(clippy::result_large_err)]
pub fn check_hello(
    identity: Option<&NodeIdentity>,
    hello: &pb::Hello,
    peer: &str,
) -> Result<(), Status> {
    if let Some(identity) = identity
        && identity.name != hello.node
    {
        tracing::warn!(%peer, certificate = %identity.name, hello = %hello.node, "session refused: the Hello names another node than the certificate");
        return Err(Status::permission_denied(format!(
            "this agent's certificate is for node `{}`, but its Hello says `{}`; an agent may \
             only speak for the node its certificate names",
            identity.name,
            hello.node.escape_debug()
        )));
    }
    if let Some(problem) = hello_out_of_bounds(hello) {
        tracing::warn!(%peer, node = %hello.node, %problem, "session refused: Hello out of bounds");
        return Err(Status::invalid_argument(format!("the Hello has {problem}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// `/<package>.<Service>/<Method>` of every rpc in the proto file.
    fn proto_methods(proto: &str) -> Vec<String> {
        let mut package = String::new();
        let mut service: Option<String> = None;
        let mut methods = Vec::new();
        for line in proto.lines() {
            let code = line.split("//").next().unwrap_or_default().trim();
            if let Some(name) = code.strip_prefix("package ") {
                package = name.trim_end_matches(';').trim().to_string();
            } else if let Some(rest) = code.strip_prefix("service ") {
                service = rest.split_whitespace().next().map(str::to_string);
            } else if let (Some(rest), Some(service)) = (code.strip_prefix("rpc "), &service) {
                let method = rest.split('(').next().unwrap_or_default().trim();
                methods.push(format!("/{package}.{service}/{method}"));
            } else if code.starts_with('}') {
                service = None;
            }
        }
        methods
    }

    #[test]
    fn every_method_of_the_proto_has_exactly_one_rule() {
        let proto = include_str!("../../../proto/hotroll.proto");
        let methods = proto_methods(proto);
        // The parse found the services the server mounts (names as the generated code has them).
        for service in [
            pb::agent_server::SERVICE_NAME,
            pb::control_server::SERVICE_NAME,
            pb::identity_server::SERVICE_NAME,
        ] {
            assert!(
                methods
                    .iter()
                    .any(|m| m.starts_with(&format!("/{service}/"))),
                "no methods of {service} in the proto: {methods:?}"
            );
        }
        let in_proto: BTreeSet<&str> = methods.iter().map(String::as_str).collect();
        let in_table: BTreeSet<&str> = METHODS.iter().map(|r| r.path).collect();
        assert_eq!(in_table.len(), METHODS.len(), "a method has two rules");
        let missing: Vec<_> = in_proto.difference(&in_table).collect();
        assert!(missing.is_empty(), "methods without a rule: {missing:?}");
        let stale: Vec<_> = in_table.difference(&in_proto).collect();
        assert!(
            stale.is_empty(),
            "rules for methods the proto lacks: {stale:?}"
        );
    }

    #[test]
    fn an_unknown_method_has_no_rule() {
        assert!(rule_for("/hotroll.v1.Control/DropDatabase").is_none());
        assert!(rule_for("/hotroll.v1.Control/").is_none());
        assert!(rule_for("").is_none());
        assert_eq!(
            rule_for("/hotroll.v1.Control/StartRollout").map(|r| r.access),
            Some(Access::Write)
        );
    }

    #[test]
    fn viewers_read_operators_write_and_no_client_is_a_node() {
        let viewer = Principal::Token {
            id: "abc".into(),
            role: TokenRole::Viewer,
        };
        let operator = Principal::Cert(Identity::new(Role::Operator, "alice"));
        assert!(viewer.may(Access::Read) && !viewer.may(Access::Write));
        assert!(operator.may(Access::Read) && operator.may(Access::Write));
        assert!(!viewer.may(Access::Node) && !operator.may(Access::Node));
        assert!(Principal::Anonymous(None).may(Access::Node));
    }
}
