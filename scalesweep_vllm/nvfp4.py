"""NVFP4: the format, written once.

An NVFP4 tensor is three things (the compressed-tensors layout that vLLM reads):

* FP4 E2M1 elements, magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6} and a sign bit,
  packed two per byte along the reduction dimension (even element in the low
  nibble): ``weight_packed`` uint8 ``[N, K/2]``.
* one FP8 E4M3 block scale per 16 consecutive elements: ``weight_scale``
  float8_e4m3fn ``[N, K/16]``. The 126 positive finite E4M3 values are ordered
  like their bit codes 1..126, so a range of scales is a range of integer codes.
* one FP32 global scale G, stored as the *encode* factor
  (compressed-tensors' ``weight_global_scale = 448*6/amax``): the element x is
  represented as ``x ~= q * (fp8_scale / G)``.

Decoding follows compressed-tensors bit for bit: ``(fp8_scale.float() / G) * q``
in fp32, then cast to the target dtype (compressed-tensors
``quantization/lifecycle/forward.py::_dequantize``).

Everything here is plain torch and runs on any device.
"""

from __future__ import annotations

import torch

__all__ = [
    "BLOCK_SIZE",
    "E2M1_VALUES",
    "FP4_MAX",
    "FP8_MAX",
    "FP8_MAX_CODE",
    "GLOBAL_SCALE_MAX",
    "GLOBAL_SCALE_MIN",
    "GLOBAL_SCALE_TARGETS",
    "decode_e2m1",
    "encode_e2m1",
    "fp8_ceil_code",
    "fp8_code_to_value",
    "fp8_rne_code",
    "fp8_value_to_code",
    "fp8_values",
    "global_scale",
    "pack_fp4",
    "round_e2m1",
    "round_e2m1_magnitude",
    "unpack_fp4",
]

BLOCK_SIZE = 16
FP4_MAX = 6.0
FP8_MAX = 448.0
FP8_MAX_CODE = 126  # 0x7E = 448; 0x7F is NaN in e4m3fn
#: E2M1 magnitudes, indexed by the 3-bit magnitude code.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: FP8 block-scale ceiling used to derive the global scale, by convention:
#: "paper" (ScaleSweep, four-over-six) leaves the largest blocks 448/256 = 1.75x
#: headroom above their AbsMax scale; "compressed-tensors" is llm-compressor's
#: default (the largest block's AbsMax scale is exactly 448).
GLOBAL_SCALE_TARGETS = {"paper": 256.0, "compressed-tensors": 448.0}
#: Largest global scale accepted: above it G / fp8_min overflows fp32 and the
#: arithmetic of the sweep is no longer exact. It corresponds to a tensor amax
#: below ~5e-33, i.e. a tensor that is zero for every practical purpose.
GLOBAL_SCALE_MAX = 2.0**115
#: Smallest global scale accepted: below it ``G / 448`` is an fp32 subnormal, whose
#: rounding breaks the sweep's proofs (``sweep`` module docstring). Only a tensor
#: amax above ~2.6e38 (paper convention) reaches it; :func:`global_scale` raises
#: smaller results to it.
GLOBAL_SCALE_MIN = 2.0**-117


def round_e2m1_magnitude(a: torch.Tensor) -> torch.Tensor:
    """:func:`round_e2m1` for ``a >= 0``: the grid has step 0.5 below 2, 1 below
    4 and 2 up to 6, so ``rne(a / step) * step`` (exact: steps are powers of
    two) rounds to nearest with ties to the even code, then saturate at 6."""
    step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0)).to(a.dtype)
    return torch.clamp(torch.round(a / step) * step, max=FP4_MAX)


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value, ties to even, saturating at +-6.

    Works in x's floating dtype (fp32 for other dtypes). At a midpoint the value
    with the even magnitude code wins: 0.25->0, 0.75->1, 1.25->1, 1.75->2,
    2.5->2, 3.5->4, 5->4. The sign of x (including -0.0) is kept.
    """
    xf = x if x.is_floating_point() else x.to(torch.float32)
    q = round_e2m1_magnitude(xf.abs())
    return torch.where(torch.signbit(xf), -q, q)


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8, 0..15) of ``round_e2m1(x)``: ``signbit << 3 | magnitude``.

    The sign bit is x's sign bit, so -0.0 and small negatives encode as 8 (-0),
    as compressed-tensors' ``pack_fp4_to_uint8`` does.
    """
    a = round_e2m1(x).abs()
    idx = (a >= 0.5).to(torch.uint8)  # 0.5 -> 1
    idx += (a >= 1.0).to(torch.uint8)
    idx += (a >= 1.5).to(torch.uint8)
    idx += (a >= 2.0).to(torch.uint8)
    idx += (a >= 3.0).to(torch.uint8)
    idx += (a >= 4.0).to(torch.uint8)
    idx += (a >= 6.0).to(torch.uint8)
    return idx | (torch.signbit(x).to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Float32 values of 4-bit codes (uint8, 0..15)."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    c = codes.to(torch.long)
    mag = table[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte along the last dim: ``c[2k] | c[2k+1] << 4``."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4: last dim must be even, got shape {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`: uint8 ``[..., K/2]`` to codes ``[..., K]``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_fp4 expects uint8, got {packed.dtype}")
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


# ---------------------------------------------------------------------------
# FP8 E4M3 codes. Positive finite codes 1..126 are ordered like their values:
# codes 1..7 are the subnormals k * 2^-9, code 8*e + j (e >= 1) is
# 2^(e-7) * (1 + j/8).
# ---------------------------------------------------------------------------


def fp8_values(device: torch.device | str | None = None) -> torch.Tensor:
    """Float32 value of every FP8 E4M3 code 0..126 (index = code, 0 -> 0.0)."""
    codes = torch.arange(0, FP8_MAX_CODE + 1, dtype=torch.uint8, device=device)
    return codes.view(torch.float8_e4m3fn).to(torch.float32)


def fp8_code_to_value(codes: torch.Tensor) -> torch.Tensor:
    """Float32 values of integer codes 0..126 (any integer dtype)."""
    return codes.to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)


