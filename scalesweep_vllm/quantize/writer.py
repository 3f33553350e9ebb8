"""The checkpoint writer: compressed-tensors NVFP4 (nvfp4-pack-quantized) plus our
metadata, laid out as docs/CHECKPOINT.md specifies.

Everything is written into a temporary directory beside the target and renamed
into place at the end (:func:`staging_dir`): a crash or Ctrl-C leaves neither a
half checkpoint nor the temporary directory. Tensors are saved with safetensors
only. ``quantization_config`` is built with compressed-tensors' own config models
(which reject unknown keys), so stock transformers and vLLM parse it; our own
metadata goes to ``scalesweep.json`` and ``scalesweep_vectors.safetensors``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .. import __version__, rope_bias
from ..nvfp4 import BLOCK_SIZE
from ..sweep import BOUNDS_VERSION
from . import preflight
from .recipe import Recipe
from .scheme import Scheme
from .weights import QuantizedLinear

__all__ = [
    "FORMAT_VERSION",
    "SIDE_FILES",
    "build_quantization_config",
    "checkpoint_contents",
    "check_output",
    "literal_quantization_config",
    "metadata",
    "staging_dir",
    "write_checkpoint",
]

FORMAT_VERSION = 1
#: Written instead when an attention entry quantizes Q/K around its rotary bias
#: (``rope_bias``): a reader of version 1 would serve such a file wrongly, so it
#: must refuse it.
FORMAT_VERSION_ROPE_BIAS = 2
METADATA_FILE = "scalesweep.json"
VECTORS_FILE = "scalesweep_vectors.safetensors"
#: Files copied from the source model folder when present.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
#: Shard size limit of model-XXXXX-of-YYYYY.safetensors.
MAX_SHARD_BYTES = 4 << 30


def check_output(output: str | Path, overwrite: bool) -> Path:
    """The resolved output folder; refuses an existing one unless ``overwrite``, and
    even then one that is neither empty nor ours (:func:`preflight.check_output`)."""
    return preflight.check_output(output, overwrite)


@contextlib.contextmanager
def staging_dir(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory beside ``output``, renamed to ``output`` when the block
    succeeds and removed when it raises (KeyboardInterrupt included)."""
    out = check_output(output, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        yield tmp
        _readable(tmp)
        old = None
        if out.exists():
            check_output(out, overwrite)
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "x")
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _readable(directory: Path) -> None:
    """Files as the umask allows (safetensors writes 0600, which breaks serving the
    checkpoint as another user, e.g. from a container)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in directory.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def build_quantization_config(scheme: Scheme, ignore: list[str]) -> dict:
    """``quantization_config`` for config.json, through compressed-tensors' models.

    One group targeting ``Linear``: NVFP4 weights (float, 4 bits, tensor_group,
    group size 16, symmetric, static, fp8 scales) and, for W4A4 schemes, inputs the
    same with ``dynamic: local`` (per-token-block scales computed at run time with
    the stored ``input_global_scale``). No ``kv_cache_scheme``: vLLM 0.32 rejects a
    4-bit one; our KV/query settings live in scalesweep.json.
    """
    try:
        from compressed_tensors.quantization import (
            QuantizationArgs,
            QuantizationConfig,
            QuantizationScheme,
        )
    except ImportError:  # e.g. the lent GPU machines; a test keeps the two equal
        return literal_quantization_config(scheme, ignore)

    common = dict(
        num_bits=4,
        type="float",
        symmetric=True,
        group_size=BLOCK_SIZE,
        strategy="tensor_group",
        scale_dtype=torch.float8_e4m3fn,
    )
    weights = QuantizationArgs(dynamic=False, **common)
    inputs = QuantizationArgs(dynamic="local", **common) if scheme.activations else None
    group = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)
    cfg = QuantizationConfig(
        config_groups={"group_0": group},
        format="nvfp4-pack-quantized",
        quantization_status="compressed",
        ignore=list(ignore),
    )
    return cfg.to_dict()


def literal_quantization_config(scheme: Scheme, ignore: list[str]) -> dict:
    """What :func:`build_quantization_config` returns with compressed-tensors 0.17/0.18,
    written out for machines without compressed-tensors (tests assert equality)."""

    def args(dynamic, observer):
        return {
            "actorder": None,
            "block_structure": None,
            "dynamic": dynamic,
            "group_size": BLOCK_SIZE,
            "num_bits": 4,
            "observer": observer,
            "observer_kwargs": {},
            "scale_dtype": "torch.float8_e4m3fn",
            "strategy": "tensor_group",
            "symmetric": True,
            "type": "float",
            "zp_dtype": None,
        }

    group = {
        "format": None,
        "input_activations": args("local", "minmax") if scheme.activations else None,
        "output_activations": None,
        "targets": ["Linear"],
        "weights": args(False, "memoryless_minmax"),
    }
    return {
        "config_groups": {"group_0": group},
        "format": "nvfp4-pack-quantized",
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def _state_dict(model: nn.Module, quantized: dict[str, QuantizedLinear], activations: bool):
    """Every tensor of the checkpoint: bf16 for what is left alone, NVFP4 for the rest."""
    skip = set()
    for name in quantized:
        skip.update((f"{name}.weight", f"{name}.bias"))
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if tied and head is not None and emb is not None and head.weight is emb.weight:
        # tied: transformers and vLLM re-tie lm_head to the embeddings on load
        skip.update(f"{n}.weight" for n, m in model.named_modules() if m is head)
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        if name in skip:
            continue
        t = t.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(torch.bfloat16)
        key = (t.data_ptr(), t.numel(), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            t = t.clone()  # safetensors refuses shared storage
        elif key is not None:
            seen[key] = name
        tensors[name] = t.contiguous()
    for name, q in quantized.items():
        tensors[f"{name}.weight_packed"] = q.weight_packed.contiguous()
        tensors[f"{name}.weight_scale"] = q.weight_scale.contiguous()
        tensors[f"{name}.weight_global_scale"] = q.weight_global_scale.contiguous()
        if activations:
            tensors[f"{name}.input_global_scale"] = q.input_global_scale.contiguous()
        if q.bias is not None:
            tensors[f"{name}.bias"] = q.bias.contiguous()
    return tensors


def _save_sharded(tensors: dict[str, torch.Tensor], out: Path) -> list[str]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        n = len(shards)
        fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        files.append(fname)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    # Written even for one shard: with an index vLLM loads only the files it lists,
    # so it never takes scalesweep_vectors.safetensors for model weights.
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def metadata(
    recipe: Recipe,
    attention: dict[str, dict],
    ignore: list[str],
    calibration: dict,
    gptq: dict | None,
    source_name: str,
    files: list[str],
) -> dict:
    """The content of scalesweep.json (docs/CHECKPOINT.md); ``"recipe"`` is the whole
    :class:`~.recipe.Recipe` (:meth:`~.recipe.Recipe.from_json` reads it back)."""
    scheme, objective = recipe.scheme_spec, recipe.objective
    method = recipe.runtime_method
    return {
        "format_version": FORMAT_VERSION_ROPE_BIAS
        if rope_bias.recorded(attention)
        else FORMAT_VERSION,
        "scheme": scheme.name,
        "objective": objective,
        "bounds_version": BOUNDS_VERSION,
        "global_scale_convention": recipe.global_scale_convention,
        "runtime_global_scale_convention": recipe.runtime_convention,
        "group_size": BLOCK_SIZE,
        "activations": {"enabled": scheme.activations, "method": method},
        "kv_cache": {"enabled": scheme.kv_cache, "method": method},
        "query": {"enabled": scheme.query, "method": method},
        "vectors_file": VECTORS_FILE,
        "attention": attention,
        "ignore": list(ignore),
        "calibration": calibration,
        "gptq": gptq or {"enabled": False},
        "recipe": recipe.to_json(),
        "weight_files": files,
        "source_model": source_name,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "scalesweep_vllm_version": __version__,
    }


def checkpoint_contents(
    model: nn.Module,
    quantized: dict[str, QuantizedLinear],
    ignore: list[str],
    recipe: Recipe,
    attention: dict[str, dict],
    vectors: dict[str, torch.Tensor],
    source_name: str,
    calibration: dict,
    gptq: dict | None = None,
) -> dict:
    """The checkpoint in memory: ``tensors`` (the safetensors content), ``config`` (the
    config object of config.json), ``meta`` (scalesweep.json, ``weight_files`` filled
    in by :func:`write_checkpoint`) and ``vectors`` (fp32, CPU). The evaluation's
    in-memory recipes use it as it is; :func:`write_checkpoint` writes it."""
    cfg = copy.deepcopy(model.config)
    scheme = recipe.scheme_spec
    cfg.quantization_config = build_quantization_config(scheme, ignore)
    cfg.dtype = torch.bfloat16  # float32 here broke transformers' compressed forward
    if not getattr(cfg, "architectures", None):
        cfg.architectures = [type(model).__name__]
    return {
        "tensors": _state_dict(model, quantized, scheme.activations),
        "config": cfg,
        "meta": metadata(recipe, attention, ignore, calibration, gptq, source_name, []),
        "vectors": {k: v.detach().to("cpu", torch.float32) for k, v in vectors.items()},
    }


def write_checkpoint(
    out: Path, contents: dict, source_dir: Path | None, generation_config=None
) -> dict:
    """Write :func:`checkpoint_contents` into ``out`` (a staging directory), with the
    source folder's tokenizer and side files. Returns the scalesweep.json content."""
    files = _save_sharded(contents["tensors"], out)
    cfg = contents["config"]
    cfg.save_pretrained(out)
    save_file(
        {k: v.contiguous() for k, v in contents["vectors"].items()},
        str(out / VECTORS_FILE),
        metadata={"format": "pt"},
    )
    meta = {**contents["meta"], "weight_files": files}
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    copied = set()
    if source_dir is not None and source_dir.is_dir():
        for fname in SIDE_FILES:
            if (source_dir / fname).is_file():
                shutil.copy2(source_dir / fname, out / fname)
                copied.add(fname)
        if getattr(cfg, "auto_map", None):  # remote-code model: its modeling files too
            for py in source_dir.glob("*.py"):
                shutil.copy2(py, out / py.name)
    if "generation_config.json" not in copied and generation_config is not None:
        with contextlib.suppress(Exception):
            generation_config.save_pretrained(out)
    return meta
