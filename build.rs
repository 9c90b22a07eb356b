//! Generates the coordinator's gRPC code from proto/coordinator.proto with a vendored protoc,
//! so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/coordinator.proto");
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // tonic-prost-build finds protoc through PROTOC; build scripts are single-threaded here.
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure().compile_protos(&["proto/coordinator.proto"], &["proto"])?;
    Ok(())
}
