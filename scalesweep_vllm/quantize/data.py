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
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from . import hub
from .dataset import DatasetSource, read_dataset

__all__ = [
    "CalibrationWarning",
    "as_dataset",
    "calibration_tokens",
    "load_calibration_source",
    "read_calibration_file",
]

_SEED = 1234


class CalibrationWarning(UserWarning):
    """Calibration went ahead, but not as asked (fewer tokens, another JSON field)."""


def _decode(p: Path) -> str:
    """The file as UTF-8 text; ValueError for binary or undecodable content."""
    raw = p.read_bytes()
    if b"\x00" in raw:
        raise ValueError(
            f"calibration file {p} is binary (it holds NUL bytes); pass UTF-8 text, JSONL or JSON"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"calibration file {p} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
            f"{err.start}); convert it, e.g. `iconv -f latin1 -t utf-8`"
        ) from err


def _field(objs: list[tuple[str, dict]], p: Path) -> str:
    """The object field holding the text: ``text`` when every object has it, else the
    first string field that every object has (ValueError when there is none)."""
    if all("text" in o for _, o in objs):
        return "text"
    if any("text" in o for _, o in objs):
        where, _ = next((w, o) for w, o in objs if "text" not in o)
        raise ValueError(f"{where}: no 'text' field, though other records of {p} have one")
    first = objs[0][1]
    for key, val in first.items():
        if isinstance(val, str) and all(isinstance(o.get(key), str) for _, o in objs):
            return key
    raise ValueError(
        f"{p}: records have no 'text' field and no other string field common to all of them "
        f"(fields of the first: {sorted(first)})"
    )


def _records(items: list[tuple[str, object]], p: Path) -> tuple[list[str], str | None]:
    """Texts of JSON records (strings or objects); the object field used, if any."""
    strings = [(w, v) for w, v in items if isinstance(v, str)]
    objs = [(w, v) for w, v in items if isinstance(v, dict)]
    bad = next(((w, v) for w, v in items if not isinstance(v, (str, dict))), None)
    if bad is not None:
        raise ValueError(
            f"{bad[0]}: a {type(bad[1]).__name__}; calibration records are strings or "
            "objects with a 'text' field"
        )
    if not objs:
        return [v for _, v in strings], None
    key = _field(objs, p)
    for w, o in objs:
        if not isinstance(o[key], str):
            raise ValueError(f"{w}: field {key!r} is a {type(o[key]).__name__}, not text")
    texts = {w: v for w, v in strings}
    texts.update({w: o[key] for w, o in objs})
    return [texts[w] for w, _ in items], key


