"""Served == measured, exactly, up to near-ties: record every runtime quantizer call
inside the engine, then run the evaluation's forward with the served output put in
wherever the two disagree at a near-tie.

Why: vLLM's float32 CPU arithmetic (oneDNN GEMMs, its rotary embedding and attention
kernel, under tensor parallelism also the all-reduce's order) differs from
transformers' by ~1e-6 relative. Now and then a quantizer input lies that close to an
FP4 rounding midpoint (or to a tie between two block scales), and the engine and the
evaluation round it one FP4 step apart: one element of one layer, which every later
position of its window attends to (|dNLL| up to ~0.3 nats on the tiny model; a
fraction of 64-token windows at either global scale and in every part). A tolerance
wide enough for that would hide real bugs; instead the evaluation takes the served
output at exactly those elements, when (and only when) the served input is within
fp32 noise of the evaluation's (``NOISE`` of its max) and the same quantizer maps the
served input to the served output. Then served and aligned must agree to fp32 noise
(~1e-6 nats); any other disagreement raises.

The plugin and the evaluation both call ``scalesweep_vllm.kernels.fake_quantize`` (a
module attribute, looked up at call time), which is what gets patched; the plugin's
packed CPU GEMM quantizes Linear inputs with ``kernels.quantize`` instead (codes for
the integer GEMM), patched too and recorded as the values those codes decode to (what
``fake_quantize`` returns for the same input, bit for bit). Each quantizer
has its own global scale (asserted: calls are grouped by it). Under tensor
parallelism each rank records its slice (row-parallel inputs: a range of features;
Q/K/V: its heads; replicated inputs and KV heads: the whole), and the slices are put
back together along that dimension.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import torch

from scalesweep_vllm import kernels

#: Largest served-vs-evaluation input difference, relative to the input's max, still
#: taken for fp32 noise (observed: <= 3e-6 relative on the tiny model).
NOISE = 1e-5

_REAL = kernels.fake_quantize
_REAL_Q = kernels.quantize


def _rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # noqa: BLE001 - no vLLM or no TP group: a single rank
        return 0


def _recorder(calls: list[dict], folder: str | os.PathLike | None):
    count = [0]

    def keep(x, global_scale, y):
        item = {"g": float(global_scale), "x": x.detach().clone(), "y": y.detach().clone()}
        if folder is None:
            calls.append(item)
        else:
            item["rank"] = _rank()
            count[0] += 1
            torch.save(item, Path(folder) / f"{os.getpid()}-{count[0]:08d}.pt")

    def record(x, global_scale, method="mse", weight=None, backend="auto"):
        y = _REAL(x, global_scale, method, weight, backend)
        keep(x, global_scale, y)
        return y

    def record_codes(x, global_scale, method="mse", weight=None, backend="auto"):
        packed, scales = _REAL_Q(x, global_scale, method, weight, backend)
        keep(x, global_scale, kernels.dequantize(packed, scales, global_scale, x.dtype))
        return packed, scales

    return record, record_codes


def _patch(calls: list[dict], folder) -> None:
    kernels.fake_quantize, kernels.quantize = _recorder(calls, folder)


def install(folder: str | os.PathLike) -> None:
    """Record this process's calls to ``folder``, one file per call, for good (the
    engine's spawned processes, through tests/record_site/sitecustomize.py)."""
    _patch([], folder)


@contextlib.contextmanager
def recording():
    """Record this process's ``kernels.fake_quantize`` and ``kernels.quantize`` calls
    in memory (yields the list)."""
    calls: list[dict] = []
    _patch(calls, None)
    try:
        yield calls
    finally:
        kernels.fake_quantize, kernels.quantize = _REAL, _REAL_Q


def load_records(folder: str | os.PathLike) -> list[dict]:
    """Calls written by :func:`install`'s processes, in call order per process."""

    def key(p: Path):
        pid, n = p.stem.split("-")
        return int(pid), int(n)

    return [torch.load(p) for p in sorted(Path(folder).glob("*.pt"), key=key)]


