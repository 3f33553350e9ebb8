"""ScaleSweep, the reference: pure torch, the specification every kernel matches.

For a block of 16 values x with weights w >= 0 (w = 1: MSE), ScaleSweep picks
the FP8 E4M3 code c whose scale minimises the reconstruction error; ties go to
the smaller code. Exhaustive search tries all 126 positive codes; the default
tries only the codes inside proven bounds (:func:`sweep_bounds`) and returns
the same code on every block.

The arithmetic is fixed so that Triton kernels reproduce it bit for bit:

* ``a = |x|`` in fp32 (the error is symmetric in the sign);
* per candidate value ``v`` (fp32): ``inv = G / v`` (IEEE division),
  ``r = a * inv``, ``q = round_e2m1(r)``, ``d = r - q``, ``e = (d * d) * w``;
* ``S`` = the 16 terms summed as a fixed pairwise tree (adjacent pairs, then
  pairs of pairs, ...), no fused multiply-add;
* the compared error is ``E'(c) = S * (v * v)`` (``v * v`` is exact). It is the
  block's squared error in units of ``1/G^2`` (``E = E' / G^2``), computed in
  the scaled domain so that the bounds below hold exactly in fp32, not just in
  real arithmetic.

Quantized codes use the same ``r = x * (G / v)``; decoding is
compressed-tensors' ``(v / G) * q``.

The objective (what the sweep minimises, kernels included):

* elements with ``y = |x| * G < 2^-12`` (:data:`FLUSH_SCALED`) are left out of
  E'. For every code, ``y / v < 2^-12 / 2^-9 = 1/8`` rounds to 0, so such an
  element costs ``w * y^2`` at every candidate: a constant, which cannot change
  the argmin or its ties in exact arithmetic. Leaving it out keeps the fp32
  arithmetic away from underflow (``d`` is then 0 or at least ``2^-25``);
* WMSE weights are normalised per block by a power of two, so the block's
  largest weight lies in [1, 2) (exact scaling: the argmin of ``k * E`` is that
  of ``E``, so any overall scale of the weights gives the same codes), and
  normalised weights below ``2^-40`` (:data:`WEIGHT_FLUSH`) count as 0. A
  block whose weights are all 0 gets code 1 (every error is 0; tie rule).

Accepted domain (:func:`validate` raises ``ValueError`` outside it): finite x;
a global scale G that is one normal fp32 number in ``[2^-117, 2^115]``
(:data:`~scalesweep_vllm.nvfp4.GLOBAL_SCALE_MIN` / ``_MAX``); ``max|x| * G <=
2^50`` (:data:`SCALED_MAX`); weights finite and >= 0 (any magnitude). Inside it
every fp32 quantity of the error arithmetic is exactly 0 or a normal number
below the overflow threshold:

* ``G / v`` lies in ``(2^-126, 2^124]`` (``v`` in ``[2^-9, 448]``);
* a kept element has ``r = |x| * (G / v) >= 2^-12 / 448 > 2^-21`` and
  ``r < 2^50 * 2^9 (1 + 2^-22) < 2^60``;
* ``d = r - q`` is 0 or ``>= 2^-25`` (``q = 0`` gives ``d = r``; else ``r >=
  1/4`` is a multiple of ``2^-25`` and q of 1/2), so ``d * d`` is 0 or in
  ``[2^-50, 2^120)``, ``e = (d * d) * w`` is 0 or in ``[2^-90, 2^121)``, the
  16-term sum ``S`` is below ``2^125`` (the squared error of 16 elements in
  the scaled domain does not overflow: this is where ``2^50`` comes from);
* ``E' = S * v^2`` is 0 or in ``[2^-108, 2^106)`` (``|d| v <= max(y, 448)``).

Within the domain the bounded sweep returns the exhaustive sweep's code on
every block (proofs in :func:`sweep_bounds`), and that code minimises the
objective above as computed in fp32: the true (real-number) optimum, except
where fp32 rounding of ``y / v`` or of the sums decides a near-tie (relative
differences of order 1e-6; tests/test_sweep.py checks 1e-5 against float64).
Outside the domain the torch functions raise; the Triton kernels, which never
synchronise with the host, give unspecified codes (as for NaN input).
"""

