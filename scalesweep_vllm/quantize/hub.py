"""Hugging Face hub ids for ``--model`` and ``--calib``, resolved through
``huggingface_hub`` and its cache.

A hub id becomes a local snapshot folder with :func:`huggingface_hub.snapshot_download`:
with network it checks the hub for the newest revision and downloads what is missing;
without (``HF_HUB_OFFLINE=1``, or the hub unreachable) it uses the snapshot already in
the cache (``$HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``), as transformers
does. Every way that can fail ends in one sentence that says what to do.

An argument is taken for a hub id only when it is not an existing path, has the
shape ``name`` or ``owner/name`` (:func:`is_repo_id`) and does not look like a file
name (a ``.txt``, ``.json``... that does not exist is a missing file, not a repository).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["FILE_SUFFIXES", "MODEL_FILES", "is_repo_id", "offline", "snapshot"]

#: What a model snapshot needs (config, safetensors weights, tokenizer, chat template,
#: remote code), so a repository's other weight formats (.bin, .gguf, ONNX) are skipped.
MODEL_FILES = [
    "*.json",
    "*.safetensors",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
    "*.py",
]
#: Suffixes of the calibration and model files this tool reads: an argument ending in
#: one is a path, never a hub id.
FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".gguf", ".parquet", ".csv", ".arrow", ".safetensors")


def is_repo_id(name: str) -> bool:
    """``name`` has a hub repository id's shape (``name`` or ``owner/name``) and is not
    an existing path or a file name."""
    if not name or Path(name).expanduser().exists() or name.lower().endswith(FILE_SUFFIXES):
        return False
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def offline() -> bool:
    """``HF_HUB_OFFLINE`` is set (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def snapshot(
    repo_id: str,
    repo_type: str = "model",
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
    local_only: bool = False,
) -> Path:
    """The local snapshot folder of ``repo_id`` (downloaded when the hub is reachable,
    else from the cache). ``local_only``: look in the cache only, never the network.

    FileNotFoundError: no such repository or revision, or not cached while offline;
    OSError: the hub cannot be reached and nothing is cached; ValueError: not an id."""
    from huggingface_hub import errors, snapshot_download

    what = "dataset" if repo_type == "dataset" else "model"
    if not is_repo_id(repo_id):
        raise ValueError(f"{repo_id!r} is neither an existing path nor a hub {what} id")
    rev = f" (revision {revision})" if revision else ""
    try:
        return Path(
            snapshot_download(
                repo_id,
                repo_type=repo_type,
                revision=revision,
                allow_patterns=allow_patterns,
                local_files_only=local_only,
            )
        )
    except errors.RepositoryNotFoundError as err:
        raise FileNotFoundError(
            f"the Hugging Face hub has no {what} {repo_id!r}, or it is private or gated (log "
            "in with `hf auth login`, or pass a local folder)"
        ) from err
    except errors.RevisionNotFoundError as err:
        raise FileNotFoundError(f"hub {what} {repo_id} has no revision {revision!r}") from err
    except errors.LocalEntryNotFoundError as err:
        if local_only:
            raise
        if offline():
            raise FileNotFoundError(
                f"hub {what} {repo_id}{rev} is not in the Hugging Face cache ({_cache()}) "
                f"and HF_HUB_OFFLINE is set: download it once with network (`hf download "
                f"{repo_id}{' --repo-type dataset' if what == 'dataset' else ''}`) or pass a "
                "local folder"
            ) from err
        raise OSError(
            f"the Hugging Face hub cannot be reached ({err.__cause__ or err}) and hub "
            f"{what} {repo_id}{rev} is not in its cache ({_cache()})"
        ) from err
