"""The packed NVFP4 GEMMs' arithmetic in plain torch: the specification that the C++
kernels (``kernels/cpu/nvfp4_gemm.cpp``) match bit for bit on every ISA build.

Both take the checkpoint's tensors (``packed`` uint8 ``[N, K/2]``, ``scales``
float8_e4m3fn ``[N, K/16]``) and a global scale per output row (fused q/k/v or
gate/up shards keep their own). Every operation is an fp32 operation rounded on its
own, in a stated order, so the result does not depend on the batch, the thread count
or the tiling:

* **W4A16**: ``y[m, n] = (...((x[m,0] W[n,0]) + x[m,1] W[n,1]) + ...)`` in k order,
  where ``W = (v / G_w[n]) * e2m1`` is exactly the dequantized weight (compressed-
  tensors' order, :func:`scalesweep_vllm.kernels.dequantize` in fp32).
* **W4A4** (the FP4 tensor core's arithmetic): with ``2q`` the E2M1 codes as the
  integers in [-12, 12], each 16-block's ``I_b = sum_j (2qa_j)(2qw_j)`` is an exact
  integer (|I_b| <= 16 * 144 = 2304), ``T_b = I_b * (sa_b * sw_b)`` is exact in fp32
  (fp8 x fp8 has at most 8 significant bits, times 12 bits of I_b), the T_b are summed
  in block order in fp32, and ``y = (S * 0.25) * alpha[n]`` with ``alpha = 1 / (G_a *
  G_w[n])`` (what vLLM passes ``cutlass_scaled_fp4_mm``). The exact terms are the same
  whatever the hardware; only the order of the fp32 block sum is a choice (stated here).

Slow (a Python loop over K or the blocks); for tests.
"""

from __future__ import annotations

import torch

from . import nvfp4

__all__ = ["w4a16", "w4a4", "weight_values"]


def weight_values(packed: torch.Tensor, scales: torch.Tensor, g_rows: torch.Tensor) -> torch.Tensor:
    """fp32 ``[N, K]``: ``(v / G_w[n]) * e2m1``, the dequantized weight."""
    g = g_rows.to(torch.float32).reshape(-1, 1)
    s = (scales.to(torch.float32) / g).repeat_interleave(nvfp4.BLOCK_SIZE, dim=-1)
    return s * nvfp4.decode_e2m1(nvfp4.unpack_fp4(packed))


def w4a16(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, g_rows: torch.Tensor
) -> torch.Tensor:
    """fp32 ``[M, N]``: x ``[M, K]`` (any float dtype, used in fp32) times the weight."""
    w = weight_values(packed, scales, g_rows)
    xf = x.to(torch.float32)
    y = torch.zeros(xf.shape[0], w.shape[0], dtype=torch.float32)
    for k in range(xf.shape[1]):
        y = y + xf[:, k : k + 1] * w[:, k].unsqueeze(0)
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