from __future__ import annotations

import math

import torch

from .nvfp4 import (
    BLOCK_SIZE,
    FP4_MAX,
    FP8_MAX,
    FP8_MAX_CODE,
    GLOBAL_SCALE_MAX,
    GLOBAL_SCALE_MIN,
    decode_e2m1,
    encode_e2m1,
    fp8_ceil_code,
    fp8_code_to_value,
    fp8_rne_code,
    fp8_value_to_code,
    round_e2m1_magnitude,
)

__all__ = [
    "BOUNDS_VERSION",
    "FLUSH_SCALED",
    "LOWER_BOUND_MARGIN",
    "MSE_STAGE1_OFFSET",
    "SCALED_MAX",
    "UPPER_OFFSET",
    "WEIGHT_FLUSH",
    "absmax_codes",
    "absmax_scales",
    "block_errors",
    "candidate_errors",
    "check_global_scale",
    "four_over_six_scales",
    "quantize_codes",
    "quantize_dequantize",
    "sweep_bounds",
    "sweep_codes",
    "sweep_scales",
    "validate",
]

#: Bumped whenever the bounds or the error arithmetic change (recorded in checkpoints).
#: 2: no c0-3 floor (false at c0 = 126; now a two-stage MSE sweep), the objective's
#: flushes and per-block weight normalisation, the accepted domain of G.
BOUNDS_VERSION = 2
#: Window above the AbsMax code c0 (any weights), see :func:`sweep_bounds`.
UPPER_OFFSET = 7
#: MSE: the first stage of the sweep starts no lower than c0 - 3. Not a bound (it is
#: false at c0 = 126); the second stage covers what the proven bound leaves below it.
MSE_STAGE1_OFFSET = 3
#: Relative safety margin of the data-dependent bounds (covers fp32 rounding).
LOWER_BOUND_MARGIN = 2.0**-8
#: Largest accepted ``max|x| * G``: 16 squared errors in the scaled domain stay finite.
SCALED_MAX = 2.0**50
#: Elements with ``|x| * G`` below this cost the same at every code: left out of E'.
FLUSH_SCALED = 2.0**-12
#: Per-block normalised WMSE weights below this count as 0.
WEIGHT_FLUSH = 2.0**-40


# ---------------------------------------------------------------------------
# Input checks, shared by the reference and the kernel launchers.
# ---------------------------------------------------------------------------


def check_global_scale(g: float) -> None:
    """Raise ``ValueError`` unless ``g`` is a normal fp32 number in ``[2^-117, 2^115]``
    (the sweep's domain, module docstring). Also used by the kernel launchers on
    host-side global scales."""
    if not math.isfinite(g) or g <= 0:
        raise ValueError(f"global_scale must be finite and > 0, got {g}")
    if g > GLOBAL_SCALE_MAX:
        raise ValueError(
            f"global_scale {g:.3e} exceeds {GLOBAL_SCALE_MAX:.3e}: the tensor is "
            "effectively zero; use nvfp4.global_scale(), which caps it"
        )
    if g < GLOBAL_SCALE_MIN:
        raise ValueError(
            f"global_scale {g:.3e} is below {GLOBAL_SCALE_MIN:.3e} (2^-117; fp32 "
            "subnormals start at 1.2e-38): G / 448 would be subnormal and the sweep inexact; "
            "use nvfp4.global_scale(), which clamps it"
        )