def fp8_value_to_code(scales: torch.Tensor) -> torch.Tensor:
    """Integer codes (int32) of non-negative float8_e4m3fn scales."""
    if scales.dtype != torch.float8_e4m3fn:
        raise TypeError(f"expected float8_e4m3fn scales, got {scales.dtype}")
    return scales.view(torch.uint8).to(torch.int32)


def _fp8_floor_code(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For finite fp32 ``t >= 0``: the largest code whose value is <= t
    (unclamped: 0 below the smallest subnormal, above 126 past 448), and where t
    lies between that code's value and the next one: ``rest_sign`` is the sign of
    (t - midpoint) and ``exact`` says whether t is the code's value itself.
    Subnormal range (t < 2^-6): codes are k * 2^-9, so ``t * 512`` is exact and
    its floor is the code. Normal range: the code is ``8 * (e + 7) + top 3
    mantissa bits``; the 20 discarded mantissa bits give the rest. The kernels
    use the same integer arithmetic."""
    t = t.to(torch.float32)
    normal = t >= 2.0**-6
    ts = t * 512.0
    sub_floor = torch.floor(ts)
    sub_frac = ts - sub_floor  # exact: ts < 8
    sub_code = sub_floor.to(torch.int64)
    bits = t.view(torch.int32).to(torch.int64)
    exp = (bits >> 23) - 127
    mant = bits & 0x7FFFFF
    nrm_code = (exp + 7) * 8 + (mant >> 20)
    nrm_rest = mant & 0xFFFFF
    code = torch.where(normal, nrm_code, sub_code)
    exact = torch.where(normal, nrm_rest == 0, sub_frac == 0)
    rest_sign = torch.where(
        normal, torch.sign(nrm_rest - 0x80000), torch.sign(sub_frac - 0.5).to(torch.int64)
    )
    return code, rest_sign, exact


def fp8_rne_code(t: torch.Tensor) -> torch.Tensor:
    """Code of ``t.clamp(0, 448).to(float8_e4m3fn)`` (round to nearest, ties to
    even) as int32, for finite t >= 0. Identical to torch's conversion (a test
    checks every case); written on the fp32 bits so the kernels can share it."""
    t = t.to(torch.float32).clamp(0.0, FP8_MAX)
    code, rest_sign, _ = _fp8_floor_code(t)
    up = (rest_sign > 0) | ((rest_sign == 0) & ((code & 1) == 1))
    code = code + up.to(code.dtype)
    return code.clamp(0, FP8_MAX_CODE).to(torch.int32)


def fp8_ceil_code(t: torch.Tensor) -> torch.Tensor:
    """Smallest code whose value is >= t, clamped to [1, 126] (int32)."""
    tc = t.to(torch.float32).clamp(0.0, FP8_MAX)
    code, _, exact = _fp8_floor_code(tc)
    code = code + (~exact).to(code.dtype)
    return code.clamp(1, FP8_MAX_CODE).to(torch.int32)


def global_scale(amax: torch.Tensor | float, convention: str = "paper") -> torch.Tensor:
    """FP32 global (encode) scale ``target * 6 / amax`` as a shape-[1] tensor.

    ``convention="paper"`` uses target 256 (ScaleSweep / four-over-six: every
    block, the largest included, keeps 448/256 = 1.75x room above its AbsMax
    scale, more than the 12/7 the sweep can use); ``"compressed-tensors"`` uses
    448 (llm-compressor's ``generate_gparam``). A zero or non-finite amax gives
    1.0, as compressed-tensors does; the result is clamped to
    [:data:`GLOBAL_SCALE_MIN`, :data:`GLOBAL_SCALE_MAX`], the range the sweep accepts.
    """
    if convention not in GLOBAL_SCALE_TARGETS:
        raise ValueError(
            f"unknown global-scale convention {convention!r}; "
            f"choose one of {sorted(GLOBAL_SCALE_TARGETS)}"
        )
    amax_t = torch.as_tensor(amax, dtype=torch.float32).detach().reshape(-1)
    if amax_t.numel() != 1:
        amax_t = amax_t.abs().max().reshape(1)
    amax_t = amax_t.to(torch.float32)
    g = (GLOBAL_SCALE_TARGETS[convention] * FP4_MAX) / amax_t
    g = torch.where(torch.isfinite(g) & (amax_t > 0), g, torch.ones_like(g))
    return g.clamp(min=GLOBAL_SCALE_MIN, max=GLOBAL_SCALE_MAX).reshape(1)
