//! The `/metrics` endpoint of a real in-process coordinator: what it counts, and that it stops
//! with the server.

use std::sync::Arc;

use tokio::net::TcpListener;

/// `GET /metrics` over a plain TCP connection; the body.
async fn get_metrics(addr: std::net::SocketAddr) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains(hotroll_coordinator::metrics::CONTENT_TYPE),
        "{text}"
    );
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default())
}

/// The real server: artifact bytes sent to an agent are counted, `/metrics` serves them, and
/// the endpoint goes away when the server shuts down.
#[tokio::test]
async fn the_endpoint_counts_artifact_bytes_and_stops_with_the_server() {
    use hotroll_proto::v1 as pb;
    use sha2::{Digest, Sha256};
    use tokio_stream::StreamExt;

    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = hotroll_coordinator::ServerConfig::new(dir.path().to_path_buf());
    config.metrics_listen = Some(metrics_addr);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(hotroll_coordinator::server::run(
        listener,
        Arc::new(hotroll_coordinator::store::MemoryStore::default()),
        config,
        async {
            let _ = stopped.await;
        },
    ));

    let channel = tonic::transport::Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    let chunks: Vec<pb::ArtifactChunk> = bytes
        .chunks(100_000)
        .enumerate()
        .map(|(i, data)| pb::ArtifactChunk {
            digest: digest.clone(),
            offset: (i * 100_000) as u64,
            data: data.to_vec(),
            total_size: bytes.len() as u64,
        })
        .collect();
    pb::control_client::ControlClient::new(channel.clone())
        .upload_artifact(tokio_stream::iter(chunks))
        .await
        .unwrap();

    let text = get_metrics(metrics_addr).await.unwrap();
    assert!(
        text.contains("hotroll_artifact_bytes_sent_total 0\n"),
        "{text}"
    );
    assert!(text.contains("hotroll_connected_agents 0\n"), "{text}");

    // An agent downloads it, from the start and then resuming at an offset.
    let mut agent = pb::agent_client::AgentClient::new(channel);
    let mut received = 0u64;
    for offset in [0u64, 250_000] {
        let mut stream = agent
            .fetch_artifact(pb::FetchArtifactRequest {
                digest: digest.clone(),
                offset,
                node: "n1".into(),
            })
            .await
            .unwrap()
            .into_inner();
        while let Some(chunk) = stream.next().await {
            received += chunk.unwrap().data.len() as u64;
        }
    }
    assert_eq!(received, 300_000 + 50_000);
    let text = get_metrics(metrics_addr).await.unwrap();
    assert!(
        text.contains(&format!("hotroll_artifact_bytes_sent_total {received}\n")),
        "{text}"
    );

    stop.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .expect("the server stops")
        .unwrap()
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(metrics_addr).await.is_err(),
        "the metrics endpoint outlived the server"
    );
}
