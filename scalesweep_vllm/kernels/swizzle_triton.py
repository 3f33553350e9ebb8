"""Triton kernel: FP8 block scales, row-major ``[M, K/16]``, into the swizzled, padded
layout that vLLM's ``cutlass_scaled_fp4_mm`` reads. Kernel only; :mod:`.swizzle`
checks, allocates and launches.

Layout (vLLM's ``swizzle_blockscale`` in
``vllm/model_executor/layers/quantization/utils/nvfp4_utils.py``, the
``tcgen05-mma-scale-factor-b-layout-4x`` of NVIDIA's PTX guide): pad to
``[Mp, Kp] = [round_up(M, 128), round_up(K/16, 4)]`` with zeros, view as
``[Mp/128, 4, 32, Kp/4, 4]`` (m0, m1, m2, k0, k1), permute to (m0, k0, m2, m1, k1).
Element (m, kb) with ``m = 128 m0 + 32 m1 + m2`` and ``kb = 4 k0 + k1`` lands at
``(((m0 * Kp/4 + k0) * 32 + m2) * 4 + m1) * 4 + k1``.
"""

import triton
import triton.language as tl

__all__ = ["swizzle_kernel", "swizzled_offset"]


@triton.jit
def swizzled_offset(m, kb, kp4):
    """Flat offset of scale (row m, block kb) in the swizzled buffer (kp4 = Kp / 4).
    A quantize kernel storing its scale through this offset writes the layout directly."""
    m0 = m // 128
    r = m % 128
    return (((m0 * kp4 + kb // 4) * 32 + r % 32) * 4 + r // 32) * 4 + kb % 4


@triton.jit
def swizzle_kernel(src_ptr, dst_ptr, m, kb, kp4, n_out, BLOCK: tl.constexpr):
    """One pass over the output: every byte of ``dst`` (padding included, as zeros) is
    written once, each read from ``src`` [m, kb] uint8 (row-major) or zero."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = o < n_out
    k1 = o % 4
    t = o // 4
    m1 = t % 4
    t = t // 4
    m2 = t % 32
    t = t // 32
    k0 = t % kp4
    m0 = t // kp4
    row = m0 * 128 + m1 * 32 + m2
    col = k0 * 4 + k1
    inside = live & (row < m) & (col < kb)
    v = tl.load(src_ptr + row.to(tl.int64) * kb + col, mask=inside, other=0)
    tl.store(dst_ptr + o, v, mask=live)
