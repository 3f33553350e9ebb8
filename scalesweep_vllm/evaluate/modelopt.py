"""NVIDIA Model Optimizer's NVFP4 export (``hf_quant_config.json`` and/or a config.json
``quantization_config`` with ``quant_method: modelopt``) read as stock vLLM serves it
(``vllm/model_executor/layers/quantization/modelopt.py``: ``ModelOptNvFp4Config``,
``KNvfp4Static``, ``KNvfp4Dynamic``; emulation in ``nvfp4_emulation_utils``), converted
to the compressed-tensors names :class:`~.model.Checkpoint` holds.

Per quantized Linear ``p`` (one with ``p.weight_scale_2``), fused partners (q/k/v,
gate/up: ``FUSED_PARTNERS``, vLLM's packed modules) forming one group:

* ``p.weight`` (uint8 [out, in/2]) -> ``p.weight_packed`` unchanged: vLLM unpacks
  the even element from the low nibble, bit 3 the sign, bits 0-2 indexing
  (0, .5, 1, 1.5, 2, 3, 4, 6) (``break_fp4_bytes``), as compressed-tensors and
  :mod:`scalesweep_vllm.nvfp4` do. ``p.weight_scale`` (fp8 [out, in/16]) unchanged.
* ``weight_scale_2`` is a decode factor (amax / 2688); vLLM keeps the group's max ``m``
  and decodes ``q * (fp8 * m)``. We decode ``(fp8 / G) * q``, so every member gets
  ``p.weight_global_scale = fp32(1 / m)``. Not bit-identical: ``fp8 / fl(1/m)`` can
  differ from ``fp8 * m`` by an fp32 rounding (exact when m is a power of two); after
  the cast to bf16 about 0.2% of a SmolLM2 export's weights end one ulp from vLLM's.
  (For most m no fp32 G gives ``fp8 / G == fp8 * m`` for all 126 E4M3 values.)
* ``input_scale`` (amax / 2688): vLLM quantizes the group's input with the encode
  factor ``input_global_scale_inv = fp32(1 / max input_scale)``; every member gets
  exactly that value as ``p.input_global_scale``, so build_model's largest-of-group
  rule picks it (bit-identical). A W4A16 checkpoint (quant_algo ``W4A16_NVFP4``, or
  ``NVFP4`` whose config_groups all lack ``input_activations``) gets none, as vLLM
  drops them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..quantize.layers import FUSED_PARTNERS

__all__ = ["HF_QUANT_CONFIG", "is_modelopt", "modelopt_scheme", "read_checkpoint", "to_ct"]

HF_QUANT_CONFIG = "hf_quant_config.json"
NVFP4_ALGOS = ("NVFP4", "W4A16_NVFP4")
_WS2 = ".weight_scale_2"


def _as_dict(qc) -> dict | None:
    if qc is None or isinstance(qc, dict):
        return qc
    return qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)


def is_modelopt(folder: str | Path, quantization_config=None) -> bool:
    """A ModelOpt export: ``hf_quant_config.json`` or ``quant_method`` ``modelopt``."""
    qc = _as_dict(quantization_config) or {}
    method = str(qc.get("quant_method", "")).lower()
    return (Path(folder) / HF_QUANT_CONFIG).is_file() or method.startswith("modelopt")


def modelopt_scheme(folder: str | Path, quantization_config=None) -> tuple[dict, bool]:
    """(the quantization config vLLM reads, W4A16?) with vLLM's precedence: config.json's
    ``quantization_config``, else ``hf_quant_config.json``. ValueError unless NVFP4."""
    qc = _as_dict(quantization_config)
    if not qc:
        path = Path(folder) / HF_QUANT_CONFIG
        qc = {"quant_method": "modelopt", **json.loads(path.read_text(encoding="utf-8"))}
    body = qc["quantization"] if isinstance(qc.get("quantization"), dict) else qc
    algo = str(body.get("quant_algo") or "").upper()
    if algo not in NVFP4_ALGOS:
        raise ValueError(
            f"{folder}: ModelOpt quant_algo {algo or None!r} is not NVFP4 "
            f"(this reader takes {' / '.join(NVFP4_ALGOS)})"
        )
    group = int(body.get("group_size") or 16)
    if group != 16:
        raise ValueError(f"{folder}: NVFP4 group_size {group}, expected 16")
    kv = body.get("kv_cache_quant_algo") or body.get("kv_cache_scheme")
    if kv:
        raise ValueError(f"{folder}: KV-cache quantization ({kv}) is not read by the evaluation")
    groups = qc.get("config_groups")
    no_inputs = bool(groups) and all(
        isinstance(g, dict) and g.get("input_activations") is None for g in groups.values()
    )
    return qc, algo == "W4A16_NVFP4" or no_inputs


def _group_of(prefix: str) -> str:
    parent, _, leaf = prefix.rpartition(".")
    for partners in FUSED_PARTNERS:
        if leaf in partners:
            return f"{parent}.{'+'.join(partners)}"
    return prefix


def to_ct(tensors: dict[str, torch.Tensor], w4a16: bool) -> dict[str, torch.Tensor]:
    """ModelOpt NVFP4 tensor names and scales -> compressed-tensors ones (module doc)."""
    prefixes = sorted(k[: -len(_WS2)] for k in tensors if k.endswith(_WS2))
    groups: dict[str, list[str]] = {}
    for p in prefixes:
        groups.setdefault(_group_of(p), []).append(p)
    out = {}
    quant_keys = {f"{p}.{s}" for p in prefixes for s in ("weight", "weight_scale")}
    quant_keys |= {f"{p}.{s}" for p in prefixes for s in ("weight_scale_2", "input_scale")}
    for names in groups.values():
        w_max = torch.stack([tensors[f"{p}.weight_scale_2"].float().reshape(()) for p in names])
        w_gs = (1.0 / w_max.max()).reshape(1)
        i_gs = None
        if not w4a16:
            missing = [p for p in names if f"{p}.input_scale" not in tensors]
            if missing:
                raise ValueError(f"W4A4 NVFP4 checkpoint without input_scale for {missing}")
            ins = torch.stack([tensors[f"{p}.input_scale"].float().reshape(()) for p in names])
            i_gs = (1.0 / ins.max()).to(torch.float32).reshape(1)
        for p in names:
            packed, scale = tensors[f"{p}.weight"], tensors[f"{p}.weight_scale"]
            if packed.dtype != torch.uint8 or scale.dtype != torch.float8_e4m3fn:
                raise ValueError(f"{p}: weight {packed.dtype} / weight_scale {scale.dtype}")
            if scale.shape[-1] * 8 != packed.shape[-1] or scale.shape[:-1] != packed.shape[:-1]:
                raise ValueError(f"{p}: weight_scale {tuple(scale.shape)} vs weight")
            out[f"{p}.weight_packed"] = packed
            out[f"{p}.weight_scale"] = scale
            out[f"{p}.weight_global_scale"] = w_gs.clone()
            if i_gs is not None:
                out[f"{p}.input_global_scale"] = i_gs.clone()
    for k, t in tensors.items():
        if k not in quant_keys:
            out[k] = t
    return out


def _load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(f.name for f in folder.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(folder / f)))
    return tensors


def read_checkpoint(folder: str | Path, config=None) -> dict:
    """The :class:`~.model.Checkpoint` fields of a ModelOpt NVFP4 export (the config
    gets the ``quantization_config`` vLLM reads, from hf_quant_config.json if needed)."""
    from transformers import AutoConfig

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder) if config is None else config
    qc, w4a16 = modelopt_scheme(folder, getattr(config, "quantization_config", None))
    config.quantization_config = qc
    tensors = to_ct(_load_tensors(folder), w4a16)
    return {"config": config, "tensors": tensors, "meta": None, "vectors": {}, "name": str(folder)}
