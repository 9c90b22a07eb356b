//! Build script:
//! - generates the coordinator's gRPC code from proto/coordinator.proto with a vendored protoc,
//!   so no system protoc is needed;
//! - with the `cuda` feature, compiles every `src/kernels/cuda/*.cu` with nvcc (from PATH, see
//!   scripts/cuda-kit.sh) into a fatbin (sm_80 and sm_90 machine code plus compute_90 PTX that the
//!   driver can JIT on newer GPUs) in OUT_DIR, and writes `OUT_DIR/kernel_fatbins.rs`, the list of
//!   `(module name, bytes)` that `crate::kernels` embeds. The default build never needs nvcc.

use std::path::{Path, PathBuf};
use std::process::Command;

const KERNEL_DIR: &str = "src/kernels/cuda";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/coordinator.proto");
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // tonic-prost-build finds protoc through PROTOC; build scripts are single-threaded here.
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure().compile_protos(&["proto/coordinator.proto"], &["proto"])?;

    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        build_kernels()?;
    }
    Ok(())
}

/// `src/kernels/cuda/*.cu` -> `OUT_DIR/<stem>.fatbin`, plus the generated list of them.
fn build_kernels() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // A new or removed file changes the directory; headers (.cuh) are tracked file by file.
    println!("cargo:rerun-if-changed={KERNEL_DIR}");
    let mut sources = Vec::new();
    for entry in std::fs::read_dir(KERNEL_DIR)? {
        let path = entry?.path();
        let ext = path.extension().and_then(|e| e.to_str());
        if matches!(ext, Some("cu") | Some("cuh")) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
        if ext == Some("cu") {
            sources.push(path);
        }
    }
    sources.sort();
    let mut registry = String::from("&[\n");
    for src in &sources {
        let stem = src
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| format!("kernel file name is not UTF-8: {}", src.display()))?;
        let fatbin = out_dir.join(format!("{stem}.fatbin"));
        compile(src, &fatbin)?;
        registry.push_str(&format!(
            "    ({stem:?}, include_bytes!({:?}) as &[u8]),\n",
            fatbin.display().to_string()
        ));
    }
    registry.push_str("]\n");
    std::fs::write(out_dir.join("kernel_fatbins.rs"), registry)?;
    Ok(())
}

fn compile(src: &Path, fatbin: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let status = Command::new("nvcc")
        .arg("--fatbin")
        .args(["-O3", "-std=c++17", "-lineinfo"])
        .args(["-gencode", "arch=compute_80,code=sm_80"])
        .args(["-gencode", "arch=compute_90,code=sm_90"])
        .args(["-gencode", "arch=compute_90,code=compute_90"])
        .arg("-I")
        .arg(KERNEL_DIR)
        .arg("-o")
        .arg(fatbin)
        .arg(src)
        .status()
        .map_err(|e| {
            format!(
                "running nvcc for {} (the cuda feature needs nvcc on PATH: \
                 `source <(bash scripts/cuda-kit.sh --env)`): {e}",
                src.display()
            )
        })?;
    if !status.success() {
        return Err(format!("nvcc failed on {} ({status})", src.display()).into());
    }
    Ok(())
}
