#!/usr/bin/env bash
# Compiles the CUDA build (`--features cuda`) without a GPU. Checks and lints only: linking needs
# libcuda, which comes with the NVIDIA driver.
#
#   .ci/check_cuda.sh                 the real build: nvcc and the CUDA headers come from PyPI
#                                     wheels, pinned to a toolkit cudarc's build script knows (it
#                                     reads `nvcc --version` and panics on a release it has no
#                                     bindings for), and CUDA_COMPUTE_CAP stands in for the GPU
#                                     that candle-kernels would otherwise ask nvidia-smi about.
#                                     The first run compiles candle-kernels' PTX and static
#                                     kernels with nvcc (35 min on 2 busy cores); later runs reuse
#                                     them from target/.
#   .ci/check_cuda.sh --stub-kernels  our crates and candle's CUDA backend type-checked and linted
#                                     against a copy of candle-kernels with its Rust API and no
#                                     kernels (.ci/cuda-check/stub_kernels.py); no nvcc, no
#                                     toolkit download: 2-4 min from a clean target/. It cannot
#                                     see what only nvcc would: the kernels themselves.
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_VERSION=13.4.92
export CARGO_TERM_COLOR=never
lint=(cargo clippy --release --workspace --all-targets --features cuda)

case "${1:-}" in
"") ;;
--stub-kernels)
    # The toolkit cudarc's bindings are chosen for, the one the real build's nvcc reports.
    IFS=. read -r major minor _ <<<"$CUDA_VERSION"
    export CUDARC_CUDA_VERSION="${major}0${minor}0"
    work="${CARGO_TARGET_DIR:-target}/cuda-api"
    mkdir -p "$work"
    # The copy is a path crate without build dependencies: the graph is re-resolved and cargo
    # writes that into Cargo.lock. The real build's lockfile is put back however this ends.
    cp -p Cargo.lock "$work/Cargo.lock.real"
    trap 'cp -p "$work/Cargo.lock.real" Cargo.lock' EXIT
    trap 'exit 130' INT TERM HUP
    patch="$(python3 .ci/cuda-check/stub_kernels.py "$work/candle-kernels")"
    "${lint[@]}" --config "$patch" -- -D warnings
    exit
    ;;
*)
    echo "usage: $0 [--stub-kernels]" >&2
    exit 2
    ;;
esac

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

"${lint[@]}" -- -D warnings
