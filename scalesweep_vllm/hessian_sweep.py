"""ScaleSweep with a block-Hessian objective, the reference (pure torch).

For a weight row's 16-element block x (input channels ``16k .. 16k+15``) the layer's
output error from that block alone is ``e^T H_b e`` with ``e = x - x_hat`` and
``H_b`` the 16x16 diagonal block of the input second moment ``X^T X / n``. The
diagonal WMSE objective (:mod:`.sweep`) keeps only ``diag(H_b)``; NVIDIA Model
Optimizer's ``local_hessian`` sweeps all FP8 codes with the full block (round to
nearest at each). This module picks, per block, the FP8 code minimising the full
form, exactly: a proven window and exact per-candidate pruning return the exhaustive
sweep's code on every block.

The objective, as computed (the C++ kernel, ``kernels.hessian_sweep_scales``,
reproduces it bit for bit; tests/test_hessian_kernel_cpu.py):

* ``H_d = H_b + lambda I`` with ``lambda = damp * mean(diag H_b)`` (``damp`` in
  ``[1e-4, 10]``, default :data:`DEFAULT_DAMP` = 1e-4, the most accurate
  measured): positive definite, so the window and pruning bounds below exist. A
  block whose channels never saw a non-zero input (``diag H_b = 0``) has no
  information: ``H_d = I``, plain MSE. :func:`hessian_factors` scales ``H_d`` by
  a power of two (max diagonal in [1, 2); the argmin is unchanged), takes its
  Cholesky factor ``L`` in float64, rounds it to fp32 and flushes entries below
  ``2^-40`` to 0. From then on ``L`` *is* the objective: ``H = L L^T`` exactly.
* Per candidate value ``v``: ``inv = G / v``, ``r = |x| * inv``, ``q =
  round_e2m1(r)`` (the codes :func:`.sweep.quantize_codes` writes); the error in
  G-units is ``d_j = sign(x_j) * (y_j - v * q_j)`` with ``y = |x| * G`` (``v * q``
  is exact), elements with ``y < 2^-12`` flushed to 0 as in :mod:`.sweep`.
* ``z_k = sum_j L_jk d_j`` (16 products, the fixed pairwise tree of
  :func:`.sweep._tree_sum16`, no fused multiply-add), ``E = tree_sum(z_k * z_k)``:
  ``E = |L^T d|^2 = d^T H d``, a sum of squares, so never negative in fp32.
* Ties go to the smaller code; an all-zero block gets code 1.

Why the window [lo, hi] holds every winner (no other code can beat or tie it):

* **Above:** for ``v`` so large that every ``q_j`` is 0 (``round_e2m1(m * (G/v))
  = 0`` for the block's largest ``y = m``: ``m * G / v <= 1/4``), ``d = sign * y``
  exactly, whatever ``v``: every such code has the bit-identical E, and the
  first of them wins the tie. ``q`` only falls as ``v`` grows (``G / v``, the
  product and the rounding are monotone in fp32), so ``hi`` = the first code where
  the largest element rounds to 0 (126 if none). About ``c0 + 37``: the "``v/2``
  is no worse" argument that caps MSE/WMSE at ``c0 + 7`` does not carry over (with
  a non-diagonal H a smaller error per element can be a larger ``e^T H e``: with
  ``H = [[1, -.9], [-.9, 1]]``, ``e = (1, 1)`` costs 0.2 and ``(1, -1)`` costs
  3.8), so the rest of the range is covered by pruning, below.
* **Below:** for every i, ``d^T H d >= d_i^2 / P_ii`` with ``P = H^-1``
  (Cauchy-Schwarz: ``d_i = (H^-1/2 e_i)^T (H^1/2 d)``; it is the minimum of the form
  over the other coordinates, the block analogue of WMSE's ``w_i d_i^2``). A code
  with ``6 v < y_i`` clips element i: ``|d_i| >= y_i - 6 v``. So a code loses
  strictly to the AbsMax code c0 when ``(y_i - 6 v)^2 / P_ii`` exceeds ``E(c0)``:
  ``lo`` = :func:`.sweep._clip_lo` with weights ``w_i = 1 / P_ii``.
* **Pruning inside [lo, hi]** (exact, only saves work): with ``d`` computed (16
  roundings, the cost of one WMSE candidate), ``LB = max(max_i w_i d_i^2,
  lambda_min |d|^2)`` bounds ``d^T H d`` below in exact arithmetic. The computed E
  is within a factor ``(1 - gamma)(1 - rho)^2`` of the exact one, with ``gamma``
  the tree sums' relative error (``5 * 2^-24``, depth 4 plus the product) and
  ``rho = gamma ||L||_F / sqrt(lambda_min)`` (the products' error against ``|z|``;
  ``||L||_F^2 = tr H <= 32`` and ``lambda_min >= damp / (16 (1 + damp))`` after normalisation, so
  ``rho < 2^-10`` for ``damp >= 1e-4``). A candidate whose ``LB * (1 - 2^-8) -
  2^-100`` exceeds the best computed E so far cannot win or tie (the margin
  covers gamma, rho and the float64 -> fp32 rounding of ``w`` and ``lambda_min``;
  the absolute ``2^-100`` covers underflow of tiny products) and its quadratic
  form (136 multiply-adds) is skipped.

Accepted domain: :func:`.sweep.validate`'s (finite x, normal G in ``[2^-117,
2^115]``, ``max|x| * G <= 2^50``); Hessian blocks finite, symmetric, with ``diag >=
0`` (positive semi-definite up to the damping). Inside it the bounded sweep equals
the exhaustive one on every block (tests/test_hessian_sweep.py checks random,
ill-conditioned, correlated, dead-channel and tie blocks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .nvfp4 import BLOCK_SIZE, FP8_MAX_CODE, fp8_code_to_value, round_e2m1_magnitude
from .sweep import (
    FLUSH_SCALED,
    LOWER_BOUND_MARGIN,
    _absmax_codes_blocks,
    _clip_lo,
    _codes_to_scales,
    _tree_sum16,
    validate,
)

__all__ = [
    "DEFAULT_DAMP",
    "HessianFactors",
    "first_zero_code",
    "hessian_candidate_errors",
    "hessian_factors",
    "hessian_sweep_codes",
    "hessian_sweep_scales",
    "hessian_window",
]

#: Relative damping of each 16x16 block: ``H_b + damp * mean(diag H_b) I``. The
#: smallest the proof allows: on the default model (W4A16, round to nearest) 1e-4
#: gives KLD 0.0933 and 0.01 gives 0.0971 (benchmarks/RESULTS.md, issue 25).
DEFAULT_DAMP = 1e-4
DAMP_MIN, DAMP_MAX = 1e-4, 10.0
#: Entries of the normalised Cholesky factor below this are 0 (no subnormal products).
FACTOR_FLUSH = 2.0**-40
#: Absolute slack of the pruning test (underflow of products below 2^-126).
PRUNE_SLACK = 2.0**-100
#: Rows per step of the reference: their per-code products ``[rows, K/16, 16, 16]``
#: stay near this many elements.
CHUNK_ELEMENTS = 2**22


@dataclass(frozen=True)
class HessianFactors:
    """The objective of each input block (``nb = K / 16`` of them), fp32:

    ``L`` ``[nb, 16, 16]`` lower-triangular (``H = L L^T``, normalised);
    ``w`` ``[nb, 16]``: ``1 / P_ii`` (``P = H^-1``), rounded down;
    ``lam`` ``[nb]``: a lower bound of the smallest eigenvalue of ``L L^T``;
    ``dead`` ``[nb]`` bool: blocks with no calibration signal (plain MSE)."""

    L: torch.Tensor
    w: torch.Tensor
    lam: torch.Tensor
    dead: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return self.L.shape[0]


def _check_hessian(h: torch.Tensor) -> torch.Tensor:
    if not isinstance(h, torch.Tensor) or not h.is_floating_point():
        raise TypeError(f"hessian must be a floating-point tensor, got {getattr(h, 'dtype', h)}")
    if h.dim() != 3 or tuple(h.shape[1:]) != (BLOCK_SIZE, BLOCK_SIZE):
        raise ValueError(f"hessian blocks must be [K/16, 16, 16], got {tuple(h.shape)}")
    h = h.detach().to(torch.float64)
    if not torch.isfinite(h).all():
        raise ValueError("hessian contains NaN or Inf")
    if (torch.diagonal(h, dim1=1, dim2=2) < 0).any():
        raise ValueError("hessian has a negative diagonal entry (not a second moment)")
    asym = (h - h.transpose(1, 2)).abs().amax()
    if float(asym) > 1e-5 * max(float(h.abs().amax()), 1e-300):
        raise ValueError(f"hessian blocks are not symmetric (max |H - H^T| = {float(asym):.3e})")
    return (h + h.transpose(1, 2)) / 2


def hessian_factors(h: torch.Tensor, damp: float = DEFAULT_DAMP) -> HessianFactors:
    """Damped, normalised Cholesky factors of the 16x16 blocks ``h`` ``[K/16, 16, 16]``
    (the diagonal blocks of ``X^T X / n``; any positive overall scale gives the same
    codes). See the module docstring for the damping and the dead-block rule."""
    if not (isinstance(damp, (int, float)) and math.isfinite(damp)):
        raise ValueError(f"damp must be a finite number, got {damp!r}")
    if not DAMP_MIN <= damp <= DAMP_MAX:
        raise ValueError(f"damp must be in [{DAMP_MIN}, {DAMP_MAX}], got {damp}")
    h = _check_hessian(h)
    diag = torch.diagonal(h, dim1=1, dim2=2)
    mean = diag.mean(dim=-1)
    dead = mean <= 0
    eye = torch.eye(BLOCK_SIZE, dtype=torch.float64, device=h.device)
    hd = torch.where(dead[:, None, None], eye, h + (damp * mean)[:, None, None] * eye)
    top = torch.diagonal(hd, dim1=1, dim2=2).amax(dim=-1)
    hd = hd * torch.exp2(-torch.floor(torch.log2(top)))[:, None, None]  # max diag in [1, 2)
    lf, info = torch.linalg.cholesky_ex(hd)
    if bool((info != 0).any()):
        bad = int((info != 0).nonzero()[0])
        raise ValueError(
            f"hessian block {bad} is not positive semi-definite (its damped form has no "
            "Cholesky factor): not a second moment X^T X / n"
        )
    lf = lf.to(torch.float32)
    lf = torch.where(lf.abs() < FACTOR_FLUSH, 0.0, lf)
    # the objective is L L^T with the fp32 L; its bounds come from that exact matrix
    l64 = lf.to(torch.float64)
    hs = l64 @ l64.transpose(1, 2)
    p_diag = torch.diagonal(torch.cholesky_inverse(l64), dim1=1, dim2=2)
    w = (1.0 / p_diag) * (1 - 2.0**-20)
    lam = torch.linalg.eigvalsh(hs)[:, 0] * (1 - 2.0**-20) - 1e-12 * hs.diagonal(
        dim1=1, dim2=2
    ).amax(dim=-1)
    rho = 5 * 2.0**-24 * torch.sqrt(hs.diagonal(dim1=1, dim2=2).sum(-1) / lam)
    if bool((rho > 2.0**-10).any()):  # cannot happen for damp >= 1e-4 (module docstring)
        raise RuntimeError(f"pruning margin not covered: rho = {float(rho.max()):.2e}")
    return HessianFactors(
        L=lf.contiguous(),
        w=w.to(torch.float32),
        lam=lam.clamp(min=0).to(torch.float32),
        dead=dead,
    )


# ---------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------


def _inputs(x: torch.Tensor, g: torch.Tensor, factors: HessianFactors):
    """(a, sign, y) as ``[N, nb, 16]`` fp32: magnitudes (flushed), signs, ``a * G``."""
    if x.dim() != 2:
        raise ValueError(f"x must be a weight matrix [N, K], got shape {tuple(x.shape)}")
    n, k = x.shape
    if k // BLOCK_SIZE != factors.num_blocks:
        raise ValueError(
            f"x has {k // BLOCK_SIZE} blocks per row but the factors hold {factors.num_blocks}"
        )
    xf = x.detach().to(torch.float32).reshape(n, -1, BLOCK_SIZE)
    a = xf.abs()
    a = torch.where(a * g < FLUSH_SCALED, 0.0, a)
    sign = torch.where(xf < 0, -1.0, 1.0)
    return a, sign, a * g


def _errors(a, sign, y, g, codes, L):
    """``d`` and ``E`` (``[N, nb, 16]``, ``[N, nb]``) of one code per block."""
    v = fp8_code_to_value(codes)[..., None]
    q = round_e2m1_magnitude(a * (g / v))
    d = sign * (y - v * q)
    # z_k = sum_j L_jk d_j: products [N, nb, k, j], summed over j by the fixed tree
    z = _tree_sum16(L.transpose(1, 2)[None] * d[:, :, None, :])
    return d, _tree_sum16(z * z)


def hessian_candidate_errors(
    x: torch.Tensor, global_scale, factors: HessianFactors, codes: torch.Tensor
) -> torch.Tensor:
    """The objective ``E = |L^T d|^2`` (G-units) of given codes ``[N, K/16]``, fp32."""
    g, _ = validate(x, global_scale)
    a, sign, y = _inputs(x, g, factors)
    if tuple(codes.shape) != tuple(a.shape[:2]):
        raise ValueError(f"codes must have shape {tuple(a.shape[:2])}, got {tuple(codes.shape)}")
    return _errors(a, sign, y, g, codes.to(torch.int64), factors.L)[1]


# ---------------------------------------------------------------------------
# Window and sweep
# ---------------------------------------------------------------------------


def first_zero_code(m: torch.Tensor, g) -> torch.Tensor:
    """Per element of ``m`` (magnitudes >= 0, e.g. a block's largest), the first FP8
    code at which ``round_e2m1(m * (G / v))`` is 0 (126 if none), int64. Rounding only
    falls as the code grows, so every larger code rounds it, and anything smaller,
    to 0 too: the upper end of the block-Hessian window here and of GPTQ's in-loop
    window (:func:`scalesweep_vllm.quantize.gptq._inloop_codes`)."""
    # bisection on the monotone predicate: the answer stays in [lo, hi]; 7 halvings
    # cover the 126 codes (the predicate is false at 126 only when no code rounds to 0)
    lo = torch.ones(m.shape, dtype=torch.int64, device=m.device)
    hi = torch.full(m.shape, FP8_MAX_CODE, dtype=torch.int64, device=m.device)
    for _ in range(FP8_MAX_CODE.bit_length()):
        mid = (lo + hi) // 2
        zero = round_e2m1_magnitude(m * (g / fp8_code_to_value(mid))) == 0
        hi = torch.where(zero, mid, hi)
        lo = torch.where(zero, lo, mid + 1)
    return lo.clamp(max=FP8_MAX_CODE)  # 127: no code rounds m to 0


def _window(a, sign, y, g, factors):
    c0 = _absmax_codes_blocks(a.reshape(-1, BLOCK_SIZE), g).reshape(a.shape[:2])
    _, e0 = _errors(a, sign, y, g, c0, factors.L)
    w = factors.w[None].expand(a.shape)
    lo = _clip_lo(a.reshape(-1, BLOCK_SIZE), g, w.reshape(-1, BLOCK_SIZE), e0.reshape(-1))
    lo = torch.minimum(lo.reshape(c0.shape), c0)
    hi = torch.maximum(first_zero_code(a.amax(dim=-1), g), c0)
    return c0, e0, lo, hi


def hessian_window(x: torch.Tensor, global_scale, factors: HessianFactors):
    """Inclusive code window ``(lo, hi)`` per block (int64 ``[N, K/16]``): every code
    outside is no better than one inside (module docstring)."""
    g, _ = validate(x, global_scale)
    a, sign, y = _inputs(x, g, factors)
    _, _, lo, hi = _window(a, sign, y, g, factors)
    return lo, hi


def _lower_bound(d, factors):
    """A lower bound of the computed E from ``d`` alone (module docstring)."""
    d2 = d * d
    lb = torch.maximum((d2 * factors.w[None]).amax(dim=-1), factors.lam[None] * d2.sum(dim=-1))
    return lb * (1 - LOWER_BOUND_MARGIN) - PRUNE_SLACK


def hessian_sweep_codes(
    x: torch.Tensor,
    global_scale,
    factors: HessianFactors,
    exhaustive: bool = False,
    stats: dict | None = None,
) -> torch.Tensor:
    """Codes (int64 ``[N, K/16]``, 1..126) minimising the block-Hessian objective.

    ``exhaustive=True`` tries all 126 codes (the specification); the default sweeps
    the window with pruning and returns the same codes. ``stats`` (a dict), if
    given, receives ``candidates`` (codes in the windows) and ``forms`` (quadratic
    forms evaluated) to measure the pruning, and ``wrongly_pruned``: pruned codes
    whose computed E would have won or tied (the reference computes every E, so the
    tests check the bound itself; 0 is the theorem)."""
    g, _ = validate(x, global_scale)
    a, sign, y = _inputs(x, g, factors)
    rows = max(1, CHUNK_ELEMENTS // (a.shape[1] * BLOCK_SIZE * BLOCK_SIZE))
    parts = [
        _sweep_rows(
            a[i : i + rows], sign[i : i + rows], y[i : i + rows], g, factors, exhaustive, stats
        )
        for i in range(0, a.shape[0], rows)
    ]
    return torch.cat(parts) if parts else torch.ones(a.shape[:2], dtype=torch.int64)


def _sweep_rows(a, sign, y, g, factors, exhaustive, stats):
    shape = a.shape[:2]
    if exhaustive:
        best = torch.ones(shape, dtype=torch.int64, device=a.device)
        best_e = torch.full(shape, float("inf"), device=a.device)
        for c in range(1, FP8_MAX_CODE + 1):
            _, e = _errors(a, sign, y, g, torch.full_like(best, c), factors.L)
            better = e < best_e
            best, best_e = torch.where(better, c, best), torch.where(better, e, best_e)
        return best
    c0, best_e, lo, hi = _window(a, sign, y, g, factors)
    best = c0.clone()
    cands, forms, wrong = 0, int(c0.numel()), 0
    for c in range(int(lo.min()), int(hi.max()) + 1):
        inside = (lo <= c) & (c <= hi) & (c0 != c)
        if not bool(inside.any()):
            continue
        code = torch.full_like(best, c)
        d, e = _errors(a, sign, y, g, code, factors.L)  # E computed everywhere: a reference
        live = inside & (_lower_bound(d, factors) <= best_e)
        wrong += int((inside & ~live & (e <= best_e)).sum())  # a pruned code that wins or ties
        better = live & ((e < best_e) | ((e == best_e) & (code < best)))
        best, best_e = torch.where(better, code, best), torch.where(better, e, best_e)
        cands += int(inside.sum())
        forms += int(live.sum())
    if stats is not None:
        stats["candidates"] = stats.get("candidates", 0) + cands + int(c0.numel())
        stats["forms"] = stats.get("forms", 0) + forms
        stats["blocks"] = stats.get("blocks", 0) + int(c0.numel())
        stats["wrongly_pruned"] = stats.get("wrongly_pruned", 0) + wrong
    return best


def hessian_sweep_scales(
    x: torch.Tensor, global_scale, factors: HessianFactors, exhaustive: bool = False
) -> torch.Tensor:
    """FP8 block scales ``[N, K/16]`` (float8_e4m3fn) of :func:`hessian_sweep_codes`."""
    return _codes_to_scales(hessian_sweep_codes(x, global_scale, factors, exhaustive))
