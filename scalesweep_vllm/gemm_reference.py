"""The packed NVFP4 GEMMs' arithmetic in plain torch: the specification that the C++
kernels (``kernels/cpu/nvfp4_gemm.cpp``) match bit for bit on every ISA build.

Both take the checkpoint's tensors (``packed`` uint8 ``[N, K/2]``, ``scales``
float8_e4m3fn ``[N, K/16]``) and one fp32 per output row (fused q/k/v or gate/up shards
keep their own global scales). Every operation is an fp32 multiply, add or fused
multiply-add (``fma(a, b, c) = a * b + c`` rounded once), in a stated order, so the
result does not depend on the batch, the thread count or the tiling. With ``2q`` the
E2M1 codes as the integers in [-12, 12] and ``v`` the fp8 block scales:

* **Block partials** (both): ``P_b = fma(x_15, 2q_15, ... fma(x_0, 2q_0, +0))`` over
  the block's 16 inputs in order.
* **W4A16**: ``y = fma(h_B, P_B, ... fma(h_0, P_0, +0))`` in block order, with
  ``h_b = (v_b / G_w[n]) * 0.5`` (exact halving: ``v / G >= 2^-124`` for the accepted
  ``G <= 2^115``). Mathematically ``sum_k x_k W_k`` with ``W = (v / G) * q`` the
  dequantized weight; the roundings are 16 per block in the partial and one per block.
* **W4A4** (the FP4 tensor core's arithmetic): x is the activation's ``2qa``, so
  ``P_b = sum (2qa)(2qw)`` is an exact integer (|P_b| <= 16 * 144 = 2304), and
  ``T_b = (sa_b * sw_b) * P_b`` is exact in fp32 (fp8 x fp8 has at most 8 significant
  bits, times 12 bits of P_b): the fma is an fp32 add of the exact term. ``S`` sums
  the T_b in block order, and ``y = (S * 0.25) * alpha[n]`` with ``alpha = 1 / (G_a *
  G_w[n])`` (what vLLM passes ``cutlass_scaled_fp4_mm``). Only the order of the fp32
  block sum is a choice.

fp32 FMA is emulated exactly in float64 (:func:`fma32`). Slow (a Python loop over K);
for tests.
"""

from __future__ import annotations

import torch

from . import nvfp4

__all__ = ["fma32", "w4a16", "w4a4"]


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a * b + c`` for fp32 tensors, rounded once to fp32 (round to nearest even), as
    the FMA instructions compute it. In float64 the product is exact (48 bits) and
    TwoSum gives ``s + e = a*b + c`` exactly; rounding s to fp32 is then correct unless
    s is exactly halfway between two fp32 values and e != 0 (no fp32 midpoint lies
    strictly between s and the exact sum: midpoints are float64 numbers), where the
    sign of e decides."""
    p = a.double() * b.double()
    c64 = c.double().expand_as(p) if c.dim() < p.dim() else c.double()
    s = p + c64
    bb = s - p
    e = (p - (s - bb)) + (c64 - bb)
    r = s.float()
    d = s - r.double()
    inf = torch.full_like(r, float("inf"))
    other = torch.nextafter(r, torch.where(d > 0, inf, -inf))
    mid = (d != 0) & ((r.double() + other.double()) * 0.5 == s)
    fix = mid & torch.isfinite(e) & (e * d > 0)
    return torch.where(fix, other, r)


def _partials(x: torch.Tensor, q2: torch.Tensor) -> torch.Tensor:
    """``P[m, n, b]`` of :func:`w4a16` / :func:`w4a4` (x ``[M, K]``, q2 ``[N, K]``)."""
    bs = nvfp4.BLOCK_SIZE
    m, k = x.shape
    n = q2.shape[0]
    xv = x.reshape(m, 1, k // bs, bs)
    qv = q2.reshape(1, n, k // bs, bs)
    part = torch.zeros(m, n, k // bs, dtype=torch.float32)
    for j in range(bs):
        part = fma32(xv[..., j], qv[..., j], part)
    return part


def w4a16(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, g_rows: torch.Tensor
) -> torch.Tensor:
    """fp32 ``[M, N]``: x ``[M, K]`` (any float dtype, used in fp32) times the weight."""
    part = _partials(x.to(torch.float32), _integers(packed).to(torch.float32))
    g = g_rows.to(torch.float32).reshape(-1, 1)
    h = (scales.to(torch.float32) / g) * 0.5  # [N, K/16]
    y = torch.zeros(part.shape[:2], dtype=torch.float32)
    for b in range(part.shape[2]):
        y = fma32(h[:, b].unsqueeze(0), part[:, :, b], y)
    return y


def _integers(packed: torch.Tensor) -> torch.Tensor:
    """The codes as the integers 2q in [-12, 12] (int64)."""
    return (nvfp4.decode_e2m1(nvfp4.unpack_fp4(packed)) * 2).to(torch.int64)


def w4a4(
    xpacked: torch.Tensor,
    xscales: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    alpha_rows: torch.Tensor,
) -> torch.Tensor:
    """fp32 ``[M, N]`` from the activation's codes/scales and the weight's, with
    ``alpha_rows[n] = 1 / (G_a * G_w[n])``."""
    bs = nvfp4.BLOCK_SIZE
    qa = _integers(xpacked)  # [M, K]
    qw = _integers(packed)  # [N, K]
    m, k = qa.shape
    n = qw.shape[0]
    # exact integer block products, [M, N, K/16]
    blocks = torch.einsum("mbj,nbj->mnb", qa.view(m, k // bs, bs), qw.view(n, k // bs, bs))
    sa, sw = xscales.to(torch.float32), scales.to(torch.float32)
    terms = blocks.to(torch.float32) * (sa.unsqueeze(1) * sw.unsqueeze(0))  # exact
    s = torch.zeros(m, n, dtype=torch.float32)
    for b in range(k // bs):
        s = s + terms[:, :, b]
    return (s * 0.25) * alpha_rows.to(torch.float32).unsqueeze(0)
