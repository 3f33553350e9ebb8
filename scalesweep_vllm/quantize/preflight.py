"""Checks that run before the model loads: a mistake costs seconds, not a
quantization run, and never costs the user's data.

* :func:`resolve_device`: ``cpu``, ``cuda`` or ``cuda:N`` that exists here.
* :func:`check_output`: the output path, resolved (``..`` and symlinks), never
  equals, contains or lies inside the model folder, never contains the
  calibration file; ``overwrite`` replaces only an empty folder or one this tool
  wrote (it holds ``scalesweep.json`` or ``quantization_report.json``).
* :func:`check_writable`, :func:`check_free_space`: the output's parent can be
  written and has room for the checkpoint, estimated from the source's
  safetensors headers (:func:`estimate_checkpoint_bytes`).
* :func:`check_model_folder`: a Hugging Face folder with a config and intact,
  complete weight files; not already quantized; a GGUF file is named as such.
* :func:`check_config`: ``seq_len`` within the model's positions, and a
  head_dim that per-head KV/query quantization (blocks of 16) can serve.

docs/QUANTIZER.md lists every refusal and why.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import tempfile
from pathlib import Path

import torch

from ..nvfp4 import BLOCK_SIZE

__all__ = [
    "OWN_MARKERS",
    "check_config",
    "check_free_space",
    "check_model_folder",
    "check_output",
    "check_writable",
    "estimate_checkpoint_bytes",
    "head_dim",
    "max_positions",
    "resolve_device",
]

#: A folder holding one of these was written by this tool: ``--overwrite`` may replace it.
OWN_MARKERS = ("scalesweep.json", "quantization_report.json")
#: Bytes per element of an NVFP4 weight: a 4-bit code plus one FP8 scale per 16.
_NVFP4_BYTES = 0.5 + 1 / BLOCK_SIZE
#: Config keys that name the number of positions a model was trained on.
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")
#: Weight file patterns transformers loads.
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to calibrate and quantize on (ValueError naming the choices)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from err
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(
            f"--device {device!r}: {dev.type} is not supported; use cpu, cuda or cuda:N"
        )
    if not torch.cuda.is_available():
        raise ValueError(
            f"--device {device!r}: no CUDA GPU is visible here (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}); use --device cpu"
        )
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise ValueError(f"--device {device!r}: this machine has {n} CUDA device(s), 0..{n - 1}")
    return dev


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(
    output: str | Path,
    overwrite: bool,
    model_dir: Path | None = None,
    calib_file: Path | None = None,
) -> Path:
    """The resolved output folder, or an error that says why it would lose data.

    FileExistsError: it exists and ``overwrite`` is off, it is not a folder, or it
    is neither empty nor written by this tool. ValueError: it equals, contains or
    lies inside ``model_dir``, or contains ``calib_file``.
    """
    out = Path(output).expanduser().resolve()
    if model_dir is not None:
        src = Path(model_dir).expanduser().resolve()
        if _within(src, out):
            what = "is" if src == out else "contains"
            raise ValueError(f"output {out} {what} the model folder {src}; choose another --output")
        if src in out.parents:
            raise ValueError(
                f"output {out} lies inside the model folder {src}; choose another --output"
            )
    if calib_file is not None:
        cal = Path(calib_file).expanduser().resolve()
        if out in cal.parents:
            raise ValueError(
                f"output {out} contains the calibration file {cal}; choose another --output"
            )
    if not out.exists() and not out.is_symlink():
        return out
    if not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a directory")
    if not overwrite:
        raise FileExistsError(f"output {out} already exists; pass --overwrite to replace it")
    entries = list(out.iterdir())
    if entries and not any((out / m).is_file() for m in OWN_MARKERS):
        raise FileExistsError(
            f"output {out} is not empty and was not written by scalesweep-quantize "
            f"(it has no {' or '.join(OWN_MARKERS)}); --overwrite replaces only an empty "
            "folder or an earlier output of this tool, so it is left alone: choose another "
            "--output or remove it yourself"
        )
    return out


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists():
        p = p.parent
    return p


def check_writable(out: Path) -> None:
    """The output's parent (or its nearest existing ancestor) accepts a new folder.

    A folder with no write bit at all counts as read-only even for root, who could
    write it anyway: the mode says what its owner wants.
    """
    base = _existing_ancestor(out.parent)
    if not base.is_dir():
        raise NotADirectoryError(f"cannot create output {out}: {base} is not a directory")
    if stat.S_IMODE(base.stat().st_mode) & 0o222 == 0:
        raise PermissionError(f"cannot write output {out}: {base} is read-only")
    try:
        probe = tempfile.mkdtemp(prefix=".scalesweep-probe-", dir=base)
    except OSError as err:
        raise PermissionError(f"cannot write output {out}: {base}: {err.strerror}") from err
    os.rmdir(probe)


def _safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path}: truncated or not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: corrupt safetensors header ({err})") from err
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header")
    end = max(
        (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0
    )
    if 8 + n + end != size:
        raise ValueError(
            f"{path}: truncated safetensors file ({size} bytes, its header describes "
            f"{8 + n + end}); re-download or re-export the model"
        )
    return header


def check_model_folder(path: Path) -> None:
    """A folder transformers can load as a bf16 model (ValueError saying what is wrong)."""
    if path.is_file() and path.suffix == ".gguf":
        return  # converted by assets.convert_gguf
    if not path.is_dir() or not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
        if ggufs:
            raise ValueError(
                f"{path} holds a GGUF file but no config.json: pass the file itself "
                f"(--model {ggufs[0]}) and it is converted to a bf16 folder first"
            )
        raise ValueError(f"{path} is not a Hugging Face model folder (no config.json)")
    try:
        raw = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}/config.json is not valid JSON ({err})") from err
    if (path / "scalesweep.json").is_file() or raw.get("quantization_config"):
        method = (raw.get("quantization_config") or {}).get("quant_method", "scalesweep")
        raise ValueError(
            f"{path} is already quantized ({method}); pass the bf16 (or fp16/fp32) model"
        )
    files = [f for g in _WEIGHT_GLOBS for f in sorted(path.glob(g))]
    files = [f for f in files if f.name != "scalesweep_vectors.safetensors"]
    if not files:
        raise ValueError(
            f"{path} has a config.json but no weights (model.safetensors or "
            "pytorch_model.bin); copy the whole model folder"
        )
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            listed = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index} is corrupt ({err})") from err
        missing = sorted(f for f in listed if not (path / f).is_file())
        if missing:
            raise ValueError(f"{path}: weight files listed in {index.name} are missing: {missing}")
    for f in files:
        if f.suffix == ".safetensors":
            _safetensors_header(f)


_NOT_QUANTIZED = ("embed", "lm_head", "wte", "wpe", "norm", "ln_")


def estimate_checkpoint_bytes(path: Path) -> int:
    """Size of the checkpoint we will write, from the source's safetensors headers:
    2-D ``*.weight`` tensors inside the decoder with in_features a multiple of 16 as
    NVFP4, the rest bf16. ``.bin`` sources count at their file size (an upper bound
    for a bf16/fp32 source)."""
    total = 0
    for f in sorted(path.glob("*.safetensors")):
        if f.name == "scalesweep_vectors.safetensors":
            continue
        for name, v in _safetensors_header(f).items():
            if name == "__metadata__":
                continue
            shape = v.get("shape") or []
            numel = 1
            for s in shape:
                numel *= int(s)
            quantized = (
                len(shape) == 2
                and name.endswith(".weight")
                and shape[1] % BLOCK_SIZE == 0
                and not any(k in name for k in _NOT_QUANTIZED)
            )
            total += int(numel * (_NVFP4_BYTES if quantized else 2))
    for g in _WEIGHT_GLOBS[1:]:
        total += sum(f.stat().st_size for f in path.glob(g))
    return total


def check_free_space(out: Path, needed: int) -> None:
    """OSError when the output's file system has less room than ``needed`` bytes."""
    base = _existing_ancestor(out.parent)
    free = shutil.disk_usage(base).free
    if free < needed:
        raise OSError(
            f"not enough space for the checkpoint in {base}: about {needed / 2**20:.0f} MiB "
            f"needed, {free / 2**20:.0f} MiB free"
        )


def max_positions(config) -> int | None:
    """The number of positions the model was trained on, if its config says."""
    for key in _POSITION_KEYS:
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def head_dim(config) -> int | None:
    """Attention head size: ``config.head_dim`` or hidden_size / num_attention_heads."""
    d = getattr(config, "head_dim", None)
    if isinstance(d, int) and d > 0:
        return d
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return hidden // heads
    return None


def check_config(config, seq_len: int, per_head: bool, scheme_name: str) -> None:
    """``seq_len`` within the trained positions; head_dim % 16 == 0 when K/V or Q
    are quantized per head (NVFP4 blocks of 16 along head_dim; the plugin refuses
    the rest, so the quantizer does too)."""
    n = max_positions(config)
    if n is not None and seq_len > n:
        raise ValueError(
            f"--seq-len {seq_len} exceeds the {n} positions this model was trained on; "
            f"use --seq-len {n} or less"
        )
    d = head_dim(config)
    if per_head and d is not None and d % BLOCK_SIZE:
        raise ValueError(
            f"scheme {scheme_name} quantizes keys/values (and queries) per head in blocks of "
            f"{BLOCK_SIZE}, but this model's head_dim is {d}; use --scheme W4A4 or W4A16"
        )