def validate(
    x: torch.Tensor,
    global_scale: torch.Tensor | float,
    weight: torch.Tensor | None = None,
    name: str = "x",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check shapes and values; return ``(G as a 0-dim fp32 tensor, weight or None)``.

    Raises ``ValueError``/``TypeError`` naming the problem: non-float input, K
    not a multiple of 16, NaN or Inf, a global scale that is not one normal fp32
    number in ``[2^-117, 2^115]``, ``max|x| * G`` above ``2^50`` (the sweep's
    squared errors would overflow fp32), weights that are negative, non-finite or
    not broadcastable. See the module docstring for why this is the domain.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', x)}")
    if x.dim() == 0 or x.shape[-1] % BLOCK_SIZE:
        raise ValueError(
            f"{name}: last dimension must be a multiple of {BLOCK_SIZE} (NVFP4 blocks), "
            f"got shape {tuple(x.shape)}"
        )
    if x.numel() and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf; NVFP4 cannot represent them")
    g = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device)
    if g.numel() != 1:
        raise ValueError(f"global_scale must hold one number, got shape {tuple(g.shape)}")
    g = g.reshape(())
    check_global_scale(float(g))
    if x.numel():
        y_max = float(x.detach().abs().max().float() * g)
        if not y_max <= SCALED_MAX:
            raise ValueError(
                f"max|{name}| * global_scale = {y_max:.3e} exceeds 2^50 = {SCALED_MAX:.3e}: "
                "the sweep's squared errors would overflow fp32. The global scale is far too "
                f"large for {name} (nvfp4.global_scale(amax) gives 1536 or 2688 here)"
            )
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            weight = torch.as_tensor(weight, dtype=torch.float32, device=x.device)
        try:
            torch.broadcast_shapes(weight.shape, x.shape)
        except RuntimeError as err:
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} does not broadcast to "
                f"{name} of shape {tuple(x.shape)}"
            ) from err
        if weight.numel() and not torch.isfinite(weight.detach().float()).all():
            raise ValueError("weight contains NaN or Inf (or exceeds the fp32 range)")
        if weight.numel() and bool((weight < 0).any()):
            raise ValueError("weight must be >= 0 (it weighs squared errors)")
    return g, weight


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` as fp32 blocks ``[num_blocks, 16]``."""
    return x.detach().to(torch.float32).abs().reshape(-1, BLOCK_SIZE)


def _weight_blocks(weight: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    if weight is None:
        return None
    w = weight.detach().to(device=x.device, dtype=torch.float32)
    return w.expand(x.shape).reshape(-1, BLOCK_SIZE)


def _flush_scaled(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``a`` with the elements whose ``a * G < 2^-12`` set to 0: their error is the
    same at every code (module docstring), so they are left out of the objective."""
    return torch.where(a * g < FLUSH_SCALED, 0.0, a)


def _normalize_weights(w: torch.Tensor) -> torch.Tensor:
    """Per-block weights ``[B, 16]`` scaled by a power of two so that the block's
    largest lies in [1, 2), then those below 2^-40 set to 0 (a block of zeros stays 0).

    Exact: ``w * 2^k`` is rounded only where it falls below 2^-126, and those are
    flushed. Two steps (by 2^+-64 first when the maximum is below 2^-64 or at least
    2^64) keep every factor a normal fp32 number, also for subnormal weights. The
    kernels do the same operations on the fp32 bits."""
    wmax = w.amax(dim=-1, keepdim=True)
    pre = torch.where(
        wmax < 2.0**-64,
        torch.full_like(wmax, 2.0**64),
        torch.where(wmax >= 2.0**64, torch.full_like(wmax, 2.0**-64), torch.ones_like(wmax)),
    )
    m1 = wmax * pre  # 0, or in [2^-85, 2^64)
    e = ((m1.view(torch.int32) >> 23) & 0xFF) - 127  # floor(log2 m1); -127 for 0
    inv = ((127 - e) << 23).view(torch.float32)  # 2^-e, a normal number
    wn = (w * pre) * inv
    return torch.where(wn < WEIGHT_FLUSH, 0.0, wn)


def _objective(x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor | None):
    """(magnitudes, weights) as the sweep's objective uses them: ``[B, 16]`` fp32,
    small elements flushed, weights normalised per block (None for MSE)."""
    a = _flush_scaled(_blocks(x), g)
    w = _weight_blocks(weight, x)
    return a, (None if w is None else _normalize_weights(w))


def _scale_shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape[:-1]) + (x.shape[-1] // BLOCK_SIZE,)


def _tree_sum16(e: torch.Tensor) -> torch.Tensor:
    """Sum 16 terms per row as a fixed tree: adjacent pairs, then pairs of those."""
    while e.shape[-1] > 1:
        e = e[..., 0::2] + e[..., 1::2]
    return e[..., 0]


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def candidate_errors(
    a: torch.Tensor, g: torch.Tensor, codes: torch.Tensor, w: torch.Tensor | None
) -> torch.Tensor:
    """Scaled errors ``E'(c) = S * v^2`` of one candidate code per block.

    ``a``: fp32 magnitudes ``[B, 16]``; ``codes``: integer codes ``[B]`` in 1..126;
    ``w``: fp32 weights ``[B, 16]`` or None. Returns fp32 ``[B]``.
    """
    v = fp8_code_to_value(codes)
    inv = g / v
    r = a * inv[:, None]
    d = r - round_e2m1_magnitude(r)
    e = d * d
    if w is not None:
        e = e * w
    return _tree_sum16(e) * (v * v)


def block_errors(
    x: torch.Tensor,
    global_scale: torch.Tensor | float,
    scales: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-block (weighted) squared error of quantizing x with these FP8 scales,
    in x's units: ``E'(c) / G^2`` with the weights as given and every element
    counted (a report, not the sweep's normalised objective; both have the same
    minimiser in exact arithmetic). Shape ``x.shape[:-1] + (K/16,)``, fp32."""
    g, weight = validate(x, global_scale, weight)
    codes = fp8_value_to_code(scales.reshape(-1)).clamp(min=1)
    e = candidate_errors(_blocks(x), g, codes, _weight_blocks(weight, x))
    return (e / (g * g)).reshape(_scale_shape(x))


# ---------------------------------------------------------------------------
# AbsMax and the peer baseline
# ---------------------------------------------------------------------------


def _absmax_codes_blocks(a: torch.Tensor, g: torch.Tensor, divisor: float = FP4_MAX):
    amax = a.amax(dim=-1)
    t = torch.clamp((amax / divisor) * g, max=FP8_MAX)
    return fp8_rne_code(t).clamp(min=1).to(torch.int64)


def absmax_codes(x: torch.Tensor, global_scale: torch.Tensor | float) -> torch.Tensor:
    """AbsMax code per block: ``fp8_rne(min((amax / 6) * G, 448))`` as int64,
    raised to 1 when it would be 0 (an all-zero or vanishing block: every scale
    reconstructs it as 0, and code 1 is what the sweep's tie rule picks).

    vLLM's recipe (amax/6 in fp32), correctly rounded; vLLM's ``scaled_fp4_quant``
    multiplies by ``rcp.approx`` reciprocals, so at FP8 ties its scale can differ by
    one code (docs/SERVING.md). compressed-tensors computes amax/6 in the input dtype
    and maps a zero scale to 0.125 instead.
    """
    g, _ = validate(x, global_scale)
    return _absmax_codes_blocks(_blocks(x), g).reshape(_scale_shape(x))


def absmax_scales(x: torch.Tensor, global_scale: torch.Tensor | float) -> torch.Tensor:
    """AbsMax FP8 block scales, shape ``x.shape[:-1] + (K // 16,)``, float8_e4m3fn."""
    return _codes_to_scales(absmax_codes(x, global_scale))


def four_over_six_scales(
    x: torch.Tensor, global_scale: torch.Tensor | float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Peer baseline "four over six": per block the better (by the sweep's
    objective) of the scales amax/6 and amax/4; ties to the smaller code.
    Use it with the paper's global scale (256*6/amax) so amax/4 never saturates."""
    g, weight = validate(x, global_scale, weight)
    a, w = _objective(x, g, weight)
    c6 = _absmax_codes_blocks(a, g, FP4_MAX)
    c4 = _absmax_codes_blocks(a, g, 4.0)
    e6, e4 = candidate_errors(a, g, c6, w), candidate_errors(a, g, c4, w)
    lo, hi = torch.minimum(c6, c4), torch.maximum(c6, c4)
    e_lo = torch.where(c6 <= c4, e6, e4)
    e_hi = torch.where(c6 <= c4, e4, e6)
    best = torch.where(e_hi < e_lo, hi, lo)
    return _codes_to_scales(best.reshape(_scale_shape(x)))


# ---------------------------------------------------------------------------
# Bounds
# ---------------------------------------------------------------------------


def _clip_lo(a, g, w, e_ref):
    """Smallest code that can beat a candidate of error ``e_ref`` (per block): codes
    whose clipping error alone exceeds it lose (:func:`sweep_bounds`)."""
    y = a * g
    e_ref = e_ref * (1.0 + LOWER_BOUND_MARGIN)
    if w is None:
        clip = y.amax(dim=-1) - torch.sqrt(e_ref)
    else:
        room = torch.sqrt(e_ref[:, None] / w)  # w = 0 -> inf (or NaN if e_ref = 0)
        clip = torch.where(w > 0, y - room, float("-inf")).amax(dim=-1)  # w = 0: no bound
    t = (clip / FP4_MAX) * (1.0 - LOWER_BOUND_MARGIN)
    return torch.where(t > 0, fp8_ceil_code(t.clamp(min=0)).to(torch.int64), 1)


def _stage1_blocks(a, g, w):
    """First window ``[lo1, hi]`` and c0 per block, from objective inputs (_objective)."""
    c0 = _absmax_codes_blocks(a, g)
    hi = torch.where(c0 >= 8, (c0 + UPPER_OFFSET).clamp(max=FP8_MAX_CODE), torch.full_like(c0, 15))
    # data-dependent upper bound: codes with v >= (max y / 3.5)(1 + margin) lose to v/2
    t_hi = ((a.amax(dim=-1) * g) / 3.5) * (1.0 + LOWER_BOUND_MARGIN)
    hi_data = (fp8_ceil_code(t_hi).to(torch.int64) - 1).clamp(min=15)
    hi = torch.where(t_hi <= FP8_MAX, torch.minimum(hi, hi_data), hi)
    lo = torch.minimum(_clip_lo(a, g, w, candidate_errors(a, g, c0, w)), c0)
    if w is None:
        lo = torch.maximum(lo, (c0 - MSE_STAGE1_OFFSET).clamp(min=1))
    return lo, hi, c0


def _argmin_over_codes(a, g, w, lo, hi):
    """Smallest code in [lo, hi] (per block) with the smallest E', and that E'
    (code lo and error inf where the range is empty)."""
    best_code = lo.clone()
    best_err = torch.full(lo.shape, float("inf"), dtype=torch.float32, device=a.device)
    span = int((hi - lo).max().item()) + 1 if lo.numel() else 0
    for k in range(span):
        code = lo + k
        valid = code <= hi
        err = candidate_errors(a, g, torch.where(valid, code, lo), w)
        better = valid & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_code = torch.where(better, code, best_code)
    return best_code, best_err


def _sweep_blocks(a, g, w):
    """The bounded sweep on objective inputs: (code, lo, hi) per block.

    Stage 1 sweeps ``[lo1, hi]``. MSE only: stage 2 sweeps ``[lo2, lo1 - 1]``, where
    lo2 is the proven clipping bound against the best error of stage 1 (empty on
    almost every block; it holds the optimum of blocks like those at c0 = 126 that
    defeat the old c0 - 3 floor). A stage-2 code wins ties: it is the smaller code."""
    lo1, hi, _ = _stage1_blocks(a, g, w)
    best, err = _argmin_over_codes(a, g, w, lo1, hi)
    if w is not None:
        return best, lo1, hi
    lo2 = torch.minimum(_clip_lo(a, g, None, err), lo1)
    best2, err2 = _argmin_over_codes(a, g, None, lo2, lo1 - 1)
    take = (lo2 < lo1) & (err2 <= err)
    return torch.where(take, best2, best), lo2, hi


def sweep_bounds(
    x: torch.Tensor, global_scale: torch.Tensor | float, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive candidate code range ``(lo, hi)`` per block (int64, shape of the scales).

    Every code outside ``[lo, hi]`` is provably no better than one inside, so
    sweeping ``[lo, hi]`` with ties to the smaller code returns the exhaustive
    answer. Let c0 be the AbsMax code, v its value, y = |x| * G (elements below
    2^-12 flushed, weights normalised: the module docstring's objective and
    domain, inside which every fp32 quantity below is 0 or normal and finite), m =
    max y.

    Upper bound (any weights): ``hi <= c0 + 7`` (``15`` when c0 < 8, capped at 126).
      Take a candidate with value u >= 2v. Since v is m/6 rounded to nearest in
      E4M3 (relative error <= 1/17), u >= 2 * (16/17) * m/6 > m/3.5, so every
      scaled value r = y/u <= 3.5 rounds to a grid point in {0,.5,1,1.5,2,3}
      (or to 4 at the tie 3.5, at equal distance from 3). The candidate u/2
      scales every r to exactly 2r, and its grid {0,.5,1,1.5,2,3,4,6} contains
      2x those points, so each element's distance can only shrink: its error is
      <= u's for any weights. In fp32: ``G/(u/2) = 2 (G/u)`` and ``r' = 2r``
      exactly (normal numbers); ``|r' - q'| <= 2 |r - q|`` and rounding is
      monotone, so ``d' <= 2d``; ``fl(d'^2) <= fl(4 d^2) = 4 fl(d^2)`` and
      ``fl(fl(d'^2) w) <= 4 fl(fl(d^2) w)`` because the products are normal (not
      subnormal: there ``fl(4z) = 4 fl(z)`` fails, the reason for the flushes);
      the sums are monotone, so ``S' <= 4S`` and ``E'(u/2) = fl(S' u^2/4) <=
      fl(S u^2) = E'(u)``: u/2, the smaller code, wins or ties. u/2 is again an
      E4M3 code (u - 8 codes) when u >= 2^-5 (code 16); so all codes above
      max(c0 + 7, 15) lose to a smaller code, and c0 + 8 has value exactly 2v
      when c0 >= 8. The same argument needs only u >= m/3.5, so ``hi`` is
      further lowered to the last code below ``(m / 3.5)(1 + 2^-8)`` (never
      below 15): about one candidate fewer per block than c0 + 7.

    Lower bound (data-dependent, any weights): a candidate u clips every element
      with y_i > 6u, so its error is at least w_i (y_i - 6u)^2. If that exceeds
      the error E_ref of some candidate, u loses to it strictly. So only
      ``u >= max_i (y_i - sqrt(E_ref / w_i)) / 6`` can win; the bound is the
      smallest code at or above that, computed with a relative margin of 2^-8
      (E_ref enlarged, the threshold shrunk) that dominates the fp32 rounding of
      normal numbers (a few 2^-24). Elements with w_i = 0 give no constraint.
      WMSE: ``lo`` is this bound with E_ref = E'(c0). The paper has no WMSE
      lower bound (its window c0-8 is empirical); this one is exact and narrow.

    MSE, two stages: stage 1 sweeps ``[max(bound(E'(c0)), c0 - 3), hi]``, stage
      2 sweeps ``[bound(E_1), lo1 - 1]`` with E_1 the best error of stage 1
      (``bound(E_1) >= bound(E'(c0))`` since E_1 <= E'(c0)); ``lo`` is
      ``min(lo1, bound(E_1))``. c0 - 3 (the authors' "certified" floor) is not
      used as a bound: it is false at c0 = 126, where no code above 448
      exists and rounding may put 448 up to 3.7% above m/6. Example
      (tests/test_sweep.py::C0_126_BLOCK): m/6 = 432.13, fourteen elements at
      0.74-0.81 m and one at 0.47 m; the exact optimum is code 122 (320), whose
      error is 0.99x the best in [123, 126]. An adversarial float64 search
      (hill climbing, 1024 blocks per code) at c0 = 100..125 found no block
      whose optimum lies below c0 - 3 (smallest relative margin +0.55), but
      that is no proof, and none is needed: stage 2 covers those codes. It is
      empty on almost every block (Gaussian: about 1 in 10^4), so the sweep
      costs what it did.
    """
    g, weight = validate(x, global_scale, weight)
    a, w = _objective(x, g, weight)
    _, lo, hi = _sweep_blocks(a, g, w)
    shape = _scale_shape(x)
    return lo.reshape(shape), hi.reshape(shape)


# ---------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------


def sweep_codes(
    x: torch.Tensor,
    global_scale: torch.Tensor | float,
    weight: torch.Tensor | None = None,
    exhaustive: bool = False,
) -> torch.Tensor:
    """ScaleSweep codes (int64, 1..126) per block; see :func:`sweep_scales`."""
    g, weight = validate(x, global_scale, weight)
    a, w = _objective(x, g, weight)
    if exhaustive:
        lo = torch.ones(a.shape[0], dtype=torch.int64, device=a.device)
        best, _ = _argmin_over_codes(a, g, w, lo, torch.full_like(lo, FP8_MAX_CODE))
    else:
        best, _, _ = _sweep_blocks(a, g, w)
    return best.reshape(_scale_shape(x))


def sweep_scales(
    x: torch.Tensor,
    global_scale: torch.Tensor | float,
    weight: torch.Tensor | None = None,
    exhaustive: bool = False,
) -> torch.Tensor:
    """ScaleSweep FP8 block scales, shape ``x.shape[:-1] + (K // 16,)``, float8_e4m3fn.

    Minimises the block's squared error (``weight=None``) or weighted squared
    error (``weight`` >= 0, broadcastable to x) over FP8 scale codes; ties go to
    the smaller code. ``exhaustive=True`` tries all 126 positive codes (the
    specification); the default tries only :func:`sweep_bounds`' window and
    returns the same scales. The objective and the domain where this holds are
    in the module docstring.
    """
    return _codes_to_scales(sweep_codes(x, global_scale, weight, exhaustive))


# ---------------------------------------------------------------------------
# Quantize / dequantize with given scales
# ---------------------------------------------------------------------------


def _codes_to_scales(codes: torch.Tensor) -> torch.Tensor:
    return codes.to(torch.uint8).view(torch.float8_e4m3fn)


def _scales_to_values(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    if scales.dtype != torch.float8_e4m3fn:
        raise TypeError(f"scales must be float8_e4m3fn, got {scales.dtype}")
    if tuple(scales.shape) != _scale_shape(x):
        raise ValueError(
            f"scales of shape {tuple(scales.shape)} do not match x of shape "
            f"{tuple(x.shape)} (expected {_scale_shape(x)})"
        )
    return scales.to(torch.float32)


def quantize_codes(
    x: torch.Tensor, global_scale: torch.Tensor | float, scales: torch.Tensor
) -> torch.Tensor:
    """4-bit E2M1 codes (uint8 0..15, unpacked, shape of x) of x with these scales:
    ``encode_e2m1(x * (G / v))``. Pack them with :func:`nvfp4.pack_fp4`."""
    g, _ = validate(x, global_scale)
    return _encode(x, g, _scales_to_values(x, scales))


def _encode(x: torch.Tensor, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Codes of already validated x with fp32 scale values v (see quantize_codes)."""
    inv = (g / v.clamp(min=2.0**-9)).repeat_interleave(BLOCK_SIZE, dim=-1)
    return encode_e2m1(x.detach().to(torch.float32) * inv)


def quantize_dequantize(
    x: torch.Tensor, global_scale: torch.Tensor | float, scales: torch.Tensor
) -> torch.Tensor:
    """Float32 reconstruction ``(v / G) * Q(x * G / v)``, decoded in
    compressed-tensors' order, so a checkpoint holding these codes and scales
    decodes to exactly this."""
    g, _ = validate(x, global_scale)
    v = _scales_to_values(x, scales)
    s = (v / g).repeat_interleave(BLOCK_SIZE, dim=-1)
    return s * decode_e2m1(_encode(x, g, v))
