#!/usr/bin/env bash
# llama.cpp itself loads the GGUF files metalcandle writes (f32 and q8_0 exports of the four
# fixture models) and must decode the same greedy tokens (tests/test_llama_cpp.py). Kept out of
# .ci/run because a cold llama.cpp build costs more than that job's budget; the build is cached
# (.ci/build_llama_cpp.sh), so later runs cost about a minute. Run after `bash .ci/run` (it uses
# the .venv that job made): bash .ci/check_llama_cpp.sh
set -euo pipefail
cd "$(dirname "$0")/.."
llama_bin=$(bash .ci/build_llama_cpp.sh | tail -n 1)
METALCANDLE_INTEROP=1 METALCANDLE_LLAMA_CPP_BIN="$llama_bin" \
    .venv/bin/python -m pytest -q tests/test_llama_cpp.py "$@"
