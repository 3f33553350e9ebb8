"""Activation block scales in the layout vLLM's FP4 GEMM reads, without the per-call
zeros + copy + permute + contiguous of vLLM's ``swizzle_blockscale``.

``cutlass_scaled_fp4_mm`` (vLLM, Blackwell) takes block scales padded to
``[round_up(M, 128), round_up(K/16, 4)]`` and swizzled in 128x4 tiles (layout in
:mod:`.swizzle_triton`). vLLM's own activation quantizer writes that layout directly
(``scaled_fp4_quant(..., is_sf_swizzled_layout=True)``), and so does ScaleSweep's
quantize kernel on CUDA (:func:`quantize_swizzled`: its scale store goes through the
swizzled offset into a zeroed padded buffer, custom op
``scalesweep::nvfp4_quantize_swizzled``). Row-major scales from elsewhere are moved by
:func:`swizzle_scales`: one Triton pass (every output byte written once), registered
as the custom op ``scalesweep::nvfp4_swizzle_scales`` so torch.compile / CUDA graphs see
through it. Off CUDA (and in tests) a torch scatter with the same offsets is used; the
Triton kernel runs on CPU in Triton's interpreter with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch

from ..nvfp4 import BLOCK_SIZE
from . import launch

__all__ = [
    "quantize_swizzled",
    "swizzle_offsets",
    "swizzle_scales",
    "swizzled_scale_shape",
]

_BLOCK = 1024


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def swizzled_scale_shape(m: int, kb: int) -> tuple[int, int]:
    """Shape of the swizzled scales for ``m`` rows of ``kb`` 16-element blocks."""
    return _round_up(m, 128), _round_up(kb, 4)


def swizzle_offsets(m: int, kb: int, device=None) -> torch.Tensor:
    """int64 ``[m, kb]``: flat position of each row-major scale in the swizzled buffer
    (the same formula as :func:`.swizzle_triton.swizzled_offset`)."""
    kp4 = swizzled_scale_shape(m, kb)[1] // 4
    r = torch.arange(m, device=device, dtype=torch.int64)[:, None]
    c = torch.arange(kb, device=device, dtype=torch.int64)[None, :]
    rr = r % 128
    return ((((r // 128) * kp4 + c // 4) * 32 + rr % 32) * 4 + rr // 32) * 4 + c % 4


def _swizzle_triton(s: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out`` (tests poison it): uint8 of the swizzled shape; every byte is written."""
    m, kb = s.shape
    mp, kp = swizzled_scale_shape(m, kb)
    if out is None:
        out = torch.empty((mp, kp), dtype=torch.uint8, device=s.device)
    n_out = mp * kp
    if n_out:
        mod = launch._kernels(s.device, "swizzle_triton")
        grid = ((n_out + _BLOCK - 1) // _BLOCK,)
        mod.swizzle_kernel[grid](s, out, m, kb, kp // 4, n_out, BLOCK=_BLOCK, num_warps=4)
    return out


def _swizzle_torch(s: torch.Tensor) -> torch.Tensor:
    m, kb = s.shape
    mp, kp = swizzled_scale_shape(m, kb)
    out = torch.zeros(mp * kp, dtype=torch.uint8, device=s.device)
    out[swizzle_offsets(m, kb, s.device).reshape(-1)] = s.reshape(-1)
    return out.reshape(mp, kp)


@torch.library.custom_op("scalesweep::nvfp4_swizzle_scales", mutates_args=())
def _swizzle_op(scales: torch.Tensor) -> torch.Tensor:
    s = scales.contiguous()
    return _swizzle_triton(s) if s.is_cuda and launch.have_triton() else _swizzle_torch(s)


@_swizzle_op.register_fake
def _(scales):
    return scales.new_empty(swizzled_scale_shape(*scales.shape), dtype=torch.uint8)


def swizzle_scales(scales: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Row-major FP8 block scales ``[M, K/16]`` -> swizzled, zero-padded
    ``[round_up(M, 128), round_up(K/16, 4)]`` float8_e4m3fn, equal to vLLM's
    ``swizzle_blockscale(scales)``. ``backend``: "auto" (the custom op: Triton on CUDA,
    torch elsewhere), "triton" (CPU tensors need TRITON_INTERPRET=1) or "torch"."""
    if scales.dtype not in (torch.float8_e4m3fn, torch.uint8):
        raise TypeError(f"scales must be float8_e4m3fn, got {scales.dtype}")
    if scales.dim() != 2:
        raise ValueError(f"scales must be [M, K/16], got shape {tuple(scales.shape)}")
    s = scales.view(torch.uint8)
    if backend == "auto":
        out = _swizzle_op(s)
    elif backend == "triton":
        out = _swizzle_triton(s.contiguous())
    elif backend == "torch":
        out = _swizzle_torch(s.contiguous())
    else:
        raise ValueError(f"unknown backend {backend!r}; choose auto, torch or triton")
    return out.view(torch.float8_e4m3fn)


def quantize_swizzled(
    x: torch.Tensor,
    global_scale: torch.Tensor | float,
    method: str = "mse",
    weight: torch.Tensor | None = None,
    pad_bytes: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [M, K] quantized for ``cutlass_scaled_fp4_mm``: packed codes
    ``[M, K/2 + pad_bytes]`` (zero bytes appended where the weight was padded to a
    multiple of 32 along K) and swizzled, padded block scales. Same codes and scales
    as :func:`scalesweep_vllm.kernels.quantize`."""
    from .dispatch import quantize

    if x.dim() != 2 or x.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"x must be [M, K] with K a multiple of {BLOCK_SIZE}, got {x.shape}")
    kb = (x.shape[-1] + 2 * pad_bytes) // BLOCK_SIZE
    if x.is_cuda and launch.have_triton():  # the quantize kernel writes the layout itself
        packed, sw = launch.quantize_swizzled(x, global_scale, method, weight, kb)
        if pad_bytes:
            packed = torch.nn.functional.pad(packed, (0, pad_bytes))
        return packed.contiguous(), sw
    packed, scales = quantize(x, global_scale, method, weight)
    if pad_bytes:
        packed = torch.nn.functional.pad(packed, (0, pad_bytes))
    sw = swizzle_scales(scales)
    if sw.shape[1] != swizzled_scale_shape(x.shape[0], kb)[1]:  # never for pads < 32 elements
        raise ValueError(f"padding of {pad_bytes} bytes changes the scale tiles of {x.shape}")
    return packed.contiguous(), sw
