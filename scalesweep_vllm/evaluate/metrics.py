"""Held-out text, the BF16 reference and the three measures.

Text: the last 2,000 Wikipedia intros (:func:`scalesweep_vllm.quantize.assets.evaluation_texts`,
never used for calibration), in file order, each tokenized without special tokens
and joined with the EOS token, cut into ``windows`` of ``seq_len`` tokens; the first
``tokens`` tokens are used (whole windows), always the same ones. Every position
but the first of a window is scored: ``windows * (seq_len - 1)`` predictions.

Measures, per scored position: the negative log-likelihood of the true next token
(perplexity = exp of its mean), the KL divergence ``KL(P_bf16 || P_q)`` of the
next-token distributions, and whether both argmaxes agree. KLD is reported as a
mean and a 99th percentile (as llama.cpp's ``--kl-divergence``).

The BF16 reference is computed once and cached under ``$SCALESWEEP_CACHE/eval/<key>/``
(key: model files, token ids, dtype): its next-token probabilities ``p`` as float16
(``[positions, vocab]``, 6.4 GB for 65k positions of a 49k vocabulary) and, per
position, ``sum_i p_i log p_i`` computed from those stored ``p``. Then
``KL = sum_i p_i log p_i - sum_i p_i log q_i`` costs one dot product per position,
and the reference against itself gives exactly 0 (the same float16 ``p``, the same
arithmetic). Rounding ``p`` to float16 (relative error <= 2^-11 per entry, entries
below ~6e-8 flushed) perturbs each term of the sum by that relative amount: the KLD
moves by about 2^-11 of itself, far below any difference the table shows.

Noise: every measure is also reported on the first and second halves of the windows
(disjoint texts); ``noise`` is half their difference, ``|m1 - m2| / 2``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "Reference",
    "evaluation_tokens",
    "model_key",
    "reference",
    "score",
    "summarize",
    "token_nll",
]


def evaluation_tokens(tokenizer, tokens: int, seq_len: int, texts: list[str] | None = None):
    """``[windows, seq_len]`` int64: the held-out text (module docstring)."""
    from ..quantize import assets

    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    windows = max(1, math.ceil(tokens / seq_len))
    need = windows * seq_len
    texts = assets.evaluation_texts() if texts is None else texts
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"the evaluation text has {len(ids)} tokens, fewer than {need} asked")
    return torch.tensor(ids[:need], dtype=torch.int64).view(windows, seq_len)


def model_key(model_dir: str | os.PathLike, tokens: torch.Tensor, dtype: torch.dtype) -> str:
    """Cache key of a BF16 reference: the model folder's files (names, sizes, mtimes),
    the token ids and the dtype."""
    h = hashlib.sha256()
    folder = Path(model_dir).resolve()
    h.update(str(folder).encode())
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in (".json", ".safetensors"):
            st = f.stat()
            h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(tokens.numpy().tobytes())
    h.update(str(tokens.shape).encode())
    h.update(str(dtype).encode())
    return h.hexdigest()[:16]


def _batches(tokens: torch.Tensor, batch_size: int, progress: bool, desc: str):
    starts = range(0, tokens.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", total=len(starts))
    for s in starts:
        yield s, tokens[s : s + batch_size]


def _log_probs(model, ids: torch.Tensor, device) -> torch.Tensor:
    """``[b, T-1, V]`` float32 log-probs of the next token at every position but the last."""
    logits = model(input_ids=ids.to(device), use_cache=False).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


@torch.no_grad()
def token_nll(model, tokens: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """Per scored position ``-log q(next token)`` (float32 ``[windows, seq_len - 1]``),
    as :func:`score` computes it, without a reference (served == measured checks)."""
    out = torch.empty(tokens.shape[0], tokens.shape[1] - 1)
    for s in range(tokens.shape[0]):
        ids = tokens[s : s + 1]
        out[s] = -_log_probs(model, ids, device).gather(-1, ids[:, 1:, None]).squeeze(-1)[0]
    return out


def _cross(p16: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """``sum_i p_i log q_i`` per position, ``p`` the stored float16 probabilities."""
    b, t, v = lq.shape
    p = p16.reshape(b * t, 1, v).float()
    return torch.bmm(p, lq.reshape(b * t, v, 1)).reshape(b, t)


@dataclass
class Reference:
    """The cached BF16 pass: per position NLL and argmax, and the log-probs file."""

    path: Path
    tokens: torch.Tensor  # [windows, seq_len]
    nll: torch.Tensor  # float32 [windows, seq_len - 1]
    argmax: torch.Tensor  # int64 [windows, seq_len - 1]
    self_cross: torch.Tensor  # float32 [windows, seq_len - 1]: sum p log p
    vocab: int
    seconds: float

    def probs(self) -> np.memmap:
        w, t = self.nll.shape
        return np.memmap(
            self.path / "probs.f16", dtype=np.float16, mode="r", shape=(w, t, self.vocab)
        )


@torch.no_grad()
def reference(
    model,
    tokens: torch.Tensor,
    key: str,
    cache: Path | None = None,
    batch_size: int = 2,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> Reference:
    """The BF16 reference of ``model`` on ``tokens``, from the cache or computed once."""
    from ..quantize import assets

    root = Path(cache) if cache is not None else assets.cache_dir() / "eval"
    path = root / key
    info = path / "reference.json"
    if info.is_file():
        meta = json.loads(info.read_text())
        data = torch.load(path / "positions.pt")
        if torch.equal(data["tokens"], tokens):
            return Reference(
                path,
                tokens,
                data["nll"],
                data["argmax"],
                data["self_cross"],
                meta["vocab"],
                meta["seconds"],
            )
    path.mkdir(parents=True, exist_ok=True)
    w, t = tokens.shape
    t0 = time.perf_counter()
    mm = None
    nll = torch.empty(w, t - 1)
    arg = torch.empty(w, t - 1, dtype=torch.int64)
    self_cross = torch.empty(w, t - 1)
    for s, ids in _batches(tokens, batch_size, progress, "BF16 reference"):
        lp = _log_probs(model, ids, device)
        if mm is None:
            vocab = lp.shape[-1]
            mm = np.memmap(
                path / "probs.f16.tmp", dtype=np.float16, mode="w+", shape=(w, t - 1, vocab)
            )
        p16 = lp.exp().to(torch.float16)
        mm[s : s + ids.shape[0]] = p16.numpy()
        self_cross[s : s + ids.shape[0]] = _cross(p16, lp)
        nll[s : s + ids.shape[0]] = -lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        arg[s : s + ids.shape[0]] = lp.argmax(-1)
    mm.flush()
    del mm
    os.replace(path / "probs.f16.tmp", path / "probs.f16")
    seconds = time.perf_counter() - t0
    torch.save(
        {"tokens": tokens, "nll": nll, "argmax": arg, "self_cross": self_cross},
        path / "positions.pt",
    )
    info.write_text(json.dumps({"vocab": vocab, "seconds": seconds, "shape": [w, t]}))
    return Reference(path, tokens, nll, arg, self_cross, vocab, seconds)


@torch.no_grad()
def score(
    model,
    ref: Reference,
    batch_size: int = 2,
    progress: bool = True,
    device: str | torch.device = "cpu",
    desc: str = "evaluate",
) -> dict:
    """Per position NLL, KLD to the reference and top-1 agreement of ``model``."""
    tokens = ref.tokens
    w, t = tokens.shape
    nll = torch.empty(w, t - 1)
    kld = torch.empty(w, t - 1)
    agree = torch.empty(w, t - 1, dtype=torch.bool)
    ref_p = ref.probs()
    t0 = time.perf_counter()
    for s, ids in _batches(tokens, batch_size, progress, desc):
        lq = _log_probs(model, ids, device)
        e = s + ids.shape[0]
        nll[s:e] = -lq.gather(-1, ids[:, 1:, None]).squeeze(-1)
        agree[s:e] = lq.argmax(-1) == ref.argmax[s:e]
        p16 = torch.from_numpy(np.array(ref_p[s:e]))
        kld[s:e] = ref.self_cross[s:e] - _cross(p16, lq)
        del p16, lq
    return {"nll": nll, "kld": kld, "agree": agree, "seconds": time.perf_counter() - t0}


def _measures(nll: torch.Tensor, kld: torch.Tensor | None, agree: torch.Tensor | None) -> dict:
    out = {"ppl": math.exp(float(nll.double().mean())), "nll": float(nll.double().mean())}
    if kld is not None:
        k = kld.flatten().double()
        out["kld_mean"] = float(k.mean())
        out["kld_p99"] = float(torch.quantile(k, 0.99))
        out["top1"] = float(agree.double().mean())
    return out


def summarize(nll: torch.Tensor, kld: torch.Tensor | None = None, agree=None) -> dict:
    """Measures on all windows, on each half, and the noise (half the halves' spread)."""
    w = nll.shape[0]
    h = w // 2
    out = _measures(nll, kld, agree)
    if h >= 1:
        halves = [
            _measures(
                nll[sl], None if kld is None else kld[sl], None if agree is None else agree[sl]
            )
            for sl in (slice(0, h), slice(h, 2 * h))
        ]
        out["halves"] = halves
        out["noise"] = {k: abs(halves[0][k] - halves[1][k]) / 2 for k in halves[0]}
    out["positions"] = int(nll.numel())
    return out
