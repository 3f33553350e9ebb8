"""GPTQ on fixed ScaleSweep block scales (``scalesweep-quantize --gptq``).

The math
--------
For a Linear ``y = x W^T`` (``W`` is ``[N, K]``) and calibration inputs ``X``
(``[n, K]``, all tokens), the layer-output error of a quantized ``W_q`` is

    ||X W^T - X W_q^T||_F^2 = sum_rows (w - w_q) H (w - w_q)^T,   H = X^T X,

a quadratic form in each row with the *same* ``H`` for every row (and for fused
partners, which share their input: q/k/v and gate/up quantize as one ``[N, K]``
matrix with one ``H``). We keep ``H / n = E[x x^T]`` (scaling does not change the
minimiser; its diagonal is today's WMSE weight ``E[x^2]``).

GPTQ (Frantar et al., 2022; the OBQ update) quantizes the columns in order
``0..K-1``. When column ``j`` is rounded to ``q_j`` the rows' remaining columns
``j+1..K-1`` are moved to absorb the error, the least-squares optimum given the
columns fixed so far:

    e_j = (w_j - q_j) / U_jj,      w_{j+1:} <- w_{j+1:} - e_j U_{j, j+1:},

where ``U`` is the upper Cholesky factor of ``H^{-1}`` (``H^{-1} = U^T U``): row
``j`` of ``U`` divided by ``U_jj`` is the first row of the inverse Hessian of the
columns not yet quantized, so one factorisation serves all ``K`` steps. Lazy
batching (GPTQ's ``blocksize``): the update is applied at once inside a batch of
``B`` columns and to the columns after it as one matrix product
``W_{:, i2:} -= E U_{i1:i2, i2:}``; the result is the same as column by column.

Why the scales stay fixed: an NVFP4 block scale covers 16 consecutive columns of a
row, so it must be known before the first of them is rounded, and changing it
after the error feedback started would invalidate the feedback. ScaleSweep picks
each block's FP8 scale first, on the original weights (the chosen objective; WMSE
weighs channel ``i`` by ``H_ii / n = E[x_i^2]``), with the fused group's shared
global scale, exactly as the round-to-nearest (RTN) path does. GPTQ then only
changes which point of each block's fixed grid ``{(v/G) q : q in E2M1}`` a weight
takes: every written weight is a code with its block's scale, and the block scales
in the checkpoint are the pre-GPTQ ScaleSweep scales. Rounding is the reference's
arithmetic (``round_e2m1(w * (G / v)) * (v / G)``), and the written codes come from
:func:`scalesweep_vllm.sweep.quantize_codes` on the pre-rounding values, so they are
the reference's codes (a count of disagreements with the loop is kept: 0 expected).

Damping and dead channels (as GPTQ): a channel that never saw a non-zero input
(``H_ii = 0``) cannot affect the output on the calibration data: its weight column
is set to 0 and ``H_ii`` to 1. Then ``H += lambda I`` with ``lambda = damp *
mean(diag H)`` (``damp`` default 0.01): it makes ``H`` positive definite when
inputs are linearly dependent (duplicate channels, fewer tokens than channels) and
limits how far the error feedback can push weights. If the Cholesky factorisation
still fails (fp32 round-off), the damping is multiplied by 10, up to 4 times.

Activation order (``actorder``, on by default): GPTQ's reordering of columns by
decreasing ``H_ii``, restricted to whole 16-column blocks (blocks ordered by the
sum of their ``H_ii``) so that every block keeps its scale. Columns inside a block
keep their order. Measured on the default model (benchmarks/RESULTS.md): it
doubles what GPTQ removes of round-to-nearest's KL divergence (W4A16: 24% instead
of 11%), at no measurable cost.

Experimental variants (issue 25; measured in benchmarks/RESULTS.md, not defaults):

* ``scales="inloop"``: each block's FP8 scale is chosen when the loop reaches the
  block, from its error-updated weights, by GPTQ's own loss over the block
  (:func:`_inloop_codes`, proven window), instead of up front on the original
  weights. The written scales are then these.
* ``paired=True`` (GPTAQ-style): calibration runs the original and the quantized
  model side by side, and GPTQ fits ``X_q W_q^T`` to the original ``X W^T``: GPTQ of
  ``W* = W C H^-1`` with ``C = E[x_fp x_q^T]`` (``weights._paired_target``).
* ``actorder="column"``: GPTQ's own column order by ``H_ii``, every column keeping
  its block's fixed scale (so the permutation need not move whole blocks).

State: ``H`` is accumulated in float32 (``addmm`` per calibration batch of a few
thousand tokens; its entries are sums of positive-and-negative products, and the
float32 relative error, ~1e-6 per batch, is far below the 1% damping), and the
algorithm runs in float32 on the device of the layer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .. import nvfp4, sweep
from ..hessian_sweep import first_zero_code
from ..nvfp4 import BLOCK_SIZE

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_DAMP",
    "GPTQConfig",
    "GPTQResult",
    "gptq_quantize",
    "memory_estimate",
    "output_error",
]

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK_SIZE = 128
#: Dtype of the accumulated H (see the module docstring).
HESSIAN_DTYPE = torch.float32
_DAMP_RETRIES = 4


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ settings; recorded in ``scalesweep.json``.

    ``damp``: relative damping (fraction of mean diag H). ``block_size``: columns per
    lazy batch (a multiple of 16). ``sequential``: each decoder layer's calibration
    inputs come from the already quantized previous layers (else from the original
    model). ``actorder``: block-level activation order (default on).
    """

    damp: float = DEFAULT_DAMP
    block_size: int = DEFAULT_BLOCK_SIZE
    sequential: bool = True
    actorder: bool = True
    #: ``fixed``: the block scales chosen up front (RTN's); ``inloop``: each block's
    #: scale chosen when GPTQ reaches it (:func:`_inloop_codes`).
    scales: str = "fixed"
    #: EXPERIMENTAL (GPTAQ-style): fit the quantized layer on quantized inputs to the
    #: original layer on original inputs: GPTQ of ``W* = W C H^-1`` (``C`` = E[x_fp x_q^T])
    paired: bool = False

    def __post_init__(self):
        if not (isinstance(self.damp, (int, float)) and math.isfinite(self.damp)):
            raise ValueError(f"gptq damp must be a finite number, got {self.damp!r}")
        if not 0 < self.damp <= 10:
            raise ValueError(f"gptq damp must be in (0, 10], got {self.damp}")
        if self.scales not in ("fixed", "inloop"):
            raise ValueError(f"gptq scales must be 'fixed' or 'inloop', got {self.scales!r}")
        if self.actorder not in (True, False, "column"):
            raise ValueError(
                f"gptq actorder must be True, False or 'column', got {self.actorder!r}"
            )
        if self.actorder == "column" and self.scales == "inloop":
            raise ValueError(
                "gptq actorder 'column' needs fixed scales (a column moved out "
                "of its block cannot wait for the block's in-loop scale)"
            )
        if self.block_size < BLOCK_SIZE or self.block_size % BLOCK_SIZE:
            raise ValueError(
                f"gptq block_size must be a positive multiple of {BLOCK_SIZE}, "
                f"got {self.block_size}"
            )

    def to_json(self) -> dict:
        d = asdict(self)
        d["inputs"] = "quantized" if self.sequential else "original"
        d["hessian_dtype"] = str(HESSIAN_DTYPE).replace("torch.", "")
        return d

    @classmethod
    def parse(cls, gptq) -> GPTQConfig | None:
        """``False``/None -> None; ``True`` -> defaults; a dict or a GPTQConfig as is."""
        if gptq is None or gptq is False:
            return None
        if gptq is True:
            return cls()
        if isinstance(gptq, cls):
            return gptq
        if isinstance(gptq, dict):
            unknown = set(gptq) - {
                "damp",
                "block_size",
                "sequential",
                "actorder",
                "scales",
                "paired",
            }
            if unknown:
                raise ValueError(f"unknown gptq settings {sorted(unknown)}")
            return cls(**gptq)
        raise TypeError(f"gptq must be a bool, a dict or a GPTQConfig, got {type(gptq).__name__}")


