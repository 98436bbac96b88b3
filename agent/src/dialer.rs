//! How the agent reaches its coordinator: a function from an endpoint to a gRPC channel, shared
//! by the session, the artifact fetcher and the node identity.

use tonic::transport::Endpoint;

/// How the agent opens a connection to the coordinator. The default dials TCP; a network
/// simulation (turmoil) passes its own.
pub type Dialer = std::sync::Arc<
    dyn Fn(
            Endpoint,
        ) -> std::pin::Pin<
            Box<
                dyn std::future::Future<
                        Output = Result<tonic::transport::Channel, tonic::transport::Error>,
                    > + Send,
            >,
        > + Send
        + Sync,
>;

/// The dialer of real deployments: TCP to the endpoint's address.
pub fn tcp_dialer() -> Dialer {
    std::sync::Arc::new(|endpoint: Endpoint| Box::pin(async move { endpoint.connect().await }))
}
