"""Zero-shot task accuracy of a model (BF16 or the evaluation's quantized forward).

Scoring follows lm-evaluation-harness's ``HFLM.loglikelihood``: trailing spaces of
the context move to the continuation; ``whole = encode(context + continuation)``,
``ctx = encode(context)`` (no special tokens, as lm-eval for these tokenizers), the
continuation's tokens are ``whole[len(ctx):]``; the model reads
``(ctx + cont)[-(max_len + 1):][:-1]`` and the request's score is the sum of the log
probabilities of the continuation's tokens.

Batching: the choices of an item share one forward of their context (a row
``ctx | cont_1 | cont_2 ...`` whose attention mask lets each continuation see the
context and itself, positions restarting after the context); rows sorted by length
and right-padded. This computes what each ``ctx + cont`` alone computes: attention
is masked exactly, and every runtime quantizer (activations, K, V, Q) works per token
with static global scales, so neither the other choices nor the padding reach a
token. Only GEMM rounding can differ from a one-request forward (the tests bound it).

Each task reports ``acc`` and ``acc_norm`` with lm-eval's standard error
(``sample std / sqrt(n)``) and, per item, whether each was right (for paired
comparisons). The BF16 results are cached under ``$SCALESWEEP_CACHE/eval/tasks/``
(key: model files, the task's requests, this module's scoring version).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .tasks import TASKS, Item, load_items

__all__ = [
    "SCORING_VERSION",
    "compare",
    "encode_pair",
    "loglikelihoods",
    "requests_key",
    "run_tasks",
    "score_items",
]

SCORING_VERSION = 2
TOKEN_BUDGET = 4096  # tokens per forward (padded), the batch size of the task pass


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``: (context ids, continuation ids)."""
    n = len(context) - len(context.rstrip())
    if n:
        continuation = context[-n:] + continuation
        context = context[:-n]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx) :]


def _max_len(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048) or 2048)


@dataclass
class _Pack:
    """One row of a batch: a context shared by several continuations. Layout
    ``ctx | cont_1[:-1] | cont_2[:-1] | ...``; continuation ``k`` attends to the context
    and to itself only, and its positions restart after the context, so each one
    computes exactly what ``ctx + cont_k`` alone computes."""

    ctx: list[int]
    conts: list[list[int]]
    owners: list[int]  # request index of each continuation

    def __len__(self) -> int:
        return len(self.ctx) + sum(len(c) - 1 for c in self.conts)


def _packs(pairs: list[tuple[list[int], list[int]]], max_len: int) -> list[_Pack]:
    """Consecutive requests with the same context ids share a pack (a multiple-choice
    item) while it fits the model's window; a request longer than the window is
    truncated on the left, as lm-eval does."""
    out: list[_Pack] = []
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise ValueError("a request with an empty context or continuation")
        if len(cont) > max_len:
            raise ValueError(f"a continuation of {len(cont)} tokens exceeds the window")
        if out and out[-1].ctx == ctx and len(out[-1]) + len(cont) - 1 <= max_len:
            out[-1].conts.append(cont)
            out[-1].owners.append(i)
            continue
        keep = max_len + 1 - len(cont)  # lm-eval: (ctx + cont)[-(max_len + 1):]
        out.append(_Pack(list(ctx[-keep:]), [cont], [i]))
    return out


def _batch(rows: list[_Pack]):
    """Token ids, position ids and the boolean attention mask ``[B, 1, T, T]`` of a
    right-padded batch of packs. Padding attends to itself (and the context), so no row
    of the mask is empty; no real token attends to padding."""
    width = max(len(p) for p in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    pos = torch.zeros(len(rows), width, dtype=torch.int64)
    seg = torch.full((len(rows), width), -1, dtype=torch.int64)
    for r, p in enumerate(rows):
        c = len(p.ctx)
        ids[r, :c] = torch.tensor(p.ctx)
        pos[r, :c] = torch.arange(c)
        seg[r, :c] = 0
        at = c
        for k, cont in enumerate(p.conts, start=1):
            n = len(cont) - 1
            ids[r, at : at + n] = torch.tensor(cont[:-1], dtype=torch.int64)
            pos[r, at : at + n] = torch.arange(c, c + n)
            seg[r, at : at + n] = k
            at += n
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)
    return ids, pos, (allowed & causal)[:, None]