@dataclass
class GPTQResult:
    """Codes (uint8 [N, K], unpacked) on the fixed scales, and what happened."""

    codes: torch.Tensor
    damp_used: float
    dead_channels: int
    grid_mismatches: int  # loop rounding vs the reference's codes: 0 expected
    scales: torch.Tensor | None = None  # float8 [N, K/16] chosen in the loop (scales="inloop")


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """``sum_rows delta H delta^T`` (= ||X delta^T||^2 / n for ``H = X^T X / n``)."""
    d = delta.to(torch.float32)
    return float(((d @ hessian.to(torch.float32)) * d).sum())


def _factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + lambda I)^-1, raising the damping if needed.
    Damps ``h`` in place; at most two more K x K matrices live at a time."""
    mean_diag = float(h.diagonal().mean())
    added = 0.0
    for attempt in range(_DAMP_RETRIES + 1):
        d = damp * 10**attempt
        h.diagonal().add_(d * mean_diag - added)
        added = d * mean_diag
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            del chol
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if int(info) == 0 and bool(torch.isfinite(u).all()):
                return u, d
    raise ValueError(
        f"GPTQ: the Hessian is not positive definite even with damping {d:g} x mean diag"
    )


def gptq_quantize(
    weight: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | float,
    hessian: torch.Tensor,
    damp: float = DEFAULT_DAMP,
    block_size: int = DEFAULT_BLOCK_SIZE,
    actorder: bool = True,
    inloop: bool = False,
) -> GPTQResult:
    """GPTQ of ``weight`` [N, K] onto the NVFP4 grid of fixed ``scales`` [N, K/16]
    (float8_e4m3fn) and ``global_scale``, with ``hessian`` [K, K] ~ E[x x^T]
    (module docstring). Returns the E2M1 codes; pack with :func:`nvfp4.pack_fp4`."""
    n, k = weight.shape
    if k % BLOCK_SIZE or tuple(scales.shape) != (n, k // BLOCK_SIZE):
        raise ValueError(f"scales {tuple(scales.shape)} do not match weight {(n, k)}")
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian {tuple(hessian.shape)} does not match in_features {k}")
    dev = weight.device
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(dev, torch.float32).clone()
    if not bool(torch.isfinite(h).all()):
        raise ValueError("GPTQ: the Hessian has NaN/Inf entries (non-finite activations)")
    if float(h.diagonal().max()) <= 0:
        raise ValueError("GPTQ: the Hessian is zero (the layer saw no non-zero input)")
    dead = h.diagonal() <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    g = torch.as_tensor(global_scale, dtype=torch.float32, device=dev).reshape(())
    v = scales.to(dev).to(torch.float32)
    # the reference's arithmetic (sweep.quantize_codes): r = x * (G / v), decode (v / G) q
    inv = g / v.clamp(min=2.0**-9)
    step = v / g
    perm = bperm = None
    if actorder == "column":  # EXPERIMENTAL: columns by H_ii, each keeps its block's scale
        if inloop:
            raise ValueError("column-level actorder needs fixed scales")
        perm = torch.argsort(h.diagonal(), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
        inv = inv.repeat_interleave(BLOCK_SIZE, dim=1)[:, perm]
        step = step.repeat_interleave(BLOCK_SIZE, dim=1)[:, perm]
    elif actorder:
        bperm = torch.argsort(h.diagonal().view(-1, BLOCK_SIZE).sum(1), descending=True)
        perm = (bperm[:, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE, device=dev)).flatten()
        w, h = w[:, perm], h[perm][:, perm]
        inv, step = inv[:, bperm], step[:, bperm]
    u, damp_used = _factor(h, damp)
    del h
    chosen = torch.zeros(inv.shape, dtype=torch.int64, device=dev) if inloop else None
    pre = torch.empty_like(w)  # each column's value when it was rounded
    qv = torch.empty_like(w)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            b = (i1 + i) if actorder == "column" else (i1 + i) // BLOCK_SIZE
            if inloop and (i1 + i) % BLOCK_SIZE == 0:
                c = _inloop_codes(
                    w1[:, i : i + BLOCK_SIZE], u1[i : i + BLOCK_SIZE, i : i + BLOCK_SIZE], g
                )
                vb = nvfp4.fp8_code_to_value(c)
                inv[:, b], step[:, b] = g / vb, vb / g
                chosen[:, b] = c
            x = w1[:, i]
            q = nvfp4.round_e2m1(x * inv[:, b]) * step[:, b]
            pre[:, i1 + i] = x
            qv[:, i1 + i] = q
            e = (x - q) / u1[i, i]
            err[:, i] = e
            w1[:, i + 1 :].addr_(e, u1[i, i + 1 :], alpha=-1.0)
        if i2 < k:
            w[:, i2:].addmm_(err, u[i1:i2, i2:], alpha=-1.0)
    if perm is not None:
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(k, device=dev)
        pre, qv = pre[:, inverse], qv[:, inverse]
    if bperm is not None and inloop:
        binv = torch.empty_like(bperm)
        binv[bperm] = torch.arange(bperm.numel(), device=dev)
        chosen = chosen[:, binv]
    if inloop:
        scales = chosen.to(torch.uint8).view(torch.float8_e4m3fn)
    codes = sweep.quantize_codes(pre, g, scales.to(dev))
    ref = sweep.quantize_dequantize(pre, g, scales.to(dev))
    mismatches = int((ref != qv).sum())
    return GPTQResult(codes, damp_used, int(dead.sum()), mismatches, scales if inloop else None)


def _block_losses(x, u, g, cand):
    """GPTQ's loss over one block for candidate codes ``cand`` ``[N, C]``: ``sum_j
    e_j^2``, ``e_j = (x_j - q_j) / U_jj`` with the in-block feedback ``x_{j+1:} -=
    e_j U_{j, j+1:}`` (``x`` ``[N, 16]``: the block's current weights; ``u``: the
    block's 16x16 part of the upper Cholesky factor of the inverse Hessian)."""
    v = nvfp4.fp8_code_to_value(cand)
    inv, step = g / v, v / g
    # element-major [16, N, C]: each step reads and updates whole contiguous slabs
    xx = x.T[:, :, None].expand(-1, -1, cand.shape[1]).clone()
    loss = torch.zeros(cand.shape, dtype=torch.float32, device=x.device)
    for j in range(x.shape[1]):
        xj = xx[j]
        e = (xj - nvfp4.round_e2m1(xj * inv) * step) / u[j, j]
        loss += e * e
        if j + 1 < x.shape[1]:
            xx[j + 1 :] -= e[None] * u[j, j + 1 :, None, None]
    return loss


def _zero_trajectory_code(x, u, g):
    """Per row, the first code from which every weight of the block rounds to 0: the
    feedback then runs on ``x`` alone, the same at every larger code (bit for bit),
    so larger codes tie with it and lose the tie."""
    t = x.clone()
    for j in range(x.shape[1] - 1):
        t[:, j + 1 :] -= (t[:, j] / u[j, j])[:, None] * u[j, j + 1 :]
    return first_zero_code(t.abs().amax(dim=1), g)


def _inloop_codes(x, u, g, exhaustive: bool = False):
    """Per row, the FP8 code of the block ``x`` ``[N, 16]`` (its current, error-updated
    weights) with the smallest GPTQ loss over the block (:func:`_block_losses`): the
    objective GPTQ's rounding then minimises greedily. Ties to the smaller code.

    Window (``exhaustive=True`` tries all 126 codes instead; tests compare):
    in exact arithmetic the loss is ``delta^T M delta`` with ``delta = x - s q`` (the
    block's error against its weights at block start: ``delta = U^T e``) and ``M^-1 =
    U^T U``, so it is at least ``delta_i^2 / P_ii`` with ``P_ii = sum_k U_ki^2``
    (Cauchy-Schwarz, as in :mod:`scalesweep_vllm.hessian_sweep`); a code with ``6 s <
    |x_i|`` clips: ``|delta_i| >= |x_i| - 6 s``. So codes whose clipping alone costs
    more than the AbsMax code's loss lose (``lo``, with a relative margin of 2^-8 for
    fp32 rounding: :func:`scalesweep_vllm.sweep._clip_lo`), and codes from
    :func:`_zero_trajectory_code` on tie (``hi``)."""
    n = x.shape[0]
    if exhaustive:
        cand = torch.arange(1, nvfp4.FP8_MAX_CODE + 1, device=x.device).expand(n, -1)
        return cand.gather(1, torch.argmin(_block_losses(x, u, g, cand), 1)[:, None])[:, 0]
    a = x.abs()
    c0 = sweep._absmax_codes_blocks(a, g)
    e0 = _block_losses(x, u, g, c0[:, None])[:, 0]
    w = (1.0 / (u * u).sum(dim=0)).expand_as(a)  # 1 / P_ii, P_ii = (U^T U)_ii
    # the sweep's clip bound, in its G-scaled units (loss * G^2)
    lo = torch.minimum(sweep._clip_lo(a, g, w, e0 * (g * g)), c0)
    hi = torch.maximum(_zero_trajectory_code(x, u, g), c0)
    # each row's own window, ascending (so argmin's first minimum is the smaller code);
    # rows with a shorter one repeat their hi, masked out
    cand = lo[:, None] + torch.arange(int((hi - lo).max()) + 1, device=x.device)
    inside = cand <= hi[:, None]
    cand = torch.where(inside, cand, hi[:, None])
    loss = torch.where(inside, _block_losses(x, u, g, cand), float("inf"))
    return cand.gather(1, torch.argmin(loss, dim=1)[:, None])[:, 0]


def _linear_shapes(config) -> tuple[int, list[tuple[int, int]]]:
    """(decoder layers, per-layer fused groups as (rows, in_features)) of a Llama-like
    config: q/k/v share one H, gate/up one, o and down their own."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or hidden // heads
    inter = config.intermediate_size
    groups = [
        ((heads + 2 * kv) * hd, hidden),  # q+k+v
        (hidden, heads * hd),  # o
        (2 * inter, hidden),  # gate+up
        (hidden, inter),  # down
    ]
    return config.num_hidden_layers, groups


def memory_estimate(config, tokens: int, compute_bytes: int = 2) -> dict:
    """Bytes the GPTQ pipeline holds, from the shapes (Llama-like ``config``).

    Host: the model in bf16 (2 B per parameter: embeddings, head, all layers).
    Device, at one time: one decoder layer in the compute dtype (``compute_bytes``),
    the calibration hidden states (``tokens x hidden``, compute dtype, inputs kept
    and outputs written in place), the layer's H matrices (float32, one per fused
    group, as :mod:`.calibration` keeps them), and the working set of GPTQ on one
    group, the largest: a copy of H and, while it is factored, the Cholesky factor
    and the inverse (3 x K^2 float32), and about six N x K float32 matrices (the
    group's weights, their working copy, pre-rounding and rounded values, the
    reference's re-encoding).
    """
    layers, groups = _linear_shapes(config)
    layer_params = sum(r * c for r, c in groups)
    norm_params = 2 * config.hidden_size
    vocab = config.vocab_size
    tied = bool(getattr(config, "tie_word_embeddings", False))
    total = layers * (layer_params + norm_params) + vocab * config.hidden_size * (1 if tied else 2)
    # q/k/v and gate/up share their H: distinct inputs are hidden (twice: qkv, gate_up),
    # heads*hd (o) and inter (down)
    hessians = (2 * config.hidden_size**2 + groups[1][1] ** 2 + groups[3][1] ** 2) * 4
    work = max(3 * c * c * 4 + 6 * r * c * 4 for r, c in groups)
    activations = tokens * config.hidden_size * compute_bytes
    layer_bytes = (layer_params + norm_params) * compute_bytes
    return {
        "params": total,
        "host_model_bytes": total * 2,
        "device_layer_bytes": layer_bytes,
        "device_activation_bytes": activations,
        "device_hessian_bytes": hessians,
        "device_gptq_work_bytes": work,
        "device_peak_bytes": layer_bytes + activations + hessians + work,
    }
