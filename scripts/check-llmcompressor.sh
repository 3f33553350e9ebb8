#!/usr/bin/env bash
# Check ScaleSweep as an llm-compressor observer (scalesweep_vllm.integrations.llmcompressor)
# against llm-compressor 0.14.0.1 / compressed-tensors 0.19 in the peers venv.
# Idempotent: creates .venv-peers and installs llm-compressor only where they are
# missing (the llm-compressor part of scripts/setup-peers.sh), adds pytest, then runs
# tests/test_llmcompressor_observer.py. The package itself is imported from this
# checkout (pytest runs from the repository root), not installed into the venv.
# The slow oneshot tests need the default model (scripts/setup-model.sh) and take a few
# minutes on 2 CPU cores; pass `-m "not slow"` to skip them. Extra arguments go to pytest.
# VENV=... picks another folder, PYTHON=... the interpreter that creates it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-peers}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
have() { "$VENV/bin/python" - "$@" <<'PY'
import importlib.metadata as md, sys
want = dict(a.split("==") for a in sys.argv[1:])
try:
    sys.exit(0 if all(md.version(p) == v for p, v in want.items()) else 1)
except md.PackageNotFoundError:
    sys.exit(1)
PY
}
if ! have llmcompressor==0.14.0.1 torch==2.13.0; then
    # torch first, pinned (the local CPU build; a looser pin pulls a CUDA build)
    "${PIP[@]}" install torch==2.13.0
    "${PIP[@]}" install torch==2.13.0 "llmcompressor==0.14.0.1"
    "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
have pytest==9.2.0 || "${PIP[@]}" install "pytest==9.2.0"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
print(", ".join(f"{p} {md.version(p)}" for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")))
PY
exec "$VENV/bin/python" -m pytest -p no:cacheprovider tests/test_llmcompressor_observer.py "$@"
