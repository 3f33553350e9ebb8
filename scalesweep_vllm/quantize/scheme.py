"""Quantization schemes, parsed once at the edge (objectives: :mod:`.objectives`).

``W4A16``: NVFP4 weights only. ``W4A4``: plus NVFP4 Linear inputs (stock vLLM 0.33
quantizes them by AbsMax on Blackwell and through Humming on Hopper, and runs the
checkpoint weight-only on Marlin elsewhere: docs/SERVING.md). ``W4A4KV4``: plus
the KV cache. ``W4A4KV4Q4``: plus the attention queries. The KV/query settings
live in ``scalesweep.json`` (the plugin reads them); ``quantization_config`` stays
pure compressed-tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..nvfp4 import GLOBAL_SCALE_TARGETS

__all__ = ["SCHEMES", "Scheme", "check_convention", "get_scheme"]


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


def check_convention(convention: str) -> str:
    """Validate a global-scale convention (paper | compressed-tensors)."""
    if convention not in GLOBAL_SCALE_TARGETS:
        raise ValueError(
            f"unknown global-scale convention {convention!r}; "
            f"choose one of {', '.join(sorted(GLOBAL_SCALE_TARGETS))}"
        )
    return convention
