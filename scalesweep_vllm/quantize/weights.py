"""The weight path: one fused group of Linears in, NVFP4 tensors out.

Fused partners (see :mod:`.layers`) first get their shared global scales: the
weight global scale from the max |W| over all partners and the input global scale
from the max calibrated |x| over them (``nvfp4.global_scale``, paper or
compressed-tensors convention). Only then is each partner's every block scale
chosen by the kernel dispatch (Triton on CUDA, the torch reference elsewhere)
with that shared scale, by AbsMax, MSE sweep or WMSE sweep (WMSE weight: the
input channel's E[x^2], broadcast over rows).

With GPTQ (:mod:`.gptq`) the block scales and global scales are chosen exactly as
above first; then the group's rows (partners stacked: they share one H) are
rounded column by column onto those fixed grids with error feedback. The metrics
then also hold the relative layer-output error on the calibration data,
``tr(D H D^T) / tr(W H W^T)`` with ``D = W - W_q`` and ``H = E[x x^T]``, of RTN
and of GPTQ side by side.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from .. import kernels, nvfp4
from .gptq import GPTQConfig, gptq_quantize, output_error
from .objectives import Objective, get_objective

__all__ = ["GroupMember", "QuantizedLinear", "global_scales", "quantize_group"]


@dataclass
class GroupMember:
    """One Linear of a fused group, as the weight path needs it."""

    name: str
    weight: torch.Tensor  # [N, K], any float dtype, on the compute device
    wmse_weight: torch.Tensor | None  # [K] float32 (objective wmse), else None
    input_amax: float  # calibrated max |x| (0.0 when not calibrated)
    bias: torch.Tensor | None = None


@dataclass
class QuantizedLinear:
    """NVFP4 tensors (on the host) and error metrics of one Linear."""

    name: str
    group: list[str]
    weight_packed: torch.Tensor  # uint8 [N, K/2]
    weight_scale: torch.Tensor  # float8_e4m3fn [N, K/16]
    weight_global_scale: torch.Tensor  # float32 [1]
    input_global_scale: torch.Tensor | None  # float32 [1] or None (W4A16)
    bias: torch.Tensor | None
    input_weight: torch.Tensor  # float32 [K]: sum_j W[j, i]^2 (runtime WMSE for inputs)
    weight_amax: float
    input_amax: float
    metrics: dict = field(default_factory=dict)


def _errors(
    w: torch.Tensor, w_hat: torch.Tensor, weight: torch.Tensor | None
) -> tuple[float, float]:
    d2 = (w - w_hat).square()
    mse = float(d2.mean())
    wmse = float((d2 * weight).mean()) if weight is not None else mse
    return mse, wmse


def global_scales(
    weights: list[torch.Tensor],
    input_amax: float,
    convention: str,
    activations: bool,
    input_convention: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The group's shared weight global scale (from max |W| over all partners) and
    input global scale (max calibrated |x|, ``input_convention`` or else
    ``convention``; None without activation quantization)."""
    weight_amax = max(float(w.abs().max()) if w.numel() else 0.0 for w in weights)
    g_w = nvfp4.global_scale(weight_amax, convention).to(weights[0].device)
    g_a = nvfp4.global_scale(input_amax, input_convention or convention) if activations else None
    return g_w, g_a


def quantize_group(
    members: list[GroupMember],
    objective: str | Objective,
    convention: str,
    activations: bool,
    metrics: bool = True,
    gptq: GPTQConfig | None = None,
    hessian: torch.Tensor | None = None,
    hessian_tokens: int = 0,
    cross: torch.Tensor | None = None,
    input_convention: str | None = None,
) -> list[QuantizedLinear]:
    """Quantize one fused group with shared global scales; see the module docstring.

    Stages: :func:`global_scales` -> scales (``objective``, an
    :class:`~.objectives.Objective` or its name, which also rounds to nearest) ->
    rounding (GPTQ when ``gptq``, else the objective's nearest rounding).
    ``metrics``: also quantize with AbsMax (same global scale) and record both
    reconstruction errors (plain MSE and E[x^2]-weighted MSE, per weight element).
    ``gptq``: then run GPTQ on the fixed scales with ``hessian`` (``E[x x^T]`` of the
    group's shared input over ``hessian_tokens`` tokens). A group that saw no
    calibration token (or only zero inputs) keeps its RTN codes, with a warning and
    ``metrics["gptq"] = "rtn-fallback: ..."``.
    """
    obj = get_objective(objective) if isinstance(objective, str) else objective
    wf = [m.weight.detach().to(torch.float32) for m in members]
    input_amax = max(m.input_amax for m in members)
    g_w, g_a = global_scales(wf, input_amax, convention, activations, input_convention)
    names = [m.name for m in members]
    prepared = obj.prepare(
        None if hessian is None else hessian.to(wf[0].device), hessian_tokens, names[0]
    )
    out = []
    rtn: list[tuple[torch.Tensor, torch.Tensor]] = []
    for m, w in zip(members, wf, strict=True):
        if not bool(torch.isfinite(w).all()):
            raise ValueError(
                f"layer {m.name}: weight has NaN/Inf values; NVFP4 cannot represent them"
            )
        ww = m.wmse_weight.to(w.device) if m.wmse_weight is not None else None
        packed, scales = obj.quantize(w, g_w, ww, prepared)
        rec = {}
        if metrics:
            w_hat = kernels.dequantize(packed, scales, g_w, dtype=torch.float32)
            p_abs, s_abs = kernels.quantize(w, g_w, method="absmax")
            w_abs = kernels.dequantize(p_abs, s_abs, g_w, dtype=torch.float32)
            mse_s, wmse_s = _errors(w, w_hat, ww)
            mse_a, wmse_a = _errors(w, w_abs, ww)
            rec = {
                "mse_absmax": mse_a,
                "mse_scalesweep": mse_s,
                "wmse_absmax": wmse_a,
                "wmse_scalesweep": wmse_s,
                "scales_changed": float(
                    (scales.view(torch.uint8) != s_abs.view(torch.uint8)).float().mean()
                ),
            }
        rtn.append((packed, scales))
        out.append(
            QuantizedLinear(
                name=m.name,
                group=names,
                weight_packed=packed.cpu(),
                weight_scale=scales.cpu(),
                weight_global_scale=g_w.detach().to("cpu", torch.float32).reshape(1).clone(),
                input_global_scale=None
                if g_a is None
                else g_a.to(torch.float32).reshape(1).clone(),
                bias=None if m.bias is None else m.bias.detach().to("cpu", torch.bfloat16),
                input_weight=w.square().sum(dim=0).cpu(),
                weight_amax=float(w.abs().max()) if w.numel() else 0.0,
                input_amax=m.input_amax,
                metrics=rec,
            )
        )
    if gptq is not None:
        if cross is not None:  # GPTAQ-style target (GPTQConfig.paired)
            wf_target = _paired_target(wf, hessian, cross, gptq.damp)
        else:
            wf_target = wf
        _apply_gptq(out, wf_target, rtn, g_w, gptq, hessian, hessian_tokens, metrics)
    return out


