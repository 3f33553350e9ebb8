"""ScaleSweep as llm-compressor observers: ``scalesweep_mse`` and ``scalesweep_wmse``.

Importing this module registers both with ``llmcompressor.observers.Observer`` (a
compressed-tensors ``RegistryMixin``); a recipe then names them::

    import scalesweep_vllm.integrations.llmcompressor  # noqa: F401  (registers)
    args = QuantizationArgs(..., observer="scalesweep_wmse")   # NVFP4 weights

Target: llm-compressor 0.14 / compressed-tensors 0.19 (``scripts/check-llmcompressor.sh``).

What they compute
-----------------
The FP8 E4M3 block scales of an NVFP4 weight (``TENSOR_GROUP`` strategy, group size
16) with the same function ``scalesweep-quantize`` uses for weights
(:meth:`scalesweep_vllm.quantize.objectives.Objective.quantize`, i.e. the kernel
dispatch: C++ backend on CPU, Triton on CUDA, torch reference otherwise; all give the
reference sweep's scales bit for bit), so a checkpoint written by llm-compressor with
these observers holds the block scales ``scalesweep-quantize --objective mse|wmse``
writes for the same weights, global scale and calibration tokens.

compressed-tensors' convention (checked against 0.19's ``calculate_qparams`` and
``generate_gparam``): ``weight_global_scale`` is the *encode* factor
``G = 448 * 6 / amax`` (float32 ``[1]``), ``weight_scale`` the FP8 block scale in
that scaled domain (``fp8(block_amax * G / 6)`` for AbsMax), and dequantization is
``q * weight_scale / G``. Our sweep works in exactly that domain
(:mod:`scalesweep_vllm.nvfp4`), so its scales are stored as they are.

Global scale: as llm-compressor, from the max |W| over the fused partners (q/k/v,
gate/up: ``FusionHandler``), but through :func:`scalesweep_vllm.nvfp4.global_scale`
with observer kwarg ``global_scale_convention``: ``"compressed-tensors"`` (default,
``448*6/amax``, equal to ``generate_gparam`` and to ``scalesweep-quantize``'s
default) or ``"paper"`` (``256*6/amax``, headroom above the largest block's AbsMax).

WMSE weights
------------
``scalesweep_wmse`` weights each element's squared error by its input channel's
E[x^2] over the calibration tokens, exactly as ``scalesweep-quantize --objective
wmse``: a forward pre-hook on the Linear adds ``(x * x).sum(0, dtype=float64)`` of
the float32 input (all tokens of every batch, padding included, as our calibration
does) and counts tokens; the weight is then
:func:`scalesweep_vllm.quantize.calibration.wmse_weight` (E[x^2] in float32 plus a
floor of 1e-6 of its mean; all ones when no token or only zeros were seen).

We use our own hook rather than the statistics of llm-compressor's ``imatrix_mse``
observer: that observer keeps them on itself (not shared), and accumulates the
squares in float32, not float64 as our calibration does; the hook mirrors its
mechanism (registered in ``attach``, removed in ``detach``, silent while
``HooksMixin.disable_hooks()`` is active, so llm-compressor's error-propagation pass
is not counted twice) and its DDP sync (``_act_sync_dict``: sums are all-reduced).
In llm-compressor's sequential pipeline the QuantizationModifier calibrates with
quantization disabled, so the statistics are those of the unquantized model, as in
``scalesweep-quantize`` without GPTQ.

Only NVFP4 weights are supported (activations, KV cache and queries are
quantized at run time by the vLLM plugin): anything else raises ``ValueError`` when
the observer is created.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationStrategy,
    QuantizationType,
)
from llmcompressor.modifiers.utils.hooks import HooksMixin
from llmcompressor.observers import Observer
from torch import distributed as dist

from .. import nvfp4
from ..quantize.calibration import LinearStats, wmse_weight
from ..quantize.objectives import get_objective
from ..quantize.recipe import DEFAULT_GLOBAL_SCALE

__all__ = ["ScaleSweepMSEObserver", "ScaleSweepWMSEObserver", "check_args"]

_KWARGS = ("global_scale_convention",)


def check_args(name: str, base_name: str, args: QuantizationArgs) -> None:
    """ValueError unless ``args`` describe NVFP4 weights (FP4 E2M1, symmetric,
    ``TENSOR_GROUP`` with group size 16, FP8 E4M3 scales)."""
    what = f"observer {name!r}"
    if base_name != "weight":
        raise ValueError(
            f"{what} quantizes weights only, not {base_name!r} (NVFP4 activations, KV "
            "cache and queries are swept at run time by the vLLM plugin)"
        )
    problems = []
    if args.type != QuantizationType.FLOAT or args.num_bits != 4:
        problems.append(f"type {args.type}/{args.num_bits} bits (need float, 4 bits)")
    if args.strategy != QuantizationStrategy.TENSOR_GROUP:
        problems.append(f"strategy {args.strategy} (need tensor_group)")
    if args.group_size != nvfp4.BLOCK_SIZE:
        problems.append(f"group_size {args.group_size} (need {nvfp4.BLOCK_SIZE})")
    if not args.symmetric:
        problems.append("asymmetric (need symmetric)")
    if args.scale_dtype not in (None, torch.float8_e4m3fn):
        problems.append(f"scale_dtype {args.scale_dtype} (need float8_e4m3fn)")
    if args.dynamic not in (False, None):
        problems.append(f"dynamic={args.dynamic} (need static weights)")
    if problems:
        raise ValueError(
            f"{what} supports NVFP4 weights only (e.g. preset scheme NVFP4A16 or NVFP4); "
            "got " + "; ".join(problems)
        )


class _ScaleSweepObserver(Observer):
    """Shared part: statistics are the weight itself (and its absmax for fusion)."""

    objective: ClassVar[str]
    _act_sync_dict: ClassVar[dict] = {}
    _stats_attrs = ["min_vals", "max_vals", "_ss_weight"]

    def __init__(self, base_name: str, args: QuantizationArgs, **observer_kwargs):
        super().__init__(base_name, args, **observer_kwargs)
        name = f"scalesweep_{self.objective}"
        check_args(name, base_name, self.args)
        kw = dict(self.args.observer_kwargs or {})
        unknown = sorted(set(kw) - set(_KWARGS))
        if unknown:
            raise ValueError(
                f"observer {name!r}: unknown observer_kwargs {unknown}; accepted: {list(_KWARGS)}"
            )
        self.convention = kw.get("global_scale_convention", DEFAULT_GLOBAL_SCALE)
        if self.convention not in nvfp4.GLOBAL_SCALE_TARGETS:
            raise ValueError(
                f"observer {name!r}: unknown global_scale_convention {self.convention!r}; "
                f"choose one of {sorted(nvfp4.GLOBAL_SCALE_TARGETS)}"
            )
        self._objective = get_objective(self.objective)

    def update_statistics_from_observed(self, observed: torch.Tensor) -> None:
        # observed: (1, N, K/16, 16), llm-compressor's flatten of a [N, K] weight
        self.min_vals = torch.amin(observed, dim=(0, -1))
        self.max_vals = torch.amax(observed, dim=(0, -1))
        # float32 copy, as scalesweep-quantize reads it (GPTQ later edits the weight)
        self._ss_weight = observed[0].flatten(-2).detach().to(torch.float32).clone()

    def get_global_scale(self) -> torch.Tensor:
        """The fused group's shared global scale (encode factor, float32 ``[1]``)."""
        amax = None
        for stats in self.fusion_handler.get_fused_statistics():
            m = torch.maximum(stats["max_vals"].max(), -stats["min_vals"].min())
            amax = m if amax is None else torch.maximum(amax, m)
        amax = amax.detach().to(torch.float32).clamp(min=0.0)
        return nvfp4.global_scale(amax.cpu(), self.convention).to(amax.device)

    def _diag(self) -> torch.Tensor | None:
        return None

    @torch.no_grad()
    def get_qparams(self):
        assert self.has_statistics, "No statistics available. Call observer(value) first."
        w = self._ss_weight
        if not bool(torch.isfinite(w).all()):
            raise ValueError("weight has NaN/Inf values; NVFP4 cannot represent them")
        g = self.get_global_scale().to(w.device)
        diag = self._diag()
        _, scales = self._objective.quantize(w, g, diag, None)
        # as compressed-tensors' calculate_qparams: FP8-representable values in a wider
        # float dtype (the module's weight_scale parameter stores them as FP8, exactly;
        # GPTQ gathers them, which CPU torch cannot do on float8), zero points in zp_dtype
        zp_dtype = self.args.zp_dtype or torch.float32
        zero_point = torch.zeros(scales.shape, dtype=zp_dtype, device=scales.device)
        self.delete_statistics()
        return {"scale": scales.to(torch.float32), "zero_point": zero_point, "global_scale": g}


