#!/usr/bin/env bash
# Compiles the CUDA build (`--features cuda`) without a GPU: nvcc and the CUDA headers come from
# PyPI wheels, pinned to a toolkit cudarc's build script knows (it reads `nvcc --version` and
# panics on a release it has no bindings for), and CUDA_COMPUTE_CAP stands in for the GPU that
# candle-kernels would otherwise ask nvidia-smi about. Checks and lints only: linking needs
# libcuda, which comes with the NVIDIA driver. Cost: the first run compiles candle-kernels' PTX
# and static kernels with nvcc (35 min on 2 busy cores); later runs reuse them from target/.
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_VERSION=13.4.92
# CCCL (thrust/cub, header-only) ships on its own release train; 3.5 supports nvcc 13.4.
CCCL_VERSION=13.3.5.0.6
cache="${METALCANDLE_CUDA_CACHE:-$HOME/.cache/metalcandle-cuda}/$CUDA_VERSION"
if [ ! -x "$cache/nvidia/cu13/bin/nvcc" ] || [ ! -d "$cache/nvidia/cu13/include/cccl" ]; then
    rm -rf "$cache"
    python3 -m pip install -q --disable-pip-version-check --target "$cache" \
        "nvidia-cuda-nvcc==$CUDA_VERSION" "nvidia-cuda-crt==$CUDA_VERSION" \
        "nvidia-nvvm==$CUDA_VERSION" "nvidia-cuda-runtime==$CUDA_VERSION" \
        "nvidia-cuda-cccl==$CCCL_VERSION"
fi

export CUDA_ROOT="$cache/nvidia/cu13"
export CUDA_HOME="$CUDA_ROOT" CUDA_PATH="$CUDA_ROOT" CUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT"
export PATH="$CUDA_ROOT/bin:$PATH"
# The GPU the PTX and candle's static kernels are compiled for (90: H100/H200).
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TERM_COLOR=never

cargo clippy --release --workspace --all-targets --features cuda -- -D warnings