@torch.no_grad()
def loglikelihoods(
    model,
    pairs: list[tuple[list[int], list[int]]],
    device: str | torch.device = "cpu",
    budget: int = TOKEN_BUDGET,
    progress: bool = True,
    desc: str = "tasks",
) -> list[float]:
    """``sum log p(cont | ctx)`` (float64) of each ``(ctx ids, cont ids)`` pair; the
    choices of one item share one forward of their context (:class:`_Pack`)."""
    packs = _packs(pairs, _max_len(model))
    order = sorted(range(len(packs)), key=lambda i: -len(packs[i]))
    batches, cur = [], []
    for i in order:
        width = len(packs[cur[0]]) if cur else len(packs[i])
        if cur and (len(cur) + 1) * width > budget:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    out = [0.0] * len(pairs)
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc=desc, unit="batch")
    for b in it:
        rows = [packs[i] for i in b]
        ids, pos, mask = _batch(rows)
        dev = torch.device(device)
        logits = model(
            input_ids=ids.to(dev),
            position_ids=pos.to(dev),
            attention_mask=mask.to(dev),
            use_cache=False,
        ).logits
        for r, p in enumerate(rows):
            c, at = len(p.ctx), len(p.ctx)
            for cont, owner in zip(p.conts, p.owners, strict=True):
                n = len(cont) - 1
                where = torch.tensor([c - 1, *range(at, at + n)], device=logits.device)
                lp = torch.log_softmax(logits[r, where].double(), dim=-1)
                tgt = torch.tensor(cont, device=lp.device)[:, None]
                out[owner] = float(lp.gather(-1, tgt).sum())
                at += n
        del logits
    return out


def _mean_stderr(xs: list[int]) -> tuple[float, float]:
    """Mean and lm-eval's standard error (sample std with n - 1, over sqrt(n))."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda j: xs[j])  # first maximum, as numpy.argmax


def score_items(items: list[Item], lls: list[list[float]]) -> dict:
    """acc / acc_norm (and standard errors, per-item bits) from each item's choices'
    log-likelihoods."""
    acc = [int(_argmax(ll) == it.gold) for it, ll in zip(items, lls, strict=True)]
    norm = [
        int(_argmax([x / n for x, n in zip(ll, it.lengths, strict=True)]) == it.gold)
        for it, ll in zip(items, lls, strict=True)
    ]
    a, a_se = _mean_stderr(acc)
    out = {"n": len(items), "acc": a, "acc_stderr": a_se, "acc_items": "".join(map(str, acc))}
    if items and items[0].task in TASKS and TASKS[items[0].task].primary == "acc_norm":
        an, an_se = _mean_stderr(norm)
        out.update(acc_norm=an, acc_norm_stderr=an_se, acc_norm_items="".join(map(str, norm)))
    return out


def requests_key(model_dir: str | Path, task: str, pairs: list, dtype: torch.dtype) -> str:
    """Cache key: the model folder's files, the compute dtype, the tokenized requests,
    the scoring version."""
    from .metrics import model_key

    h = hashlib.sha256(model_key(model_dir, torch.zeros(0, dtype=torch.int64), dtype).encode())
    h.update(f"{task}|{SCORING_VERSION}|{TOKEN_BUDGET}".encode())
    h.update(json.dumps(pairs).encode())
    return h.hexdigest()[:16]


def run_tasks(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    label: str = "",
    cache_dir: Path | None = None,
    model_dir: str | Path | None = None,
) -> dict:
    """Every task's results for ``model``; with ``cache_dir`` and ``model_dir`` (the BF16
    model), read from / written to the cache."""
    results = {}
    for task in tasks:
        items = load_items(task, limit)
        pairs, owner = [], []
        for k, it in enumerate(items):
            for c, x in zip(it.contexts, it.continuations, strict=True):
                pairs.append(encode_pair(tokenizer, c, x))
                owner.append(k)
        path = None
        if cache_dir is not None and model_dir is not None:
            key = requests_key(model_dir, task, pairs, next(model.parameters()).dtype)
            path = Path(cache_dir) / f"{task}-{key}.json"
            if path.is_file():
                results[task] = json.loads(path.read_text())
                continue
        t0 = time.perf_counter()
        flat = loglikelihoods(model, pairs, device, progress=progress, desc=f"{label} {task}")
        lls: list[list[float]] = [[] for _ in items]
        for k, x in zip(owner, flat, strict=True):
            lls[k].append(x)
        res = {
            "task": task,
            "split": TASKS[task].split,
            "primary": TASKS[task].primary,
            **score_items(items, lls),
            "tokens": sum(len(a) + len(b) for a, b in pairs),
            "seconds": time.perf_counter() - t0,
        }
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(res))
            tmp.replace(path)
        results[task] = res
    return results


def compare(quant: dict, base: dict) -> dict:
    """Recovery of each task's primary metric (quantized / BF16) and its mean over
    the tasks, with the paired difference of the primary metric and its standard
    error (``std(q_i - b_i) / sqrt(n)`` over the same items)."""
    per, recs = {}, []
    for task, q in quant.items():
        b = base[task]
        m = q["primary"]
        qi, bi = q[m + "_items"], b[m + "_items"]
        if len(qi) != len(bi):
            raise ValueError(f"{task}: {len(qi)} items quantized vs {len(bi)} BF16")
        d = [int(x) - int(y) for x, y in zip(qi, bi, strict=True)]
        dm, dse = _mean_stderr(d)
        rec = q[m] / b[m] if b[m] else float("nan")
        recs.append(rec)
        per[task] = {
            "metric": m,
            "bf16": b[m],
            "quantized": q[m],
            "recovery": rec,
            "diff": dm,
            "diff_stderr": dse,
        }
    mean = sum(recs) / len(recs) if recs else float("nan")
    return {"tasks": per, "mean_recovery": mean}
