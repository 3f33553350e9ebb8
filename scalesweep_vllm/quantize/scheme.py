"""Quantization schemes and objectives, parsed once at the edge.

``W4A16``: NVFP4 weights only. ``W4A4``: plus NVFP4 Linear inputs (stock vLLM 0.33
quantizes them by AbsMax on Blackwell and through Humming on Hopper, and runs the
checkpoint weight-only on Marlin elsewhere: docs/SERVING.md). ``W4A4KV4``: plus
the KV cache. ``W4A4KV4Q4``: plus the attention queries. The KV/query settings
live in ``scalesweep.json`` (the plugin reads them); ``quantization_config`` stays
pure compressed-tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..kernels import METHODS
from ..nvfp4 import GLOBAL_SCALE_TARGETS

__all__ = [
    "OBJECTIVES",
    "SCHEMES",
    "WEIGHT_OBJECTIVES",
    "Scheme",
    "check_convention",
    "check_objective",
    "get_scheme",
    "runtime_method",
]

#: Block-scale objectives for weights (and the runtime method for activations/KV/query).
OBJECTIVES = METHODS
#: Objectives accepted by ``quantize_model`` for the evaluation only: the peer
#: baseline four-over-six (best of amax/6 and amax/4 per block by MSE); its
#: checkpoints record a runtime method the plugin does not serve.
BASELINE_OBJECTIVES = ("four_over_six",)
#: Weight-only objectives: ``hessian`` sweeps each weight block's FP8 scale against the
#: 16x16 block of the layer's input second moment (:mod:`scalesweep_vllm.hessian_sweep`);
#: runtime parts have no such statistic and use :func:`runtime_method`'s.
WEIGHT_OBJECTIVES = ("hessian",)


@dataclass(frozen=True)
class Scheme:
    """What a scheme quantizes."""

    name: str
    activations: bool
    kv_cache: bool
    query: bool


SCHEMES = {
    "W4A16": Scheme("W4A16", activations=False, kv_cache=False, query=False),
    "W4A4": Scheme("W4A4", activations=True, kv_cache=False, query=False),
    "W4A4KV4": Scheme("W4A4KV4", activations=True, kv_cache=True, query=False),
    "W4A4KV4Q4": Scheme("W4A4KV4Q4", activations=True, kv_cache=True, query=True),
}


def get_scheme(name: str) -> Scheme:
    """The :class:`Scheme` called ``name`` (case-insensitive); ValueError naming the choices."""
    key = str(name).upper()
    if key not in SCHEMES:
        raise ValueError(f"unknown scheme {name!r}; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[key]


def check_objective(objective: str) -> str:
    """Validate a weight objective (absmax | mse | wmse | hessian, or a baseline of
    :data:`BASELINE_OBJECTIVES`)."""
    known = OBJECTIVES + WEIGHT_OBJECTIVES
    if objective not in known + BASELINE_OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(known)}")
    return objective


def runtime_method(objective: str) -> str:
    """The runtime method (activations, KV cache, query) recorded with a weight
    objective: the objective itself, ``wmse`` for the weight-only ``hessian``."""
    return "wmse" if objective in WEIGHT_OBJECTIVES else objective


def check_convention(convention: str) -> str:
    """Validate a global-scale convention (paper | compressed-tensors)."""
    if convention not in GLOBAL_SCALE_TARGETS:
        raise ValueError(
            f"unknown global-scale convention {convention!r}; "
            f"choose one of {', '.join(sorted(GLOBAL_SCALE_TARGETS))}"
        )
    return convention
