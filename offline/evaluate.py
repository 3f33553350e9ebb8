#!/usr/bin/env python
"""Evaluate a recipe or an NVFP4 checkpoint against BF16 (same as ``scalesweep-eval``).

python offline/evaluate.py --help
"""

from __future__ import annotations

import os
import sys

# run from a checkout without installing the package
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from scalesweep_vllm.evaluate.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
