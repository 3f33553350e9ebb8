"""Packed NVFP4 GEMMs on the CPU: the weight stays at 4.5 bits per value.

:func:`pack` repacks a checkpoint's NVFP4 weight once (at load) into the C++ kernels'
layout (``kernels/cpu/nvfp4_gemm.cpp``): output channels in tiles of 16, for each
tile and 4 input features their 64 codes in 32 bytes (in the order AVX2's interleaves
produce), and the fp8 block scales as
``[tiles, K/16, 16]``; memory stays ``K/2 + K/16`` bytes per output channel plus one
fp32 per channel (its global scale, or alpha). :func:`w4a16` and :func:`w4a4` run the
GEMMs, bit for bit the arithmetic of :mod:`scalesweep_vllm.gemm_reference` (fixed fp32
summation order: the result is the same for any batch, thread count and ISA build).

Both are ``torch.library`` custom ops with fake implementations, so vLLM's compiled
CPU mode (Dynamo + inductor) traces around them; eager calls go to the extension
directly (the custom-op dispatch costs tens of microseconds, as much as a small
layer's whole GEMM at batch 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import nvfp4
from . import cpu_backend

__all__ = ["PackedWeight", "available", "pack", "w4a16", "w4a4"]

TILE = 16
# The fp8 decoding table is cpu_backend.fp8_table() (its NaN entries 0x7f / 0xff are
# never read: pack refuses those codes).


def available() -> str:
    """'' when the packed GEMMs can run here, else why not."""
    mod = cpu_backend.load()
    if mod is None:
        return f"the C++ CPU backend is unavailable ({cpu_backend.why()})"
    if not hasattr(mod, "gemm_w4a16"):
        return "the C++ CPU backend was built without the packed GEMMs (rebuild it)"
    return ""


@dataclass
class PackedWeight:
    """A weight in the kernels' layout; ``rows`` is fp32 ``[tiles * 16]``: G_w per
    output channel (W4A16) or alpha = 1 / (G_a G_w) per channel (W4A4), padding 1."""

    codes: torch.Tensor  # uint8 [tiles, K, 8], groups of 4 features in 32 bytes
    scales: torch.Tensor  # uint8 [tiles, K/16, 16]
    rows: torch.Tensor  # fp32 [tiles * 16]
    n: int
    k: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.rows))


def pack(
    packed: torch.Tensor, scales: torch.Tensor, rows: torch.Tensor, kind: str = "w4a16"
) -> PackedWeight:
    """Repack ``packed`` uint8 ``[N, K/2]`` and ``scales`` float8_e4m3fn ``[N, K/16]``
    (the checkpoint's tensors, this rank's slice) with ``rows`` fp32 ``[N]``: G_w per
    channel for ``kind="w4a16"`` (within the NVFP4 global-scale range, which the
    kernel's exactness argument needs), alpha per channel for ``"w4a4"`` (positive).
    ValueError on shapes, dtypes, NaN scale codes or rows out of range."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(
            f"packed weight must be uint8 [N, K/2], got {packed.dtype} {tuple(packed.shape)}"
        )
    n, k = packed.shape[0], packed.shape[1] * 2
    if scales.dtype != torch.float8_e4m3fn or tuple(scales.shape) != (n, k // nvfp4.BLOCK_SIZE):
        raise ValueError(
            f"scales must be float8_e4m3fn [{n}, {k // nvfp4.BLOCK_SIZE}], got "
            f"{scales.dtype} {tuple(scales.shape)}"
        )
    if k == 0 or k % nvfp4.BLOCK_SIZE or n == 0:
        raise ValueError(f"weight [{n}, {k}]: K must be a positive multiple of 16, N positive")
    sb = scales.view(torch.uint8)
    if bool(((sb & 0x7F) == 0x7F).any()):
        raise ValueError("scales hold the fp8 NaN code")
    rows = rows.to(torch.float32).reshape(-1)
    if kind not in ("w4a16", "w4a4"):
        raise ValueError(f"kind must be 'w4a16' or 'w4a4', got {kind!r}")
    if rows.numel() != n or not bool(torch.isfinite(rows).all()) or bool((rows <= 0).any()):
        raise ValueError(f"rows must be {n} finite positive fp32 values")
    lo, hi = nvfp4.GLOBAL_SCALE_MIN, nvfp4.GLOBAL_SCALE_MAX
    if kind == "w4a16" and bool(((rows < lo) | (rows > hi)).any()):
        raise ValueError(
            f"global scales must lie in [2^-117, 2^115], got {rows.min()}..{rows.max()}"
        )
    t = -(-n // TILE)
    pad = t * TILE - n
    codes = nvfp4.unpack_fp4(packed.cpu())  # [N, K]
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad, k)])
        sb = torch.cat([sb.cpu(), sb.new_zeros(pad, sb.shape[1]).cpu()])
        rows = torch.cat([rows, rows.new_ones(pad)])
    codes = codes.view(t, TILE, k).transpose(1, 2)  # [T, K, 16]: tile, feature, channel
    # groups of 4 features in 32 bytes: channel c of feature kj at byte
    # 16 * ((c % 8) // 4) + 4 * kj + c % 4, low nibble for c < 8 (nvfp4_gemm.cpp)
    byte = (codes[..., :8] | (codes[..., 8:] << 4)).reshape(t, k // 4, 4, 2, 4)
    tiled = byte.permute(0, 1, 3, 2, 4).reshape(t, k, 8).contiguous()
    st = sb.cpu().reshape(t, TILE, k // nvfp4.BLOCK_SIZE).transpose(1, 2).contiguous()
    return PackedWeight(tiled, st, rows.contiguous(), n, k)


@torch.library.custom_op("scalesweep::nvfp4_gemm_w4a16_cpu", mutates_args=())
def _w4a16_op(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, rows: torch.Tensor, n: int
) -> torch.Tensor:
    mod = cpu_backend.load()
    return mod.gemm_w4a16(x, codes, scales, rows, n, cpu_backend.fp8_table())


@_w4a16_op.register_fake
def _(x, codes, scales, rows, n):
    return x.new_empty((x.shape[0], n), dtype=torch.float32)


@torch.library.custom_op("scalesweep::nvfp4_gemm_w4a4_cpu", mutates_args=())
def _w4a4_op(
    xcodes: torch.Tensor,
    xscales: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    rows: torch.Tensor,
    n: int,
) -> torch.Tensor:
    mod = cpu_backend.load()
    return mod.gemm_w4a4(xcodes, xscales, codes, scales, rows, n, cpu_backend.fp8_table())


@_w4a4_op.register_fake
def _(xcodes, xscales, codes, scales, rows, n):
    return xcodes.new_empty((xcodes.shape[0], n), dtype=torch.float32)


_READY: list = []  # the extension module, once it has been found to have the GEMMs


def _module():
    """The extension (RuntimeError saying why where the packed GEMMs cannot run);
    checked once, the per-call path is a list lookup."""
    if not _READY:
        why = available()
        if why:
            raise RuntimeError(f"packed NVFP4 GEMM: {why}")
        _READY.append(cpu_backend.load())
    return _READY[0]


def w4a16(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """fp32 ``[..., N]``: x ``[..., K]`` (fp32/fp16/bf16, CPU) times the packed weight."""
    mod = _module()
    if x.device.type != "cpu" or x.shape[-1] != w.k:
        raise ValueError(f"x must be a CPU tensor [..., {w.k}], got {tuple(x.shape)} on {x.device}")
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, w.k).to(torch.float32).contiguous()
    if torch.compiler.is_compiling():
        y = _w4a16_op(x2, w.codes, w.scales, w.rows, w.n)
    else:
        y = mod.gemm_w4a16(x2, w.codes, w.scales, w.rows, w.n, cpu_backend.fp8_table())
    return y.reshape(lead + (w.n,))


def w4a4(xpacked: torch.Tensor, xscales: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """fp32 ``[..., N]`` from the activation's NVFP4 codes uint8 ``[..., K/2]`` and
    scales float8_e4m3fn ``[..., K/16]`` (:func:`scalesweep_vllm.kernels.quantize`)."""
    mod = _module()
    if xpacked.dtype != torch.uint8 or xpacked.shape[-1] * 2 != w.k:
        raise ValueError(
            f"activation codes must be uint8 [..., {w.k // 2}], got {tuple(xpacked.shape)}"
        )
    if xscales.dtype != torch.float8_e4m3fn or xscales.shape[-1] * nvfp4.BLOCK_SIZE != w.k:
        raise ValueError(f"activation scales must be float8_e4m3fn [..., {w.k // 16}]")
    lead = tuple(xpacked.shape[:-1])
    xc = xpacked.reshape(-1, w.k // 2).contiguous()
    xs = xscales.reshape(-1, w.k // nvfp4.BLOCK_SIZE).contiguous().view(torch.uint8)
    if torch.compiler.is_compiling():
        y = _w4a4_op(xc, xs, w.codes, w.scales, w.rows, w.n)
    else:
        y = mod.gemm_w4a4(xc, xs, w.codes, w.scales, w.rows, w.n, cpu_backend.fp8_table())
    return y.reshape(lead + (w.n,))
