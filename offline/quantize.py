#!/usr/bin/env python
"""Quantize a Hugging Face model to an NVFP4 checkpoint (same as ``scalesweep-quantize``).

python offline/quantize.py --help
"""

from __future__ import annotations

import sys

from scalesweep_vllm.quantize.cli import main

if __name__ == "__main__":
    sys.exit(main())