def _paired_target(wf, hessian, cross, damp):
    """``W* = W C H^-1 = W + W (C - H) H^-1`` (H damped in the correction): the
    unquantized weights that, on the quantized inputs (``H = E[x_q x_q^T]``), best
    reproduce the original layer on the original inputs
    (``C = E[x_fp x_q^T]``); then ``||X W^T - X_q W_q^T||^2 = ||X_q (W* - W_q)^T||^2 +
    const``, which GPTQ minimises."""
    h = hessian.to(torch.float64)
    c = cross.to(h.device, torch.float64) - h  # W* = W + W (C - H) H^-1: W where C = H
    hd = h.clone()
    hd.diagonal().add_(damp * float(h.diagonal().mean()))
    chol = torch.linalg.cholesky(hd)
    out = []
    for w in wf:
        rhs = (w.to(torch.float64) @ c).T
        corr = torch.cholesky_solve(rhs, chol).T
        out.append((w.to(torch.float64) + corr).to(torch.float32).contiguous())
    return out


def _apply_gptq(out, wf, rtn, g_w, cfg, hessian, tokens, metrics) -> None:
    """Replace the RTN codes of ``out`` by GPTQ codes on the same scales."""
    name = "+".join(q.name for q in out)
    reason = None
    if hessian is None or tokens <= 0:
        reason = "no calibration tokens reached this layer"
    elif not bool(torch.isfinite(hessian).all()):
        reason = "its calibration inputs hold NaN/Inf"
    elif float(hessian.diagonal().max()) <= 0:
        reason = "all its calibration inputs are zero"
    if reason is not None:
        warnings.warn(f"GPTQ: {name}: {reason}; kept round-to-nearest", stacklevel=3)
        for q in out:
            q.metrics["gptq"] = f"rtn-fallback: {reason}"
        return
    dev = wf[0].device
    h = hessian.to(dev, torch.float32)
    res = gptq_quantize(
        torch.cat(wf, dim=0),
        # fp8 scales concatenated as bytes (cat of float8 is not supported everywhere)
        torch.cat([s.to(dev).view(torch.uint8) for _, s in rtn], dim=0).view(torch.float8_e4m3fn),
        g_w,
        h,
        damp=cfg.damp,
        block_size=cfg.block_size,
        actorder=cfg.actorder,
        inloop=cfg.scales == "inloop",
    )
    if res.grid_mismatches:  # the reference's rounding changed under the loop's
        warnings.warn(
            f"GPTQ: {name}: {res.grid_mismatches} weights rounded differently from the "
            "reference; the reference's codes are written (on the grid, feedback inexact)",
            stacklevel=3,
        )
    row = 0
    for q, w, (p_rtn, s_rtn) in zip(out, wf, rtn, strict=True):
        codes = res.codes[row : row + w.shape[0]]
        if res.scales is not None:
            s_gq = res.scales[row : row + w.shape[0]].contiguous()
            q.weight_scale = s_gq.cpu()
        else:
            s_gq = s_rtn
        row += w.shape[0]
        q.weight_packed = nvfp4.pack_fp4(codes).cpu()
        q.metrics["gptq"] = "ok"
        q.metrics["gptq_damp_used"] = res.damp_used
        q.metrics["gptq_dead_channels"] = res.dead_channels
        q.metrics["gptq_grid_mismatches"] = res.grid_mismatches
        if metrics:
            w_rtn = kernels.dequantize(p_rtn, s_rtn, g_w, dtype=torch.float32)
            w_gq = kernels.dequantize(
                q.weight_packed.to(dev), s_gq.to(dev), g_w, dtype=torch.float32
            )
            ref = output_error(w, h)
            q.metrics["mse_gptq"] = float((w - w_gq).square().mean())
            q.metrics["out_err_rtn"] = output_error(w - w_rtn, h) / ref if ref > 0 else 0.0
            q.metrics["out_err_gptq"] = output_error(w - w_gq, h) / ref if ref > 0 else 0.0
