#!/usr/bin/env python
"""Quantize a Hugging Face model to an NVFP4 checkpoint (same as ``scalesweep-quantize``).

python offline/quantize.py --help
"""

from __future__ import annotations

import os
import sys

# run from a checkout without installing the package
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from scalesweep_vllm.quantize.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
