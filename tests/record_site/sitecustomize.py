"""Started by every Python process of an engine that tests/tp_serve.py runs with
``--record`` (it puts this folder first on PYTHONPATH): vLLM's CPU platform spawns
its engine core and workers, so a patch made in the parent would not reach them.
With ``SCALESWEEP_TEST_RECORD=DIR`` each process records its runtime quantizer calls
to DIR (tests/quantizer_alignment.py)."""

import os
import sys

if os.environ.get("SCALESWEEP_TEST_RECORD"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import quantizer_alignment

    quantizer_alignment.install(os.environ["SCALESWEEP_TEST_RECORD"])
