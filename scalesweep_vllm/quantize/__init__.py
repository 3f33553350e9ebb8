"""The offline quantizer: a Hugging Face causal LM in, an NVFP4 compressed-tensors
checkpoint out (docs/CHECKPOINT.md). Entry point: :func:`quantize_model`; console
script ``scalesweep-quantize`` (:mod:`.cli`)."""

from __future__ import annotations

from .objectives import OBJECTIVES
from .pipeline import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN, load_model, quantize_model
from .recipe import Recipe
from .scheme import SCHEMES

__all__ = [
    "DEFAULT_NUM_SAMPLES",
    "DEFAULT_SEQ_LEN",
    "OBJECTIVES",
    "SCHEMES",
    "Recipe",
    "load_model",
    "quantize_model",
]
