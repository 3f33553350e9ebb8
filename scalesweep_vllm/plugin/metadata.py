"""The checkpoint's configuration as the plugin needs it, parsed and checked once.

Two sources (docs/CHECKPOINT.md): ``quantization_config`` in config.json (pure
compressed-tensors: which Linear layers are NVFP4, whether their inputs are too)
and ``scalesweep.json`` beside it (runtime methods, KV/query settings, global
scales of Q/K/V) with its vectors file (WMSE weights). No vLLM import here, so
this parses and fails the same way with or without an engine.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..kernels import METHODS
from ..rope_bias import SERVED_ARCHITECTURES

__all__ = [
    "ENV_METHOD_OVERRIDES",
    "METADATA_FILE",
    "AttentionEntry",
    "CompressedTensorsInfo",
    "RuntimeSettings",
    "ScaleSweepMetadata",
    "matches_ignore",
    "resolve_settings",
]

METADATA_FILE = "scalesweep.json"
VECTORS_FILE = "scalesweep_vectors.safetensors"
GROUP_SIZE = 16
#: 2 = 1 plus ``attention.*.rope_bias`` (Q/K quantized around their rotary bias).
SUPPORTED_FORMAT_VERSIONS = (1, 2)
#: Environment variables that override the runtime method of each part at serve
#: time: one of METHODS, or "off" to disable that part.
ENV_METHOD_OVERRIDES = {
    "activations": "SCALESWEEP_ACTIVATIONS",
    "kv_cache": "SCALESWEEP_KV_CACHE",
    "query": "SCALESWEEP_QUERY",
}


class CheckpointError(ValueError):
    """A checkpoint the plugin cannot serve; the message names the file and field."""


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise CheckpointError(msg)


@dataclass(frozen=True)
class CompressedTensorsInfo:
    """What ``quantization_config`` says (compressed-tensors' schema, NVFP4 only)."""

    activations: bool  # W4A4: Linear inputs quantized (input_activations present)
    ignore: tuple[str, ...]
    kv_cache_scheme: dict[str, Any] | None  # kept only to refuse it; see below

    @classmethod
    def parse(cls, cfg: dict[str, Any]) -> CompressedTensorsInfo:
        where = "config.json quantization_config"
        _need(
            cfg.get("quant_method") in ("compressed-tensors", "scalesweep"),
            f"{where}.quant_method is {cfg.get('quant_method')!r}; scalesweep serves "
            "compressed-tensors NVFP4 checkpoints (scalesweep_vllm.quantize)",
        )
        fmt = cfg.get("format")
        _need(
            fmt in ("nvfp4-pack-quantized", None),
            f"{where}.format is {fmt!r}; only 'nvfp4-pack-quantized' is supported",
        )
        groups = cfg.get("config_groups") or {}
        _need(bool(groups), f"{where}.config_groups is empty")
        acts = set()
        for gname, group in groups.items():
            g = f"{where}.config_groups.{gname}"
            targets = group.get("targets") or []
            _need(
                list(targets) == ["Linear"],
                f"{g}.targets is {targets}; scalesweep quantizes Linear layers only "
                "(unsupported layer type)",
            )
            w = group.get("weights") or {}
            _need(bool(w), f"{g}.weights is missing: weight quantization is required")
            _check_nvfp4_args(w, f"{g}.weights")
            a = group.get("input_activations")
            if a:
                _check_nvfp4_args(a, f"{g}.input_activations")
            acts.add(bool(a))
        _need(len(acts) == 1, f"{where}: all config groups must agree on input_activations")
        return cls(
            activations=acts.pop(),
            ignore=tuple(cfg.get("ignore") or ()),
            kv_cache_scheme=cfg.get("kv_cache_scheme"),
        )


def _check_nvfp4_args(args: dict[str, Any], where: str) -> None:
    _need(
        args.get("num_bits") == 4 and args.get("type") == "float",
        f"{where}: num_bits={args.get('num_bits')}, type={args.get('type')!r}; "
        "only NVFP4 (num_bits 4, type float) is supported",
    )
    _need(
        args.get("strategy") == "tensor_group",
        f"{where}.strategy is {args.get('strategy')!r}; NVFP4 needs 'tensor_group'",
    )
    _need(
        args.get("group_size") == GROUP_SIZE,
        f"{where}.group_size is {args.get('group_size')}; NVFP4 blocks are {GROUP_SIZE}",
    )


def matches_ignore(name: str, ignore: tuple[str, ...]) -> bool:
    """compressed-tensors' ignore entries: exact module names or ``re:`` patterns."""
    for pat in ignore:
        if pat.startswith("re:"):
            if re.match(pat[3:], name):
                return True
        elif name == pat or name.endswith("." + pat):
            return True
    return False


@dataclass(frozen=True)
class AttentionEntry:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_global_scale: float
    k_global_scale: float
    v_global_scale: float
    #: components quantized around their rotary bias (scalesweep_vllm/rope_bias.py)
    rope_bias: tuple[str, ...] = ()


@dataclass
class ScaleSweepMetadata:
    """``scalesweep.json`` plus its vectors (fp32 CPU tensors, keyed as in the file)."""

    scheme: str
    group_size: int
    activations: dict[str, Any]
    kv_cache: dict[str, Any]
    query: dict[str, Any]
    attention: dict[str, AttentionEntry]
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)
    path: str = METADATA_FILE

    def check_model(self, hf_config: Any) -> None:
        """Each attention entry's head counts and head_dim, and its Q/K/V vectors'
        shapes, against the model's config.json: a mismatch fails here, at config
        time, naming the file and field, not after the weights have loaded."""
        if hf_config is None or not self.attention:
            return
        cfg = getattr(hf_config, "get_text_config", lambda: hf_config)()
        heads = getattr(cfg, "num_attention_heads", None)
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        dim = getattr(cfg, "head_dim", None)
        if not dim and heads:
            dim = getattr(cfg, "hidden_size", 0) // heads
        layers = getattr(cfg, "num_hidden_layers", None)
        _need(
            layers is None or len(self.attention) <= layers,
            f"{self.path}: 'attention' has {len(self.attention)} entries but config.json has "
            f"num_hidden_layers {layers}",
        )
        expect = {"num_heads": heads, "num_kv_heads": kv, "head_dim": dim}
        src = {"num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads"}
        for prefix, e in self.attention.items():
            for fld, want in expect.items():
                got = getattr(e, fld)
                _need(
                    not want or got == want,
                    f"{self.path}: attention.{prefix}.{fld} is {got} but config.json has "
                    f"{src.get(fld, 'head_dim')} {want}; this metadata belongs to another model",
                )
            if e.rope_bias:
                arch = (getattr(hf_config, "architectures", None) or ["?"])[0]
                _need(
                    arch in SERVED_ARCHITECTURES,
                    f"{self.path}: attention.{prefix} quantizes {'/'.join(e.rope_bias)} around "
                    f"the rotary bias, which the plugin serves only for "
                    f"{', '.join(SERVED_ARCHITECTURES)}, not {arch}",
                )
            for c in e.rope_bias:
                n = e.num_heads if c == "q" else e.num_kv_heads
                vec = self.vectors.get(f"{prefix}.{c}_bias")
                _need(
                    vec is not None and tuple(vec.shape) == (n, e.head_dim),
                    f"{self.path}: rope_bias needs vector {prefix}.{c}_bias of shape "
                    f"{(n, e.head_dim)}, found {None if vec is None else tuple(vec.shape)}",
                )
            for c, n in (("q", e.num_heads), ("k", e.num_kv_heads), ("v", e.num_kv_heads)):
                vec = self.vectors.get(f"{prefix}.{c}_weight")
                _need(
                    vec is None or tuple(vec.shape) == (n, e.head_dim),
                    f"{self.path}: vector {prefix}.{c}_weight has shape "
                    f"{tuple(vec.shape) if vec is not None else None}, expected "
                    f"{(n, e.head_dim)} from attention.{prefix}",
                )

    @classmethod
    def load(cls, folder: str | os.PathLike) -> ScaleSweepMetadata:
        path = Path(folder) / METADATA_FILE
        where = str(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(
                f"{where} is not valid JSON ({exc}); it is scalesweep's metadata, written by "
                "scalesweep-quantize: re-export the checkpoint or restore the file"
            ) from exc
        _need(isinstance(raw, dict), f"{where}: expected a JSON object, got {type(raw).__name__}")
        version = raw.get("format_version")
        _need(
            version in SUPPORTED_FORMAT_VERSIONS,
            f"{where}: format_version {version!r} is not one of {SUPPORTED_FORMAT_VERSIONS}",
        )
        gs = raw.get("group_size", GROUP_SIZE)
        _need(gs == GROUP_SIZE, f"{where}: group_size is {gs}; NVFP4 blocks are {GROUP_SIZE}")
        parts = {}
        for part in ("activations", "kv_cache", "query"):
            p = raw.get(part) or {"enabled": False}
            _need(isinstance(p, dict), f"{where}: {part} must be an object")
            if p.get("enabled"):
                _need(
                    p.get("method") in METHODS,
                    f"{where}: {part}.method is {p.get('method')!r}; choose one of {METHODS}",
                )
            parts[part] = {"enabled": bool(p.get("enabled")), "method": p.get("method")}
        attention = {}
        for prefix, e in (raw.get("attention") or {}).items():
            try:
                attention[prefix] = AttentionEntry(
                    num_heads=int(e["num_heads"]),
                    num_kv_heads=int(e["num_kv_heads"]),
                    head_dim=int(e["head_dim"]),
                    q_global_scale=float(e.get("q_global_scale", 0.0)),
                    k_global_scale=float(e.get("k_global_scale", 0.0)),
                    v_global_scale=float(e.get("v_global_scale", 0.0)),
                    rope_bias=tuple(str(c) for c in e.get("rope_bias") or ()),
                )
                _need(
                    set(attention[prefix].rope_bias) <= {"q", "k"},
                    f"{where}: attention.{prefix}.rope_bias must list only 'q' and 'k'",
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{where}: attention.{prefix} is malformed: {exc}") from exc
        _need(
            version >= 2 or not any(e.rope_bias for e in attention.values()),
            f"{where}: rope_bias needs format_version 2, the file says {version}",
        )
        vectors: dict[str, torch.Tensor] = {}
        vfile = raw.get("vectors_file")
        if vfile:
            vpath = Path(folder) / vfile
            _need(vpath.is_file(), f"{where}: vectors_file {vfile!r} not found beside it")
            from safetensors.torch import load_file

            vectors = {k: v.to(torch.float32) for k, v in load_file(str(vpath)).items()}
        meta = cls(
            scheme=str(raw.get("scheme", "")),
            group_size=gs,
            activations=parts["activations"],
            kv_cache=parts["kv_cache"],
            query=parts["query"],
            attention=attention,
            vectors=vectors,
            path=where,
        )
        for part in ("kv_cache", "query"):
            if parts[part]["enabled"]:
                _need(bool(attention), f"{where}: {part} is enabled but 'attention' is empty")
                letters = "kv" if part == "kv_cache" else "q"
                for prefix, e in attention.items():
                    for c in letters:
                        gsc = getattr(e, f"{c}_global_scale")
                        _need(
                            gsc > 0 and gsc == gsc and gsc != float("inf"),
                            f"{where}: attention.{prefix}.{c}_global_scale is {gsc}; "
                            "it must be a finite positive calibrated value",
                        )
        return meta


@dataclass(frozen=True)
class RuntimeSettings:
    """The runtime method of each part, None when that part is off."""

    activations: str | None
    kv_cache: str | None
    query: str | None


def _env_method(part: str) -> str | None:
    """The user's override for ``part`` ("" when unset); validated."""
    val = os.environ.get(ENV_METHOD_OVERRIDES[part], "").strip().lower()
    if val and val != "off" and val not in METHODS:
        raise CheckpointError(
            f"{ENV_METHOD_OVERRIDES[part]}={val!r}; choose one of {METHODS} or 'off'"
        )
    return val


def resolve_settings(
    ct: CompressedTensorsInfo, meta: ScaleSweepMetadata | None, folder: str
) -> RuntimeSettings:
    """Combine the checkpoint with the user's overrides; errors at load, never mid-request."""
    env = {p: _env_method(p) for p in ENV_METHOD_OVERRIDES}
    if ct.kv_cache_scheme is not None:
        raise CheckpointError(
            f"{folder}: quantization_config.kv_cache_scheme is set; scalesweep reads its "
            f"KV-cache settings from {METADATA_FILE} (a kv_cache_scheme would force vLLM's "
            "fp8 KV cache)"
        )
    # Activations: decided by the compressed-tensors config (W4A4 vs W4A16).
    act = None
    if ct.activations:
        act = "mse"  # without our metadata: ScaleSweep MSE needs no vectors
        if meta is not None and meta.activations["enabled"]:
            act = meta.activations["method"]
        if env["activations"]:
            act = None if env["activations"] == "off" else env["activations"]
    elif env["activations"] not in ("", "off"):
        raise CheckpointError(
            f"{ENV_METHOD_OVERRIDES['activations']} asks for activation quantization but "
            f"{folder} is weight-only (no input_activations / input_global_scale)"
        )
    out = {"activations": act}
    for part in ("kv_cache", "query"):
        asked = env[part] not in ("", "off")
        if meta is None:
            if asked:
                raise CheckpointError(
                    f"{ENV_METHOD_OVERRIDES[part]} asks for {part} quantization but {folder} "
                    f"has no {METADATA_FILE} (it holds the calibrated global scales)"
                )
            out[part] = None
            continue
        method = meta.__dict__[part]["method"] if meta.__dict__[part]["enabled"] else None
        if asked:
            letters = "kv" if part == "kv_cache" else "q"
            scales = [
                getattr(e, f"{c}_global_scale") for e in meta.attention.values() for c in letters
            ]
            if not scales or not all(0 < s < float("inf") for s in scales):
                raise CheckpointError(
                    f"{ENV_METHOD_OVERRIDES[part]} asks for {part} quantization but "
                    f"{folder}/{METADATA_FILE} has no calibrated {letters.upper()} global scales"
                )
            method = env[part]
        elif env[part] == "off":
            method = None
        out[part] = method
    for part in ("kv_cache", "query"):
        if out[part] is None or meta is None:
            continue
        for prefix, e in meta.attention.items():
            if e.head_dim % GROUP_SIZE:
                raise CheckpointError(
                    f"{folder}/{METADATA_FILE}: {part} quantization is on but "
                    f"attention.{prefix}.head_dim {e.head_dim} is not a multiple of "
                    f"{GROUP_SIZE} (NVFP4 blocks run along head_dim); serve with "
                    f"{ENV_METHOD_OVERRIDES[part]}=off"
                )
    for part, method in out.items():
        if method == "wmse" and meta is None:
            raise CheckpointError(f"{part} method 'wmse' needs {METADATA_FILE} and its vectors")
    return RuntimeSettings(**out)
