//! Compiles `hotroll.proto` with protox (pure Rust), so building needs no system `protoc`, and
//! generates a second server for the `Agent` service whose session stream carries
//! [`CoordinatorFrame`]s (pre-encoded `CoordinatorMessage`s; see `src/frame.rs`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=hotroll.proto");
    let descriptors = protox::compile(["hotroll.proto"], ["."])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;

    // Same routes as `hotroll.v1.Agent` (the package and service names make the paths), so
    // agents cannot tell the two servers apart on the wire.
    let codec = "tonic_prost::ProstCodec";
    let agent = tonic_build::manual::Service::builder()
        .name("Agent")
        .package("hotroll.v1")
        .method(
            tonic_build::manual::Method::builder()
                .name("session")
                .route_name("Session")
                .input_type("crate::v1::AgentMessage")
                .output_type("crate::frame::CoordinatorFrame")
                .codec_path(codec)
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .method(
            tonic_build::manual::Method::builder()
                .name("fetch_artifact")
                .route_name("FetchArtifact")
                .input_type("crate::v1::FetchArtifactRequest")
                .output_type("crate::v1::ArtifactChunk")
                .codec_path(codec)
                .server_streaming()
                .build(),
        )
        .build();
    tonic_build::manual::Builder::new()
        .build_client(false)
        .build_server(true)
        .compile(&[agent]);
    Ok(())
}
