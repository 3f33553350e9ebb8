"""The evaluation: perplexity, KL divergence to BF16 and top-1 agreement on held-out
Wikipedia text, for recipes quantized in memory or for NVFP4 checkpoints, computed
by the same quantized forward the vLLM plugin serves (:mod:`.model`). Console
script ``scalesweep-eval`` (:mod:`.cli`)."""

from __future__ import annotations

from .model import Checkpoint, RuntimeSettings, build_model, runtime_settings
from .run import RECIPES, SETTINGS, evaluate, quantize_recipe

__all__ = [
    "RECIPES",
    "SETTINGS",
    "Checkpoint",
    "RuntimeSettings",
    "build_model",
    "evaluate",
    "quantize_recipe",
    "runtime_settings",
]
