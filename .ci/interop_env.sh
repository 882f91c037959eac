#!/usr/bin/env bash
# Creates (or reuses) .venv-interop: the pinned torch, transformers and peft the fixtures were made
# with, plus the metalcandle wheel given as $1. These packages are tools for the interop checks,
# never dependencies of metalcandle.
set -euo pipefail
cd "$(dirname "$0")/.."
wheel="$1"
venv=.venv-interop
pins=(torch==2.13.0 transformers==5.23.0 peft==0.21.2 tokenizers==0.23.3 safetensors==0.8.0 numpy==2.4.6)
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# pip skips what is already installed at the pinned version, so a reused venv costs seconds.
"$venv/bin/python" -m pip install -q "${pins[@]}" pytest
"$venv/bin/python" -m pip install -q --force-reinstall --no-deps "$wheel"
"$venv/bin/python" -m pip install -q "${wheel}[test]"
"$venv/bin/python" -c "import torch, transformers, peft, metalcandle; print('interop env:', 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
