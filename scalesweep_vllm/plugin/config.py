"""``--quantization scalesweep``: the vLLM QuantizationConfig.

Module level (vLLM pickles the config object from the engine process to its
workers). Built in three steps by vLLM (``vllm/config/vllm.py``
``VllmConfig._get_quantization_config``): ``override_quantization_method`` claims
the checkpoint, ``from_config`` parses ``quantization_config``, then
``maybe_update_config(model_dir)`` reads ``scalesweep.json`` beside it. Every
error a checkpoint can cause is raised there, in the engine process, before any
weight is loaded.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

from . import NAME, check_vllm_version
from .metadata import (
    METADATA_FILE,
    CheckpointError,
    CompressedTensorsInfo,
    RuntimeSettings,
    ScaleSweepMetadata,
    matches_ignore,
    resolve_settings,
)
from .modelopt import expand_excludes, is_modelopt_config, matches_exclude, parse_modelopt

__all__ = ["ScaleSweepConfig"]

logger = logging.getLogger("vllm.scalesweep")  # under vLLM's configured logger

#: Tensor names of scalesweep_vectors.safetensors (docs/CHECKPOINT.md).
_VECTOR_SUFFIXES = (".input_weight", ".q_weight", ".k_weight", ".v_weight")


def _attention_class() -> type:
    from vllm.model_executor.layers.attention import Attention

    return Attention


@register_quantization_config(NAME)
class ScaleSweepConfig(QuantizationConfig):
    """NVFP4 Linear layers plus runtime ScaleSweep of activations, K/V and Q."""

    def __init__(self, ct_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.ct_config = dict(ct_config or {})
        #: "compressed-tensors" (ours) or "modelopt" (NVIDIA ModelOpt's NVFP4 export,
        #: :mod:`.modelopt`): which tensor names the Linear layers load.
        self.checkpoint_format = (
            "modelopt" if is_modelopt_config(self.ct_config) else "compressed-tensors"
        )
        if not ct_config:
            self.ct = None
        elif self.checkpoint_format == "modelopt":
            self.ct = parse_modelopt(self.ct_config)
        else:
            self.ct = CompressedTensorsInfo.parse(self.ct_config)
        self.meta: ScaleSweepMetadata | None = None
        self.settings: RuntimeSettings | None = None
        self.model_dir: str | None = None

    # -- identity ------------------------------------------------------------
    def get_name(self) -> str:
        return NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the exact fallback needs bf16 tensor cores; Blackwell uses FP4 ones

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # quantization_config lives in config.json; ours is read below

    # -- construction ----------------------------------------------------------
    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: dict[str, Any], user_quant: str | None, hf_config: Any = None
    ) -> str | None:
        """Claim a compressed-tensors or ModelOpt NVFP4 checkpoint, but only when the
        user asked for us (custom methods are asked before vLLM's own ModelOpt ones:
        ``vllm/config/model.py`` ``_verify_quantization``)."""
        if user_quant != NAME:
            return None
        check_vllm_version()
        if hf_quant_cfg.get("quant_method") in ("compressed-tensors", NAME):
            return NAME
        if is_modelopt_config(hf_quant_cfg):
            return NAME  # from_config refuses a non-NVFP4 one, naming its quant_algo
        return None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ScaleSweepConfig:
        check_vllm_version()
        try:
            return cls(config)
        except CheckpointError as exc:
            raise ValueError(f"scalesweep: {exc}") from exc

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision=None):
        """Read ``scalesweep.json`` and its vectors from the checkpoint folder."""
        folder = _resolve_folder(model_name, revision)
        self.model_dir = folder
        if self.ct is None:
            raise ValueError(
                f"scalesweep: {folder or model_name} has no quantization_config in config.json, "
                "so it is not a quantized checkpoint. Quantize it first "
                "(scalesweep-quantize --model ... --output ...) or serve it without "
                "--quantization scalesweep"
            )
        try:
            if folder is not None and os.path.isfile(os.path.join(folder, METADATA_FILE)):
                self.meta = ScaleSweepMetadata.load(folder)
                self.meta.check_model(hf_config)
            self.settings = resolve_settings(self.ct, self.meta, str(folder or model_name))
        except CheckpointError as exc:
            raise ValueError(f"scalesweep: {exc}") from exc
        logger.info(
            "scalesweep: %s (%s); activations=%s kv_cache=%s query=%s (%s)",
            folder,
            self.checkpoint_format,
            self.settings.activations,
            self.settings.kv_cache,
            self.settings.query,
            "with " + METADATA_FILE if self.meta else "no " + METADATA_FILE,
        )

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        """Rename ignore entries and vector/attention keys like vLLM renames modules."""
        if self.ct is not None and self.ct.ignore:
            ignore = list(self.ct.ignore)
            if self.checkpoint_format == "modelopt":  # as vLLM's ModelOpt config does
                ignore = expand_excludes(ignore)
            ignore = tuple(hf_to_vllm_mapper.apply_list(ignore))
            self.ct = CompressedTensorsInfo(self.ct.activations, ignore, self.ct.kv_cache_scheme)
        if self.meta is not None:
            self.meta.vectors = hf_to_vllm_mapper.apply_dict(self.meta.vectors)
            self.meta.attention = hf_to_vllm_mapper.apply_dict(self.meta.attention)

    @staticmethod
    def get_checkpoint_weight_mapper():
        """Drop our WMSE vectors from the weight stream: vLLM loads every top-level
        ``*.safetensors`` of a folder without an index, vectors file included."""
        from vllm.model_executor.models.utils import WeightsMapper

        suffixes = {s: None for s in _VECTOR_SUFFIXES}
        return WeightsMapper(orig_to_new_suffix={".g_idx": None, **suffixes})

    # -- per layer ----------------------------------------------------------------
    def _ensure_ready(self) -> RuntimeSettings:
        if self.ct is None:
            raise ValueError("scalesweep: the checkpoint has no quantization_config")
        if self.settings is None:  # maybe_update_config not called (offline tools)
            self.settings = resolve_settings(self.ct, self.meta, self.model_dir or "?")
        return self.settings

    def shard_names(self, prefix: str) -> list[str]:
        """Checkpoint names behind a (possibly fused) vLLM Linear prefix."""
        head, _, last = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(last)
        if not parts:
            return [prefix]
        return [f"{head}.{p}" if head else p for p in parts]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        settings = self._ensure_ready()
        if isinstance(layer, LinearBase):
            shards = self.shard_names(prefix)
            if self.checkpoint_format == "modelopt":
                skipped = [matches_exclude(s, self.ct.ignore) for s in shards]
                if matches_exclude(prefix, self.ct.ignore):  # vLLM also tests the fused name
                    skipped = [True] * len(shards)
            else:
                skipped = [matches_ignore(s, self.ct.ignore) for s in shards]
            if all(skipped):
                return UnquantizedLinearMethod()
            if any(skipped):
                raise ValueError(
                    f"scalesweep: fused layer {prefix} mixes ignored and quantized shards "
                    f"{shards}; fused partners must be quantized together"
                )
            from .linear import ScaleSweepLinearMethod

            return ScaleSweepLinearMethod(self, prefix, shards, settings.activations)
        if isinstance(layer, VocabParallelEmbedding):  # embeddings and lm_head stay bf16
            return None
        if isinstance(layer, _attention_class()):
            if settings.kv_cache is None and settings.query is None:
                return None
            from .attention import ScaleSweepKVCacheMethod

            return ScaleSweepKVCacheMethod(self, prefix, layer)  # refuses bad settings (compat.py)
        raise NotImplementedError(
            f"scalesweep: layer {prefix!r} of type {type(layer).__name__} is not supported "
            "(supported: Linear layers, decoder Attention, embeddings)"
        )

    def attention_entry(self, prefix: str):
        """``scalesweep.json``'s entry for a vLLM attention prefix (``...self_attn.attn``)."""
        if self.meta is None:
            return None
        for key in (prefix, prefix.rsplit(".", 1)[0]):
            if key in self.meta.attention:
                return key, self.meta.attention[key]
        raise ValueError(
            f"scalesweep: {METADATA_FILE} has no attention entry for {prefix!r} "
            f"(entries: {sorted(self.meta.attention)[:3]}...)"
        )


def _resolve_folder(model_name: str, revision: str | None) -> str | None:
    """The local checkpoint folder (a Hub id is fetched for our two small files only)."""
    if os.path.isdir(model_name):
        return model_name
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            model_name,
            revision=revision,
            allow_patterns=[METADATA_FILE, "scalesweep_vectors.safetensors"],
        )
    except Exception as exc:  # offline or not a Hub id: served without our metadata
        logger.warning(
            "scalesweep: cannot look for %s beside %s: %s", METADATA_FILE, model_name, exc
        )
        return None
