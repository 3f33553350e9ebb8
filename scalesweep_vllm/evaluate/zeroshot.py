"""Zero-shot task accuracy of a model (BF16 or the evaluation's quantized forward).

Scoring follows lm-evaluation-harness's ``HFLM.loglikelihood``: trailing spaces of
the context move to the continuation; ``whole = encode(context + continuation)``,
``ctx = encode(context)`` (no special tokens, as lm-eval for these tokenizers), the
continuation's tokens are ``whole[len(ctx):]``; the model reads
``(ctx + cont)[-(max_len + 1):][:-1]`` and the request's score is the sum of the log
probabilities of the continuation's tokens.

Batching: requests sorted by length (longest first), right-padded, no attention
mask. That is exact, not an approximation: attention is causal and every runtime
quantizer (activations, K, V, Q) works per token with static global scales, so the
padding after a sequence cannot reach its positions.

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

SCORING_VERSION = 1
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


@torch.no_grad()
def loglikelihoods(
    model,
    pairs: list[tuple[list[int], list[int]]],
    device: str | torch.device = "cpu",
    budget: int = TOKEN_BUDGET,
    progress: bool = True,
    desc: str = "tasks",
) -> list[float]:
    """``sum log p(cont | ctx)`` (float64) of each ``(ctx ids, cont ids)`` pair."""
    max_len = _max_len(model)
    seqs = []
    for ctx, cont in pairs:
        if not cont:
            raise ValueError("a request with an empty continuation")
        inp = (ctx + cont)[-(max_len + 1) :][:-1]
        seqs.append((inp, len(cont), cont))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    batches, cur = [], []
    for i in order:
        width = len(seqs[cur[0]][0]) if cur else len(seqs[i][0])
        if cur and (len(cur) + 1) * width > budget:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    out = [0.0] * len(seqs)
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc=desc, unit="batch")
    for b in it:
        width = len(seqs[b[0]][0])
        ids = torch.zeros(len(b), width, dtype=torch.int64)
        for r, i in enumerate(b):
            ids[r, : len(seqs[i][0])] = torch.tensor(seqs[i][0])
        logits = model(input_ids=ids.to(device), use_cache=False).logits
        for r, i in enumerate(b):
            inp, n, cont = seqs[i]
            lp = torch.log_softmax(logits[r, len(inp) - n : len(inp)].double(), dim=-1)
            out[i] = float(lp.gather(-1, torch.tensor(cont)[:, None].to(lp.device)).sum())
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
