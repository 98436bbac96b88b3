//! The server's stop signal, for the work that would otherwise outlive it.
//!
//! tonic's graceful shutdown waits for every stream in flight, and agent sessions and watch
//! streams never end on their own: without this a stopping coordinator would wait forever,
//! or, dropped, leave its connection tasks serving agents that then never reconnect to its
//! successor. When the server is told to stop, every session and watch stream ends (the agents
//! reconnect, the CLI resumes its watch), and the shutdown completes.

use std::future::Future;

use futures::{Stream, StreamExt};
use tokio::sync::watch;

/// Fires the signal (once the server's own shutdown future resolved).
#[derive(Debug)]
pub struct StopTrigger(watch::Sender<bool>);

impl StopTrigger {
    pub fn stop(&self) {
        let _ = self.0.send(true);
    }
}

/// Tells whoever holds a clone that the server is stopping.
#[derive(Debug, Clone)]
pub struct Stopping(watch::Receiver<bool>);

impl Stopping {
    pub fn new() -> (StopTrigger, Self) {
        let (tx, rx) = watch::channel(false);
        (StopTrigger(tx), Self(rx))
    }

    /// Resolves once the server is stopping (never, if the trigger is dropped unfired).
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.clone();
        async move {
            if rx.wait_for(|stopping| *stopping).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// `stream`, ended when the server stops.
    pub fn bound<S>(&self, stream: S) -> impl Stream<Item = S::Item> + Send + 'static
    where
        S: Stream + Send + 'static,
    {
        stream.take_until(Box::pin(self.wait()))
    }
}