def served_by_scale(calls: list[dict]) -> dict[float, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per global scale, each rank's served inputs and outputs with one row per token
    (in the engine's order), ranks in order (:func:`_whole` puts them together)."""
    by: dict[float, dict[int, list]] = {}
    for c in calls:
        by.setdefault(c["g"], {}).setdefault(c.get("rank", 0), []).append(c)
    out = {}
    for g, ranks in by.items():
        pieces = []
        for r in sorted(ranks):
            xs = [c["x"].reshape(-1, *c["x"].shape[-(c["x"].dim() - 1) :]) for c in ranks[r]]
            ys = [c["y"].reshape(xs[i].shape) for i, c in enumerate(ranks[r])]
            pieces.append((torch.cat(xs), torch.cat(ys)))
        out[g] = pieces
    return out


def _whole(pieces, tail: tuple[int, ...]):
    """The ranks' pieces [N, *t_r] as one [N, *tail]: the same as ``tail`` on every rank
    (replicated, or one rank), or split along the first of the trailing dims (2-D:
    the input features of a row-parallel Linear; 3-D [N, heads, D]: the heads)."""
    xs, ys = [p[0] for p in pieces], [p[1] for p in pieces]
    if tuple(xs[0].shape[1:]) == tail:
        return xs[0], ys[0]
    return torch.cat(xs, 1), torch.cat(ys, 1)


@dataclasses.dataclass(frozen=True)
class Tie:
    """One aligned near-tie: its window, quantizer (global scale), how many output
    elements took the served value, and the largest input difference there."""

    window: int
    g: float
    elements: int
    dx: float

    def __str__(self) -> str:
        return f"window {self.window} G={self.g:.6g}: {self.elements} elements, |dx| {self.dx:.1e}"

    __repr__ = __str__


class Aligner:
    """Patches ``kernels.fake_quantize`` for the evaluation's forward of one window at a
    time (``window`` = index of its rows in the served order, ``rows`` tokens each)."""

    def __init__(self, calls: list[dict], rows: int):
        self.served = served_by_scale(calls)
        self.whole: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}  # per scale, once
        self.rows = rows
        self.window = 0
        self.ties: list[Tie] = []

    def __enter__(self):
        kernels.fake_quantize = self._call
        return self

    def __exit__(self, *exc):
        kernels.fake_quantize = _REAL

    def _call(self, x, global_scale, method="mse", weight=None, backend="auto"):
        y = _REAL(x, global_scale, method, weight, backend)
        g = float(global_scale)
        if g not in self.served:
            raise AssertionError(f"the engine never quantized with global scale {g:.9g}")
        if g not in self.whole:
            nd = self.served[g][0][0].dim() - 1  # trailing dims: features, or (heads, D)
            self.whole[g] = _whole(self.served[g], tuple(x.shape[-nd:]))
        sx, sy = self.whole[g]
        n = x.numel() // sx[0].numel()
        if sx.shape[0] < (self.window + 1) * self.rows or n != self.rows:
            raise AssertionError(
                f"G={g:.9g}: {sx.shape[0]} served rows, window {self.window} of {self.rows}"
            )
        lo = self.window * self.rows
        sx = sx[lo : lo + self.rows].reshape(x.shape)
        sy = sy[lo : lo + self.rows].reshape(y.shape)
        if torch.equal(sy, y):
            return y
        dx = (sx.float() - x.float()).abs().max().item()
        if dx > NOISE * x.float().abs().max().item() or not torch.equal(
            _REAL(sx, global_scale, method, weight, backend), sy
        ):
            raise AssertionError(
                f"window {self.window}, G={g:.9g}: served output differs beyond a near-tie "
                f"(input |dx| {dx:.2e})"
            )
        self.ties.append(Tie(self.window, g, int((sy != y).sum()), dx))
        return torch.where(sy != y, sy, y)


@torch.no_grad()
def aligned_nll(model, ids: torch.Tensor, calls: list[dict]) -> tuple[torch.Tensor, list[Tie]]:
    """Per-token NLL of ``ids`` [windows, T] from the evaluation's ``model``, with the
    served quantizer outputs at near-ties; and the near-ties aligned."""
    from scalesweep_vllm.evaluate.metrics import token_nll

    al = Aligner(calls, ids.shape[1])
    out = []
    with al:
        for w in range(ids.shape[0]):
            al.window = w
            out.append(token_nll(model, ids[w : w + 1])[0])
    return torch.stack(out), al.ties
