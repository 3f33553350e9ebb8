"""Weight block-scale objectives behind one interface: the *scales* stage.

An objective turns one weight ``[N, K]`` and its fused group's global scale into
FP8 block scales and the E2M1 codes of round-to-nearest at those scales. What it
may read of the calibration is its statistic:

==================  ===========  ===============================================
objective           statistic    block error minimised over the FP8 codes
==================  ===========  ===============================================
``absmax``          none         (no sweep: ``amax / 6``)
``mse``             none         ``sum_i d_i^2``
``wmse``            diagonal     ``sum_i E[x_i^2] d_i^2``
``hessian``         block        ``d^T H_b d``, ``H_b`` the 16x16 block of E[x x^T]
``four_over_six``   none         best of amax/6 and amax/4 (an evaluation baseline)
==================  ===========  ===============================================

(``d = w - s q`` per 16-block.) A new objective is one subclass registered with
:func:`register`. The sweeps themselves are :mod:`scalesweep_vllm.sweep` and
:mod:`scalesweep_vllm.hessian_sweep` (the references) and the kernels dispatched by
:mod:`scalesweep_vllm.kernels`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from .. import hessian_sweep, kernels, nvfp4, sweep

__all__ = [
    "OBJECTIVES",
    "REGISTRY",
    "Objective",
    "block_hessians",
    "get_objective",
    "register",
]

REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make ``cls`` reachable as ``objective=cls.name``."""
    REGISTRY[cls.name] = cls
    return cls


class Objective(ABC):
    """How a weight block's FP8 scale is chosen."""

    #: the name in recipes, the CLI and scalesweep.json
    name: ClassVar[str]
    #: calibration must gather E[x x^T] of the Linear's input
    needs_hessian: ClassVar[bool] = False
    #: offered by ``scalesweep-quantize --objective`` (else an evaluation baseline)
    public: ClassVar[bool] = True

    @property
    def runtime_method(self) -> str:
        """The method recorded for activations, KV cache and queries (a kernel method)."""
        return self.name

    def prepare(self, hessian: torch.Tensor | None, tokens: int, where: str) -> Any:
        """Per fused group, before its members are quantized (``hessian``: E[x x^T] of
        the group's shared input over ``tokens`` tokens)."""
        return None

    @abstractmethod
    def quantize(
        self, w: torch.Tensor, g_w: torch.Tensor, diag: torch.Tensor | None, prepared: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed E2M1 codes ``uint8 [N, K/2]`` and FP8 scales ``[N, K/16]`` of ``w``
        (float32) at global scale ``g_w``; ``diag``: the member's WMSE weight ``[K]``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _KernelObjective(Objective):
    """An objective the kernel dispatch implements (C++/Triton/torch reference)."""

    def quantize(self, w, g_w, diag, prepared):
        return kernels.quantize(w, g_w, method=self.name)


@register
class AbsMax(_KernelObjective):
    """``amax / 6`` per block: the usual recipe, no sweep."""

    name = "absmax"


@register
class MSE(_KernelObjective):
    """Exact sweep of the block's plain squared error."""

    name = "mse"


@register
class DiagonalWMSE(Objective):
    """Exact sweep of the squared error weighted by each input channel's E[x^2]."""

    name = "wmse"

    def quantize(self, w, g_w, diag, prepared):
        if diag is None:
            raise ValueError("objective wmse needs each input channel's E[x^2]")
        return kernels.quantize(w, g_w, method="wmse", weight=diag)


@register
class FourOverSix(Objective):
    """The peer baseline: the better of amax/6 and amax/4 per block by MSE (torch
    reference; its checkpoints record a runtime method the plugin does not serve)."""

    name = "four_over_six"
    public = False

    def quantize(self, w, g_w, diag, prepared):
        scales = sweep.four_over_six_scales(w, g_w)
        return nvfp4.pack_fp4(sweep.quantize_codes(w, g_w, scales)), scales


@register
class BlockHessian(Objective):
    """Exact sweep of ``d^T (H_b + lambda I) d`` per 16-block (weights only: runtime
    parts have no Hessian and record ``wmse``). ``damp``: ``lambda`` relative to the
    block's mean diagonal (:func:`hessian_sweep.hessian_factors`)."""

    name = "hessian"
    needs_hessian = True

    def __init__(self, damp: float = hessian_sweep.DEFAULT_DAMP):
        self.damp = float(damp)

    @property
    def runtime_method(self) -> str:
        return "wmse"

    def prepare(self, hessian, tokens, where):
        if hessian is None or tokens <= 0:
            raise ValueError(f"objective hessian: no calibration Hessian for {where}")
        return hessian_sweep.hessian_factors(block_hessians(hessian), damp=self.damp)

    def quantize(self, w, g_w, diag, prepared):
        scales = kernels.hessian_sweep_scales(w, g_w, prepared)
        return nvfp4.pack_fp4(sweep.quantize_codes(w, g_w, scales)), scales

    def __repr__(self) -> str:
        return f"BlockHessian(damp={self.damp:g})"


#: The objectives ``scalesweep-quantize --objective`` offers.
OBJECTIVES = tuple(n for n, c in REGISTRY.items() if c.public)


def get_objective(name: str, hessian_damp: float = hessian_sweep.DEFAULT_DAMP) -> Objective:
    """The objective called ``name``; ValueError naming the choices."""
    cls = REGISTRY.get(name)
    if cls is None:
        known = [n for n, c in REGISTRY.items() if c.public]
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(known)}")
    return cls(hessian_damp) if cls is BlockHessian else cls()


def block_hessians(hessian: torch.Tensor) -> torch.Tensor:
    """The 16x16 diagonal blocks ``[K/16, 16, 16]`` of a ``[K, K]`` Hessian."""
    k = hessian.shape[0]
    nb = k // nvfp4.BLOCK_SIZE
    h = hessian.reshape(nb, nvfp4.BLOCK_SIZE, nb, nvfp4.BLOCK_SIZE)
    return torch.diagonal(h, dim1=0, dim2=2).permute(2, 0, 1)
