//! What every connection the coordinator accepts gets before anything is read from it, on
//! every accept path (plaintext, TLS, a group member's): `TCP_NODELAY`. Without it a barrier
//! release can sit ~40 ms behind Nagle and delayed ACKs.
//!
//! No kernel TCP keepalive: 10,000 sessions connected within seconds of each other probe
//! within the same millisecond, and on loopback that burst overflowed the kernel's backlog,
//! lost probes and ACKs, and ended 1,874 healthy sessions in `scale-bench` (docs/performance.md,
//! "Idle fleets"). Liveness is the heartbeats' job (`liveness`).

use tokio::net::TcpStream;

/// Set the accepted socket up; a socket that refuses an option still serves (logged).
pub fn tune(stream: &TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_accepted_socket_has_nodelay() -> Result<(), Box<dyn std::error::Error>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let client = TcpStream::connect(listener.local_addr()?).await?;
        let (accepted, _) = listener.accept().await?;
        assert!(!accepted.nodelay()?);
        tune(&accepted);
        assert!(accepted.nodelay()?);
        drop(client);
        Ok(())
    }
}
