//! The Identity service: `Join` (a join token and a CSR for a node certificate) and `Renew`
//! (the current node certificate and a CSR for a new one), and the record of the latest
//! certificate issued to each node.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use hotroll_proto::v1 as pb;
use hotroll_tls::identity::{unix_ms, valid_name};
use hotroll_tls::token::short_id;
use hotroll_tls::{CertInfo, Identity, Role, files};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use super::credentials::{Auth, Caller};
use super::policy::NodeIdentity;
use super::tokens::{TokenError, TokenRole};
use crate::tls::ServerTls;

/// The latest certificate issued to each node (`<data_dir>/tls/nodes/<name>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IssuedCert {
    pub serial: String,
    pub not_after_unix_ms: u64,
    pub issued_unix_ms: u64,
}

fn issued_path(data_dir: &Path, node: &str) -> PathBuf {
    crate::tls::tls_dir(data_dir)
        .join("nodes")
        .join(format!("{node}.json"))
}

fn read_issued(data_dir: &Path, node: &str) -> Option<IssuedCert> {
    let bytes = std::fs::read(issued_path(data_dir, node)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn record_issued(data_dir: &Path, node: &str, info: &CertInfo) {
    let record = IssuedCert {
        serial: info.serial.clone(),
        not_after_unix_ms: info.not_after_unix_ms(),
        issued_unix_ms: unix_ms(SystemTime::now()),
    };
    let path = issued_path(data_dir, node);
    let result = serde_json::to_vec_pretty(&record)
        .map_err(|e| e.to_string())
        .and_then(|bytes| files::write_public(&path, &bytes).map_err(|e| e.to_string()));
    if let Err(e) = result {
        tracing::error!(node, error = %e, "cannot record the issued certificate");
    }
}

/// `Join` (token + CSR → node certificate) and `Renew` (current certificate + CSR → new one).
#[derive(Debug)]
pub struct IdentityService {
    pub auth: Arc<Auth>,
}

#[allow(clippy::result_large_err)]
fn parse_csr(pem: &str) -> Result<rcgen::CertificateSigningRequestParams, Status> {
    if pem.len() > 16 * 1024 {
        return Err(Status::invalid_argument("the CSR is larger than 16 KiB"));
    }
    rcgen::CertificateSigningRequestParams::from_pem(pem).map_err(|e| {
        Status::invalid_argument(format!(
            "not a valid certificate signing request (PEM PKCS#10, signed by its key): {e}"
        ))
    })
}

impl IdentityService {
    #[allow(clippy::result_large_err)]
    fn tls(&self) -> Result<&Arc<ServerTls>, Status> {
        self.auth.tls.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this coordinator runs without TLS (--insecure): nodes need no certificate",
            )
        })
    }

    #[allow(clippy::result_large_err)]
    fn issue(
        &self,
        tls: &ServerTls,
        node: &str,
        csr: &rcgen::CertificateSigningRequestParams,
    ) -> Result<(pb::CertificateResponse, CertInfo), Status> {
        let (pem, info) = tls
            .pki()
            .issue_client(
                &Identity::new(Role::Node, node),
                &csr.public_key,
                tls.node_cert_ttl(),
            )
            .map_err(|e| Status::internal(format!("cannot issue the certificate: {e}")))?;
        Ok((
            pb::CertificateResponse {
                certificate_pem: pem,
                ca_pem: tls.pki().ca_pem().to_string(),
                not_after_unix_ms: info.not_after_unix_ms(),
            },
            info,
        ))
    }
}

#[tonic::async_trait]
impl pb::identity_server::Identity for IdentityService {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        let tls = self.tls()?.clone();
        let caller = Caller::at(request.remote_addr());
        let (ip, peer) = (caller.ip(), caller.peer());
        let join = request.into_inner();
        let (token, record) =
            self.auth
                .token_from(&caller, &join.token, &[TokenRole::Agent], "join")?;
        let fail = |status: Status| {
            if let Some(ip) = ip {
                self.auth.throttle.failed(ip);
            }
            status
        };
        if !valid_name(&join.node) {
            return Err(Status::invalid_argument(format!(
                "node name `{}` is not valid: use 1-253 characters of [A-Za-z0-9._-]",
                join.node.escape_debug()
            )));
        }
        if let Some(bound) = &record.node
            && *bound != join.node
        {
            tracing::warn!(%peer, node = %join.node, token = short_id(&token.id()), "join refused: token bound to another node");
            return Err(fail(Status::permission_denied(
                TokenError::WrongNode(bound.clone()).to_string(),
            )));
        }
        if record.node.is_none()
            && let Some(issued) = read_issued(tls.data_dir(), &join.node)
            && issued.not_after_unix_ms > unix_ms(SystemTime::now())
        {
            tracing::warn!(%peer, node = %join.node, "join refused: the node already has a certificate");
            return Err(Status::already_exists(format!(
                "node `{}` already has a certificate (serial {}); to give it a new one, create \
                 a token bound to it: `hotroll token create --role agent --node {}`",
                join.node, issued.serial, join.node
            )));
        }
        let csr = parse_csr(&join.csr_pem)?;
        let (response, info) = self.issue(&tls, &join.node, &csr)?;
        // Only now is the token used up; of two concurrent joins with one token, one wins.
        if let Err(e) = self
            .auth
            .tokens
            .as_ref()
            .map_or(Ok(()), |t| t.redeem(&token, &join.node))
        {
            tracing::warn!(%peer, node = %join.node, error = %e, "join refused");
            return Err(fail(Status::unauthenticated(e.to_string())));
        }
        record_issued(tls.data_dir(), &join.node, &info);
        if let Some(ip) = ip {
            self.auth.throttle.succeeded(ip);
        }
        tracing::info!(%peer, node = %join.node, token = short_id(&token.id()), serial = %info.serial, valid_until_unix_ms = info.not_after_unix_ms(), "node joined: certificate issued");
        Ok(Response::new(response))
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        let tls = self.tls()?.clone();
        // Put there by the guard, from the caller's certificate.
        let Some(identity) = request.extensions().get::<NodeIdentity>().cloned() else {
            return Err(Status::unauthenticated(
                "renewal needs the current node certificate",
            ));
        };
        let peer = Caller::at(request.remote_addr()).peer();
        let csr = parse_csr(&request.get_ref().csr_pem)?;
        let (response, info) = self.issue(&tls, &identity.name, &csr)?;
        record_issued(tls.data_dir(), &identity.name, &info);
        tracing::info!(%peer, node = %identity.name, serial = %info.serial, valid_until_unix_ms = info.not_after_unix_ms(), "node certificate renewed");
        Ok(Response::new(response))
    }
}
