//! The coordinator of a local fleet, ready to serve: its store and its configuration. The
//! builder runs it on a TCP listener; a network simulation serves it on its own connections.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use hotroll_coordinator::server::{self, ServerConfig, ServerError};
use hotroll_coordinator::store::Store;
use tokio::net::TcpListener;

/// Everything the coordinator needs but its connections. Cloning shares the store, so a
/// coordinator started again from a clone finds what the previous one stored.
#[derive(Clone)]
pub struct CoordinatorSpec {
    store: Arc<dyn Store>,
    config: ServerConfig,
}

impl std::fmt::Debug for CoordinatorSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorSpec")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl CoordinatorSpec {
    pub fn new(store: Arc<dyn Store>, config: ServerConfig) -> Self {
        Self { store, config }
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    /// Serve on `listener` (TLS when the config has it) until `shutdown` resolves.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        server::run(listener, self.store, self.config, shutdown).await
    }

    /// Serve the connections of `incoming` (plaintext only) until `shutdown` resolves: what a
    /// network simulation calls on its coordinator host.
    pub async fn serve<I, IO, IE>(
        self,
        incoming: I,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError>
    where
        I: futures::Stream<Item = Result<IO, IE>> + Send + 'static,
        IO: tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + tonic::transport::server::Connected
            + Unpin
            + Send
            + 'static,
        IO::ConnectInfo: Clone + Send + Sync + 'static,
        IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        server::serve(incoming, self.store, self.config, shutdown).await
    }
}