@Observer.register("scalesweep_mse")
class ScaleSweepMSEObserver(_ScaleSweepObserver):
    """Exact ScaleSweep of each block's squared error (no calibration data needed)."""

    objective = "mse"


@Observer.register("scalesweep_wmse")
class ScaleSweepWMSEObserver(_ScaleSweepObserver):
    """Exact ScaleSweep of each block's E[x^2]-weighted squared error; E[x^2] per input
    channel from a forward pre-hook on the Linear (module docstring)."""

    objective = "wmse"
    _act_sync_dict: ClassVar[dict] = {
        "_ss_sum_sq": dist.ReduceOp.SUM,
        "_ss_count": dist.ReduceOp.SUM,
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ss_sum_sq: torch.Tensor | None = None
        self._ss_count = torch.tensor(0, dtype=torch.int64)
        self._ss_hook = None

    def attach(self, module: torch.nn.Module) -> None:
        self.detach(module)
        k = getattr(module, "in_features", None)
        if k is None:
            raise ValueError(
                f"observer 'scalesweep_wmse' needs a Linear (in_features), got "
                f"{type(module).__name__}"
            )
        p = next(module.parameters(), None)
        dev = p.device if p is not None else None
        self._ss_sum_sq = torch.zeros(k, dtype=torch.float64, device=dev)
        self._ss_count = torch.tensor(0, dtype=torch.int64, device=dev)

        def hook(_mod, args):
            if HooksMixin._HOOKS_DISABLED and self._ss_hook not in HooksMixin._HOOKS_KEEP_ENABLED:
                return
            x = args[0] if isinstance(args, tuple) else args
            if isinstance(x, tuple):
                x = x[0]
            if not isinstance(x, torch.Tensor):
                return
            # the arithmetic of scalesweep_vllm.quantize.calibration's Linear hook
            x = x.detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float32)
            self._ss_sum_sq = self._ss_sum_sq.to(x.device)
            self._ss_count = self._ss_count.to(x.device)
            self._ss_sum_sq += (x * x).sum(dim=0, dtype=torch.float64)
            self._ss_count += x.shape[0]

        self._ss_hook = module.register_forward_pre_hook(hook)

    def detach(self, module: torch.nn.Module) -> None:
        if self._ss_hook is not None:
            self._ss_hook.remove()
            self._ss_hook = None

    def calibration_stats(self) -> LinearStats:
        """E[x^2] statistics seen so far, as scalesweep-quantize's calibration keeps them."""
        if self._ss_sum_sq is None:
            raise ValueError(
                "observer 'scalesweep_wmse' was never attached to a Linear: no E[x^2] "
                "statistics (it needs llm-compressor's calibration, e.g. oneshot)"
            )
        return LinearStats(sum_sq=self._ss_sum_sq, count=int(self._ss_count))

    def _diag(self) -> torch.Tensor:
        st = self.calibration_stats()
        if st.count == 0:
            warnings.warn(
                "scalesweep_wmse: no calibration token reached this Linear; its E[x^2] "
                "weight is all ones (plain MSE), as in scalesweep-quantize",
                stacklevel=3,
            )
        diag = wmse_weight(st)
        return diag.to(self._ss_weight.device)
