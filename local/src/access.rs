//! How an operator's client reaches the fleet's coordinator: a channel that trusts the fleet's
//! CA (plaintext for an insecure fleet), and a bearer token on every request.

use std::path::Path;

use hotroll_proto::v1::control_client::ControlClient;
use hotroll_tls::client::channel_uri;
use hotroll_tls::{ClientTls, Trust, files};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::error::FleetError;

/// Adds `authorization: Bearer <token>` to every request when there is a token.
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Self, FleetError> {
        token
            .map(|token| {
                format!("Bearer {token}")
                    .parse()
                    .map_err(|_| FleetError::TokenHeader)
            })
            .transpose()
            .map(Self)
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(bearer) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
        }
        Ok(request)
    }
}

/// A Control client with the operator's credentials.
pub type OperatorClient = ControlClient<InterceptedService<Channel, Bearer>>;

/// A connected channel to `url`: TLS trusting the CA in `ca` (no client certificate), or
/// plaintext when there is no CA.
pub async fn channel(url: &str, ca: Option<&Path>) -> Result<Channel, FleetError> {
    let endpoint = Endpoint::from_shared(channel_uri(url))?;
    match ca {
        Some(ca) => {
            let trust = Trust::Ca(files::read_certs(ca)?);
            Ok(ClientTls::new(&trust, None)?.connect(endpoint).await?)
        }
        None => Ok(endpoint.connect().await?),
    }
}
