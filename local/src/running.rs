//! A task of the fleet (the coordinator, an agent) with the signal that stops it.

use std::future::Future;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::{JoinError, JoinHandle};

/// A spawned task that stops gracefully when asked, and is aborted when dropped (a test that
/// fails half-way must not leave servers behind).
pub struct Running<T> {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<T>,
}

impl<T: Send + 'static> Running<T> {
    /// Spawn what `start` makes of the shutdown future it is given.
    pub fn spawn<F>(start: impl FnOnce(Stopped) -> F) -> Self
    where
        F: Future<Output = T> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(start(Stopped(stopped)));
        Self {
            stop: Some(stop),
            task,
        }
    }

    /// Ask the task to stop and wait up to `within` for it; past that it is aborted (`None`).
    pub async fn stop(mut self, within: Duration) -> Option<Result<T, JoinError>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(within, &mut self.task).await.ok()
    }

    /// Ask the task to stop without waiting (see [`Running::stop`] to wait).
    pub fn signal(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl<T> Drop for Running<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Resolves when the task is asked to stop (or its [`Running`] is gone).
pub struct Stopped(oneshot::Receiver<()>);

impl Stopped {
    pub async fn wait(self) {
        let _ = self.0.await;
    }
}
