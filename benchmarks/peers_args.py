"""Options the peers' runners share (imported by ``peers_modelopt.py`` and
``peers_llmcompressor.py``, each in its own venv; this file needs only argparse)."""

from __future__ import annotations

import argparse


def add_dtype(p: argparse.ArgumentParser) -> None:
    """``--dtype``: what the peer's model is loaded and calibrated in."""
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="dtype the model is loaded and calibrated in (bfloat16: as the tool's users\n"
        "run it; float32: the same bf16 weights, exact, with float32 activations, for\n"
        "CPUs without bf16 units, where bf16 calibration of a 1.5B model takes hours;\n"
        "recorded in peers.json)",
    )
