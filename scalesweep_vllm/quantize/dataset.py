"""Calibration from a Hugging Face dataset: a hub id, a ``save_to_disk`` folder, or a
folder of data files (what :func:`datasets.load_dataset` reads: JSONL, Parquet, CSV...).

The same forms llm-compressor's ``oneshot(dataset=...)`` takes. One split and one
column are read, in the dataset's own order (the first rows, no shuffle), lazily: only
as many rows as the tokens asked for need. The column holds text (a string per row) or
chat messages (a list of ``{"role", "content"}`` per row), which
:func:`.data.calibration_tokens` renders with the model's chat template.

Hub ids go through :mod:`.hub`'s snapshot (the dataset repository's files, from the
cache when offline) and are then read like a local folder, so ``HF_HUB_OFFLINE=1``
with a populated cache works, with no dataset script and no network.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import hub

__all__ = ["DatasetSource", "is_dataset_folder", "read_dataset", "select"]

#: Columns taken without --calib-column, in this order: text first, then chat messages.
TEXT_COLUMNS = ("text",)
CHAT_COLUMNS = ("messages", "conversations", "conversation")
_SAVED = ("dataset_info.json", "dataset_dict.json", "state.json")


@dataclass(frozen=True)
class DatasetSource:
    """``--calib`` as a dataset: ``path`` (a hub id or a folder), ``split`` (default
    ``train``, or the only split), ``column`` (default: ``text``, else a chat-messages
    column, else the one string column), ``config`` (the dataset's subset)."""

    path: str
    split: str | None = None
    column: str | None = None
    config: str | None = None

    def __str__(self) -> str:
        return self.path + (f" ({self.config})" if self.config else "")


def is_dataset_folder(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and any((path / f).is_file() for f in _SAVED)


def _import():
    try:
        import datasets
    except ImportError as err:
        raise ValueError(
            "--calib names a Hugging Face dataset, which needs the `datasets` package: "
            "pip install 'scalesweep-vllm[hub]' (or pip install datasets)"
        ) from err
    return datasets


def _load(src: DatasetSource):
    """The Dataset or DatasetDict that ``src`` names."""
    datasets = _import()
    folder = Path(src.path).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise ValueError(f"--calib {folder} is a file, not a dataset folder")
        if is_dataset_folder(folder) and src.config:
            raise ValueError(f"--calib-config does not apply to a save_to_disk folder ({folder})")
        where = str(folder)
    else:
        where = str(hub.snapshot(src.path, repo_type="dataset"))
    try:
        if is_dataset_folder(Path(where)):
            return datasets.load_from_disk(where), src.path
        return datasets.load_dataset(where, name=src.config), src.path
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds (and IndexError)
        what = f"{src.path} is a directory, and" if folder.exists() else f"{src}:"
        raise ValueError(
            f"--calib {what} the datasets library cannot read it ({type(err).__name__}: "
            f"{err}); pass a calibration file, a save_to_disk folder or a folder of "
            "JSONL/Parquet/CSV files"
        ) from err


def _split(obj, src: DatasetSource, name: str):
    """The split ``src`` asks for (or the default) of a DatasetDict; a Dataset as is."""
    if not hasattr(obj, "keys"):
        if src.split and getattr(obj, "split", None) not in (None, src.split):
            raise ValueError(f"--calib {name} holds only split {obj.split!r}, not {src.split!r}")
        return obj, src.split or (str(obj.split) if getattr(obj, "split", None) else None)
    splits = list(obj.keys())
    if src.split is not None:
        if src.split not in splits:
            raise ValueError(
                f"--calib {name} has no split {src.split!r}; its splits: {', '.join(splits)}"
            )
        return obj[src.split], src.split
    if "train" in splits:
        return obj["train"], "train"
    if len(splits) == 1:
        return obj[splits[0]], splits[0]
    raise ValueError(
        f"--calib {name} has several splits and none is 'train': pick one with "
        f"--calib-split ({', '.join(splits)})"
    )


def _is_chat(feature) -> bool:
    """A list of records with string ``role`` and ``content`` fields."""
    inner = getattr(feature, "feature", None)
    if inner is None and isinstance(feature, list) and feature:
        inner = feature[0]
    if isinstance(inner, dict):
        return all(
            getattr(inner.get(k), "dtype", None) in ("string", "large_string")
            for k in ("role", "content")
        )
    return False


def _is_text(feature) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _column(ds, src: DatasetSource, name: str) -> tuple[str, bool]:
    """The column to read and whether it holds chat messages."""
    features = ds.features
    cols = list(features)
    if src.column is not None:
        if src.column not in features:
            raise ValueError(
                f"--calib {name} has no column {src.column!r}; its columns: {', '.join(cols)}"
            )
        f = features[src.column]
        if _is_text(f):
            return src.column, False
        if _is_chat(f):
            return src.column, True
        raise ValueError(
            f"--calib {name}: column {src.column!r} holds {f}, neither text (a string per "
            "row) nor chat messages (a list of {role, content} per row)"
        )
    for c in TEXT_COLUMNS:
        if c in features and _is_text(features[c]):
            return c, False
    for c in CHAT_COLUMNS:
        if c in features and _is_chat(features[c]):
            return c, True
    texts = [c for c in cols if _is_text(features[c])]
    if len(texts) == 1:
        return texts[0], False
    raise ValueError(
        f"--calib {name}: no 'text' or chat-messages column and "
        f"{'several' if texts else 'no'} string columns; pick one with --calib-column "
        f"(its columns: {', '.join(cols)})"
    )


class _Rows:
    """The column's non-empty values, read in batches as the tokenizer asks for them."""

    def __init__(self, ds, column: str):
        self._ds = ds.select_columns([column])
        self._column = column

    def __len__(self) -> int:
        return len(self._ds)

    def __iter__(self) -> Iterator[str | list[dict]]:
        for batch in self._ds.iter(batch_size=256):
            for value in batch[self._column]:
                if value:
                    yield value


def read_dataset(src: DatasetSource) -> tuple[_Rows, str]:
    """The rows to calibrate on (lazy) and a description for the report. ValueError
    for a missing split or column, an empty split, a column of another type;
    FileNotFoundError / OSError (from :mod:`.hub`) for an id that cannot be had."""
    obj, name = _load(src)
    return select(obj, src, name)


def select(obj, src: DatasetSource, name: str) -> tuple[_Rows, str]:
    """The rows of the split and column ``src`` asks for in a loaded Dataset or
    DatasetDict ``obj`` (``name`` for messages), as :func:`read_dataset`."""
    ds, split = _split(obj, src, name)
    if len(ds) == 0:
        raise ValueError(
            f"--calib {name}: {f'split {split!r}' if split else 'the dataset'} is empty"
        )
    column, chat = _column(ds, src, name)
    kind = "chat messages, the model's chat template" if chat else "text"
    cfg = f", subset {src.config}" if src.config else ""
    where = f", split {split}" if split else ""
    return _Rows(ds, column), f"dataset {name}{cfg}{where}, column {column} ({kind})"
