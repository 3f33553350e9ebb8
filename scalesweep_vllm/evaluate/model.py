"""A checkpoint (on disk or in memory) as a transformers model that computes what the
vLLM plugin serves: the one quantized forward of the evaluation and of the plugin
tests' reference.

* Weights: each NVFP4 Linear decoded once with :func:`scalesweep_vllm.kernels.dequantize`
  to the model dtype, per Linear with its own weight global scale (as the plugin's
  dequant backend and stock compressed-tensors do).
* Linear inputs: a forward pre-hook fake-quantizes with the fused group's largest
  ``input_global_scale`` (vLLM keeps the max) and the runtime method; fused partners
  (q/k/v, gate/up) share one :class:`~scalesweep_vllm.runtime.Part` and reuse one result.
* Q/K/V: an attention function registered with transformers' ``AttentionInterface``
  quantizes post-rotary Q, K and V per head (before GQA repetition), then calls SDPA;
  the calibration pass records the same tensors through the same interface
  (:mod:`scalesweep_vllm.quantize.calibration`).

Runtime methods (:func:`runtime_settings`): scalesweep.json's, or, for a checkpoint
without it (another tool's compressed-tensors NVFP4), what stock vLLM runs: AbsMax
activations with the stored ``input_global_scale``, no KV/query quantization. A
*setting* (W4A16 ... W4A4KV4Q4) switches parts off; ``runtime_method`` replaces the
method of every part left on (e.g. "ScaleSweep WMSE weights, AbsMax runtime").
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import kernels
from ..quantize.layers import plan_model
from ..quantize.scheme import get_scheme
from ..rope_bias import HFRope, quantize_around
from ..runtime import RUNTIME_METHODS, Part, fused_input_weight
from . import modelopt

__all__ = [
    "Checkpoint",
    "RuntimeSettings",
    "build_model",
    "install_runtime",
    "runtime_settings",
]

METADATA_FILE = "scalesweep.json"
_ATTN_NAME = "scalesweep_runtime"


@dataclass
class Checkpoint:
    """What a compressed-tensors NVFP4 checkpoint holds, from a folder or from memory."""

    config: object  # transformers PretrainedConfig, with quantization_config
    tensors: dict[str, torch.Tensor]
    meta: dict | None = None  # scalesweep.json, None for another tool's checkpoint
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)
    name: str = "in-memory"

    @classmethod
    def from_dir(cls, folder: str | os.PathLike) -> Checkpoint:
        from safetensors.torch import load_file
        from transformers import AutoConfig

        folder = Path(folder)
        config = AutoConfig.from_pretrained(folder)
        qc = getattr(config, "quantization_config", None)
        if modelopt.is_modelopt(folder, qc):  # NVIDIA ModelOpt's export, as vLLM reads it
            return cls(**modelopt.read_checkpoint(folder, config))
        if qc is None:
            raise ValueError(f"{folder}: config.json has no quantization_config (not NVFP4)")
        meta = None
        if (folder / METADATA_FILE).is_file():
            meta = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
        vfile = (meta or {}).get("vectors_file")
        vectors = {}
        if vfile:
            vectors = {k: v.float() for k, v in load_file(str(folder / vfile)).items()}
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(f.name for f in folder.glob("*.safetensors") if f.name != vfile)
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            tensors.update(load_file(str(folder / f)))
        return cls(config, tensors, meta, vectors, str(folder))

    @classmethod
    def from_contents(cls, contents: dict, name: str = "in-memory") -> Checkpoint:
        """From ``quantize_model(..., in_memory=True)["checkpoint"]``."""
        return cls(
            contents["config"], contents["tensors"], contents["meta"], contents["vectors"], name
        )

    def quantized_linears(self) -> list[str]:
        return sorted(k[: -len(".weight_packed")] for k in self.tensors if k.endswith("_packed"))

    def has_input_scales(self) -> bool:
        return any(k.endswith(".input_global_scale") for k in self.tensors)


@dataclass(frozen=True)
class RuntimeSettings:
    """Runtime method of each part, None when off (as the plugin's settings)."""

    activations: str | None
    kv_cache: str | None
    query: str | None

    def label(self) -> str:
        parts = ["W4"]
        parts.append("A4" if self.activations else "A16")
        if self.kv_cache:
            parts.append("KV4")
        if self.query:
            parts.append("Q4")
        return "".join(parts)


def runtime_settings(
    ckpt: Checkpoint, setting: str | None = None, runtime_method: str | None = None
) -> RuntimeSettings:
    """The checkpoint's runtime parts, limited to ``setting`` (W4A16 | W4A4 | W4A4KV4 |
    W4A4KV4Q4; ValueError if the checkpoint lacks a part it needs), each part's
    method replaced by ``runtime_method`` when given."""
    meta = ckpt.meta
    act = None
    if ckpt.has_input_scales():
        act = "absmax"  # stock vLLM: AbsMax with the stored input_global_scale
        if meta is not None and (meta.get("activations") or {}).get("enabled"):
            act = meta["activations"]["method"]
    parts = {"activations": act, "kv_cache": None, "query": None}
    for part in ("kv_cache", "query"):
        p = (meta or {}).get(part) or {}
        if p.get("enabled"):
            parts[part] = p["method"]
    if setting is not None:
        sch = get_scheme(setting)
        want = {"activations": sch.activations, "kv_cache": sch.kv_cache, "query": sch.query}
        for part, on in want.items():
            if on and parts[part] is None:
                raise ValueError(
                    f"{ckpt.name}: setting {sch.name} needs {part} quantization, which this "
                    "checkpoint does not provide"
                )
            if not on:
                parts[part] = None
    if runtime_method is not None:
        if runtime_method not in RUNTIME_METHODS:
            raise ValueError(f"runtime method {runtime_method!r}: choose one of {RUNTIME_METHODS}")
        parts = {k: (runtime_method if v else None) for k, v in parts.items()}
    return RuntimeSettings(**parts)


def build_model(
    ckpt: Checkpoint,
    settings: RuntimeSettings | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A transformers model with the checkpoint's weights decoded to ``dtype`` and its
    runtime quantization installed (:func:`install_runtime`)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(ckpt.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    # Decoded one tensor at a time straight into the model's parameters: a decoded
    # state dict beside the model would double the peak memory (a 1.5B model in float32:
    # 12 GB more).
    params = dict(model.named_parameters(remove_duplicate=False))
    targets = {**dict(model.named_buffers()), **params}
    sd = ckpt.tensors
    input_gs, loaded, unexpected = {}, set(), []
    for name, t in sd.items():
        if name.endswith(".weight_packed"):
            p = name[: -len(".weight_packed")]
            key = p + ".weight"
            value = kernels.dequantize(
                t, sd[p + ".weight_scale"], sd[p + ".weight_global_scale"].float(), dtype
            )
            if p + ".input_global_scale" in sd:
                input_gs[p] = sd[p + ".input_global_scale"].float().reshape(-1)[0]
        elif not name.endswith(("_scale", "_global_scale", "_zero_point")):
            key, value = name, (t.to(dtype) if t.is_floating_point() else t)
        else:
            continue
        if key not in targets or targets[key].shape != value.shape:
            unexpected.append(key)
            continue
        with torch.no_grad():
            targets[key].copy_(value)
        loaded.add(key)
        del value
    missing = [n for n in params if n not in loaded]
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ValueError(
            f"{ckpt.name}: checkpoint does not match its config: missing "
            f"{sorted(set(missing) - tied)[:4]}, unexpected {unexpected[:4]}"
        )
    if tied:
        model.tie_weights()
    model.to(device)
    if settings is None:
        settings = runtime_settings(ckpt)
    install_runtime(model, ckpt, settings, input_gs)
    return model


def _linear_parts(model, ckpt, method, input_gs) -> dict[str, Part]:
    """One shared Part per fused group of quantized Linears."""
    plan = plan_model(model)
    groups: dict[str, list[str]] = {}
    for t in plan.all_targets():
        if t.name in input_gs:
            groups.setdefault(t.group, []).append(t.name)
    out = {}
    for names in groups.values():
        g = max(float(input_gs[n]) for n in names)  # vLLM keeps the largest
        w = fused_input_weight(ckpt.vectors, names) if method == "wmse" else None
        part = Part(method, g, w)
        for n in names:
            out[n] = part
    return out


def _attention_parts(ckpt, settings) -> dict[str, dict[str, Part]]:
    out: dict[str, dict[str, Part]] = {}
    entries = (ckpt.meta or {}).get("attention") or {}
    for prefix, e in entries.items():
        parts = {}
        for c, method in (
            ("q", settings.query),
            ("k", settings.kv_cache),
            ("v", settings.kv_cache),
        ):
            if method is None:
                continue
            w = ckpt.vectors.get(f"{prefix}.{c}_weight") if method == "wmse" else None
            if method == "wmse" and w is None:
                raise ValueError(f"{ckpt.name}: method 'wmse' needs {prefix}.{c}_weight")
            parts[c] = Part(method, float(e[f"{c}_global_scale"]), w)
        if parts:
            out[prefix] = parts
    return out


def _rope_biases(ckpt, attn: dict[str, dict[str, Part]]) -> dict[str, dict[str, torch.Tensor]]:
    """Per attention prefix, the q/k biases (``[H, D]`` float32, from the vectors file,
    as the plugin reads them) of the components quantized around their rotary bias."""
    entries = (ckpt.meta or {}).get("attention") or {}
    out = {}
    for prefix, parts in attn.items():
        comps = [c for c in entries.get(prefix, {}).get("rope_bias") or () if c in parts]
        if comps:
            missing = [
                f"{prefix}.{c}_bias" for c in comps if f"{prefix}.{c}_bias" not in ckpt.vectors
            ]
            if missing:
                raise ValueError(f"{ckpt.name}: rope_bias needs {missing} in the vectors file")
            out[prefix] = {c: ckpt.vectors[f"{prefix}.{c}_bias"].float() for c in comps}
    return out


def install_runtime(
    model: nn.Module,
    ckpt: Checkpoint,
    settings: RuntimeSettings,
    input_gs: dict[str, torch.Tensor],
) -> None:
    """Hooks that fake-quantize Linear inputs and post-rotary Q/K/V as ``settings`` say."""
    device = next(model.parameters()).device
    if settings.activations is not None:
        parts = _linear_parts(model, ckpt, settings.activations, input_gs)
        # The last quantized input, one slot for the whole model: fused partners run one
        # after the other on the same tensor (q, k, v; gate, up) and reuse it. One slot,
        # not one per group: a slot per group kept every layer's input and output alive
        # (12 GB for a 1.5B model at 4k tokens per forward). A partner that does not
        # follow at once just quantizes the same input again (same result).
        last: list[tuple[int, torch.Tensor, torch.Tensor] | None] = [None]
        for name, part in parts.items():
            part.to(device)

            def hook(_m, args, part=part):
                x = args[0]
                prev = last[0]
                if prev is not None and prev[0] == id(part) and prev[1] is x:
                    return (prev[2],)
                y = part(x)
                last[0] = (id(part), x, y)
                return (y,)

            model.get_submodule(name).register_forward_pre_hook(hook)
        model._scalesweep_linear_parts = parts
    attn = _attention_parts(ckpt, settings)
    if settings.kv_cache is not None or settings.query is not None:
        if not attn:
            raise ValueError(f"{ckpt.name}: K/V/Q quantization needs scalesweep.json 'attention'")
        biases = _rope_biases(ckpt, attn)
        rope = HFRope(model) if biases else None
        by_module = {}
        for prefix, parts in attn.items():
            for p in parts.values():
                p.to(device)
            b = {c: t.to(device) for c, t in biases.get(prefix, {}).items()}
            by_module[id(model.get_submodule(prefix))] = (parts, b)
        model._scalesweep_attention_parts = attn
        _use_attention(model, by_module, rope)


def _per_head(part: Part, x: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize ``[B, H, T, D]`` as vLLM lays it out (``[..., H, D]``), so the per-head
    vector [H, D] broadcasts over trailing dims; around ``offset`` ``[B, T, H, D]``
    (:func:`scalesweep_vllm.rope_bias.quantize_around`) when given."""
    return quantize_around(part, x.transpose(1, 2).contiguous(), offset).transpose(1, 2)


def _use_attention(model: nn.Module, by_module: dict[int, tuple], rope: HFRope | None) -> None:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    base = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if base == _ATTN_NAME or base not in ALL_ATTENTION_FUNCTIONS:
        base = "sdpa"
    inner = ALL_ATTENTION_FUNCTIONS[base]

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        parts, biases = by_module.get(id(module), ({}, {}))
        offs = {}
        if biases:
            offs = rope.offsets(biases, kwargs.get("position_ids"), query.shape[-1])
        if "q" in parts:
            query = _per_head(parts["q"], query, offs.get("q"))
        if "k" in parts:
            key = _per_head(parts["k"], key, offs.get("k"))
            value = _per_head(parts["v"], value)
        return inner(module, query, key, value, attention_mask, *args, **kwargs)

    AttentionInterface.register(f"{_ATTN_NAME}_{id(model)}", attention)
    model.set_attn_implementation(f"{_ATTN_NAME}_{id(model)}")
