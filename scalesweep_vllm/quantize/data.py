"""Calibration data: texts -> fixed-length token chunks.

Documents are tokenized, joined with the EOS token and cut into ``num_samples``
chunks of ``seq_len`` tokens (packed, so there is no padding and no attention
mask: every token counts). The default corpus is the first 8,000 Wikipedia
articles (:mod:`.assets`), shuffled with a fixed seed so the chunks cover many
articles; the last 2,000 are never read here.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["calibration_tokens", "read_calibration_file"]

_SEED = 1234


def read_calibration_file(path: str | Path) -> list[str]:
    """Documents of a text or JSONL file.

    JSONL (``.jsonl``/``.json`` lines, or any file whose first non-blank line is a
    JSON object): the ``text`` field of each line (else its first string value).
    Plain text: paragraphs separated by blank lines. Raises FileNotFoundError or
    ValueError (empty file, no text).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"calibration file {p} does not exist")
    raw = p.read_text(encoding="utf-8", errors="replace")
    lines = [ln for ln in raw.splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"calibration file {p} is empty")
    docs: list[str] = []
    if p.suffix == ".jsonl" or lines[0].lstrip().startswith("{"):
        for i, ln in enumerate(lines, 1):
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as err:
                raise ValueError(f"{p}:{i}: not a JSON line ({err.msg})") from err
            if isinstance(obj, str):
                docs.append(obj)
            elif isinstance(obj, dict):
                text = obj.get("text")
                if not isinstance(text, str):
                    text = next((v for v in obj.values() if isinstance(v, str)), "")
                docs.append(text)
    else:
        docs = [d for d in raw.split("\n\n")]
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"calibration file {p} holds no text")
    return docs


def calibration_tokens(
    calib: str | Path | Sequence[str] | torch.Tensor | None,
    tokenizer,
    num_samples: int,
    seq_len: int,
) -> tuple[torch.Tensor, str]:
    """Token ids ``[n, seq_len]`` (int64, n <= num_samples) and a description of the source.

    ``calib``: None (default corpus), a file path, a list of texts, or a ready
    token tensor ``[n, T]`` (used as is, first ``num_samples`` rows). With fewer
    tokens than ``num_samples * seq_len`` it returns as many full chunks as there
    are (one shorter chunk if not even one fits).
    """
    if num_samples < 1 or seq_len < 1:
        raise ValueError(f"num_samples and seq_len must be >= 1, got {num_samples}, {seq_len}")
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2 or calib.numel() == 0 or calib.is_floating_point():
            raise ValueError(
                f"calibration tokens must be a non-empty [n, T] integer tensor, "
                f"got {tuple(calib.shape)} {calib.dtype}"
            )
        return calib[:num_samples].to(torch.int64), f"token tensor {tuple(calib.shape)}"
    if calib is None:
        from . import assets

        docs = assets.calibration_texts()
        random.Random(_SEED).shuffle(docs)
        n_art = assets.CALIBRATION_ARTICLES
        source = f"wikipedia (first {n_art} articles of {assets.corpus_path().name})"
    elif isinstance(calib, (str, Path)):
        docs = read_calibration_file(calib)
        source = str(calib)
    else:
        docs = [str(d) for d in calib if str(d).strip()]
        source = f"{len(docs)} texts"
        if not docs:
            raise ValueError("calibration texts are empty")
    if tokenizer is None:
        raise ValueError("text calibration needs a tokenizer (none found beside the model)")
    need = num_samples * seq_len
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
        if len(ids) >= need:
            break
    if not ids:
        raise ValueError(f"calibration data ({source}) tokenizes to nothing")
    n = min(num_samples, len(ids) // seq_len)
    if n == 0:
        return torch.tensor([ids], dtype=torch.int64), source
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).view(n, seq_len), source