def read_calibration_file(path: str | Path) -> tuple[list[str], str]:
    """Documents of a calibration file, and a description saying how it was read.

    * JSON (``.json``, or text starting with ``[``): an array of strings or of
      objects with a ``text`` field.
    * JSONL (``.jsonl``, a ``.json`` that is not one document, or text whose first
      non-blank line is an object): one string or object per line.
    * Anything else: UTF-8 text, documents separated by blank lines.

    Objects without ``text`` use the one string field all records share, and the
    description names it (with a :class:`CalibrationWarning`). Raises
    FileNotFoundError, IsADirectoryError, or ValueError (binary, not UTF-8, empty,
    malformed JSON, no text).
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise IsADirectoryError(
            f"--calib {p} is a directory; pass one file (.txt, .jsonl or .json)"
        )
    if not p.is_file():
        raise FileNotFoundError(f"calibration file {p} does not exist")
    text = _decode(p)
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"calibration file {p} is empty")
    items: list[tuple[str, object]] | None = None
    kind = "text"
    if p.suffix == ".json" or (p.suffix != ".jsonl" and stripped.startswith("[")):
        try:
            doc = json.loads(stripped)
        except json.JSONDecodeError as err:
            if p.suffix == ".json" and not stripped.startswith("{"):
                raise ValueError(f"{p}: not valid JSON ({err})") from err
            doc = None
        if isinstance(doc, list):
            items, kind = [(f"{p}[{i}]", v) for i, v in enumerate(doc)], "JSON array"
        elif doc is not None and p.suffix == ".json":
            raise ValueError(
                f"{p}: a JSON {type(doc).__name__}; calibration JSON is an array of strings "
                "or of objects with a 'text' field"
            )
    lines = [(i, ln) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    if items is None and (p.suffix in (".jsonl", ".json") or lines[0][1].lstrip().startswith("{")):
        items, kind = [], "JSONL"
        for i, ln in lines:
            try:
                items.append((f"{p}:{i}", json.loads(ln)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{p}:{i}: not a JSON line ({err.msg})") from err
    field = None
    if items is None:
        docs = stripped.split("\n\n")
    else:
        docs, field = _records(items, p)
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"calibration file {p} holds no text")
    how = f"{p} ({kind}"
    if field is not None:
        how += f", field {field!r}"
        if field != "text":
            warnings.warn(
                f"{p}: records have no 'text' field; calibrating on their {field!r} field",
                CalibrationWarning,
                stacklevel=2,
            )
    return docs, how + ")"


def as_dataset(
    calib: str | Path,
    split: str | None = None,
    column: str | None = None,
    config: str | None = None,
) -> DatasetSource | None:
    """``calib`` as a dataset (a folder, or a hub id that is not an existing path), or
    None for a calibration file. The dataset options are refused for a file."""
    p = Path(calib).expanduser()
    if p.is_dir() or (not p.exists() and hub.is_repo_id(str(calib))):
        return DatasetSource(str(calib), split, column, config)
    given = [f for f, v in (("split", split), ("column", column), ("config", config)) if v]
    if given:
        raise ValueError(
            f"--calib-{'/--calib-'.join(given)} apply to a dataset, and --calib {calib} is a "
            "file (a dataset is a hub id or a folder)"
        )
    return None


def load_calibration_source(calib) -> tuple[list[str] | torch.Tensor | None, str | None]:
    """Read and check ``calib`` before the model loads: documents (or the token
    tensor, or None for the default corpus) and a description."""
    if calib is None:
        return None, None
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2 or calib.numel() == 0 or calib.is_floating_point():
            raise ValueError(
                f"calibration tokens must be a non-empty [n, T] integer tensor, "
                f"got {tuple(calib.shape)} {calib.dtype}"
            )
        return calib, f"token tensor {tuple(calib.shape)}"
    if isinstance(calib, (str, Path)):
        calib = as_dataset(calib) or calib
    if isinstance(calib, DatasetSource):
        return read_dataset(calib)
    if isinstance(calib, (str, Path)):
        return read_calibration_file(calib)
    docs = [str(d) for d in calib if str(d).strip()]
    if not docs:
        raise ValueError("calibration texts are empty")
    return docs, f"{len(docs)} texts"


def calibration_tokens(
    calib: str | Path | Sequence[str] | torch.Tensor | None,
    tokenizer,
    num_samples: int,
    seq_len: int,
    source: str | None = None,
) -> tuple[torch.Tensor, str]:
    """Token ids ``[n, seq_len]`` (int64, n <= num_samples) and a description of the source.

    ``calib``: None (default corpus), a file path, a dataset (a folder, a hub id or a
    :class:`~.dataset.DatasetSource`: :mod:`.dataset`), a list of texts, or a ready
    token tensor ``[n, T]`` (used as is, first ``num_samples`` rows); or, with
    ``source`` given, what :func:`load_calibration_source` returned. With fewer
    tokens than ``num_samples * seq_len`` it returns as many full chunks as there
    are (one shorter chunk if not even one fits) and emits a
    :class:`CalibrationWarning`.
    """
    if num_samples < 1 or seq_len < 1:
        raise ValueError(f"num_samples and seq_len must be >= 1, got {num_samples}, {seq_len}")
    if source is None:
        calib, source = load_calibration_source(calib)
    if isinstance(calib, torch.Tensor):
        tokens = calib[:num_samples].to(torch.int64)
        if tokens.shape[0] < num_samples:
            _short(source, tokens.numel(), num_samples * tokens.shape[1], tokens.shape[0])
        return tokens, source
    if calib is None:
        from . import assets

        docs = assets.calibration_texts()
        random.Random(_SEED).shuffle(docs)
        n_art = assets.CALIBRATION_ARTICLES
        source = f"wikipedia (first {n_art} articles of {assets.corpus_path().name})"
    else:
        docs = calib
    if tokenizer is None:
        raise ValueError("text calibration needs a tokenizer (none found beside the model)")
    need = num_samples * seq_len
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        if not isinstance(doc, str):
            doc = _chat_text(tokenizer, doc, source)
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
        if len(ids) >= need:
            break
    if not ids:
        raise ValueError(f"calibration data ({source}) tokenizes to nothing")
    n = min(num_samples, len(ids) // seq_len)
    if len(ids) < need:
        _short(source, len(ids), need, max(n, 1))
    if n == 0:
        return torch.tensor([ids], dtype=torch.int64), source
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).view(n, seq_len), source


def _chat_text(tokenizer, messages, source: str) -> str:
    """A conversation rendered by the model's chat template (its special tokens as text,
    which the tokenizer then reads back as special tokens)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"calibration data ({source}) holds chat messages, and the model's tokenizer has "
            "no chat template to render them; pick a text column with --calib-column"
        )
    return tokenizer.apply_chat_template(list(messages), tokenize=False)


def shortfall_message(source: str, have: int, need: int, samples: int) -> str:
    return (
        f"calibration data ({source}) has {have} tokens, fewer than the {need} asked "
        f"(--num-samples x --seq-len); calibrating on {samples} sample(s). Statistics "
        "from so few tokens are noisy: give more text or lower --num-samples"
    )


def _short(source: str, have: int, need: int, samples: int) -> None:
    warnings.warn(shortfall_message(source, have, need, samples), CalibrationWarning, stacklevel=3)
