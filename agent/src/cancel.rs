//! A one-shot cancellation signal shared by the executor and whatever a step runs (a hook, a
//! runtime operation), so that stopping a step can kill and reap its processes explicitly
//! instead of relying on a dropped future.

use tokio::sync::watch;

/// The side that cancels.
#[derive(Debug)]
pub struct CancelSource(watch::Sender<bool>);

/// The side that is told; cheap to clone.
#[derive(Debug, Clone)]
pub struct CancelToken(watch::Receiver<bool>);

impl CancelSource {
    pub fn new() -> Self {
        Self(watch::Sender::new(false))
    }

    pub fn token(&self) -> CancelToken {
        CancelToken(self.0.subscribe())
    }

    pub fn cancel(&self) {
        self.0.send_replace(true);
    }

    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }
}

impl Default for CancelSource {
    fn default() -> Self {
        Self::new()
    }
}

impl CancelToken {
    /// A token that is never cancelled.
    pub fn never() -> Self {
        let (tx, rx) = watch::channel(false);
        // Keep the sender alive forever would leak; a dropped sender already means "never".
        drop(tx);
        Self(rx)
    }

    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once cancelled. A dropped source never cancels: whoever dropped it also drops
    /// the work this token guards, and the guards of that work clean up.
    pub async fn cancelled(&self) {
        let mut rx = self.0.clone();
        if rx.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
