//! Generates the gRPC API's messages and stubs from `src/proto/kvmesh/v1/index.proto`, with a
//! protobuf compiler written in Rust (no `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "src/proto/kvmesh/v1/index.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["src/proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
