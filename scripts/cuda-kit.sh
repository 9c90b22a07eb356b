#!/usr/bin/env bash
# Installs a CUDA 13.0 build kit from PyPI into $KIT (default .kit/) so that `cargo build
# --features cuda` works on a machine with no GPU and no CUDA toolkit (see docs/ARCHITECTURE.md).
# Prints the environment to export; `source <(scripts/cuda-kit.sh --env)` sets it.
# The GPU machines run driver 580 (CUDA 13.0): nvcc is pinned to 13.0 so its PTX loads there.
set -euo pipefail
KIT=${KIT:-$(cd "$(dirname "$0")/.." && pwd)/.kit}
env_lines() {
  echo "export PATH=$KIT/nvidia/cu13/bin:\$PATH"
  echo "export CUDA_HOME=$KIT"
  echo "export CUDA_ROOT=$KIT"
  echo "export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}"
  echo "export LIBRARY_PATH=$KIT/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
}
if [ "${1:-}" = "--env" ]; then
  [ -x "$KIT/nvidia/cu13/bin/nvcc" ] || { echo "no kit in $KIT: run scripts/cuda-kit.sh first" >&2; exit 1; }
  env_lines; exit 0
fi
if [ ! -x "$KIT/nvidia/cu13/bin/nvcc" ]; then
  python3 -m pip install -q --no-deps --target "$KIT" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88 nvidia-nccl-cu13==2.27.7
fi
# The wheels ship only versioned libraries: give the linker unversioned names.
mkdir -p "$KIT/lib"
for l in cudart cublas cublasLt curand nvrtc; do
  f=$(ls "$KIT"/nvidia/cu13/lib/lib$l.so.* 2>/dev/null | head -1)
  [ -n "$f" ] && ln -sf "$f" "$KIT/lib/lib$l.so"
done
f=$(ls "$KIT"/nvidia/nccl/lib/libnccl.so.* | head -1); ln -sf "$f" "$KIT/lib/libnccl.so"
# A link-time stand-in for the driver's libcuda.so.1 (the real one is used at run time):
# one empty function per `cu*` symbol cudarc declares.
if [ ! -f "$KIT/lib/libcuda.so" ]; then
  # cudarc's driver declarations in the cargo registry ('' when not fetched yet: `|| true`, as
  # under pipefail an unmatched glob would end the script here, silently).
  cudarc_sys() { ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10/src/driver/sys 2>/dev/null | head -1 || true; }
  sys=$(cudarc_sys)
  if [ -z "$sys" ]; then
    (cd "$(dirname "$0")/.." && cargo fetch -q)
    sys=$(cudarc_sys)
  fi
  [ -n "$sys" ] || { echo "cuda-kit: cudarc 0.19.10 is not in the cargo registry after cargo fetch" >&2; exit 1; }
  grep -rhoE 'pub (unsafe )?fn cu[A-Za-z0-9_]+' "$sys" | sed -E 's/.*fn //' | sort -u \
    | awk '{print "void " $1 "(void){}"}' > "$KIT/lib/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$KIT/lib/libcuda.so" "$KIT/lib/cuda_stub.c"
fi
env_lines
