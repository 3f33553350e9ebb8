"""Which Linear layers get quantized, and which of them vLLM fuses.

Only ``nn.Linear`` modules inside the decoder stack are quantized. Left in bf16
and listed in ``ignore`` with the reason: the lm_head, any Linear outside the
decoder layers, any Linear whose ``in_features`` is not a multiple of 16 (NVFP4
blocks run along the input dimension), and transformers' ``Conv1D`` layers (GPT-2).
Embeddings are not Linear and stay bf16 unlisted. A model left with nothing to
quantize is refused by the pipeline.

Fused partners: vLLM loads these sibling Linears into one fused layer
(``packed_modules_mapping`` in vLLM's model files: Llama/Qwen/Mistral ``qkv_proj``
and ``gate_up_proj``, Mixtral's expert ``w1``/``w3``, DeepSeek's
``fused_qkv_a_proj``) and keeps only the max of their global scales
(compressed-tensors scheme ``process_weights_after_loading``) without recomputing
block scales, so partners must share one weight and one input global scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..nvfp4 import BLOCK_SIZE

__all__ = ["FUSED_PARTNERS", "LayerPlan", "Target", "check_finite", "decoder_layers", "plan_model"]

#: Sibling leaf names that vLLM fuses into one layer.
FUSED_PARTNERS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
    ("q_a_proj", "kv_a_proj_with_mqa"),
)


@dataclass
class Target:
    """One Linear to quantize: its full name, the module and its fused group id."""

    name: str
    module: nn.Linear
    group: str  # partners share a group id; a lone Linear is its own group


@dataclass
class LayerPlan:
    """The decoder layers, the Linears to quantize (per decoder layer) and those left bf16."""

    layers_prefix: str
    layers: nn.ModuleList
    targets: list[list[Target]]  # one list per decoder layer
    ignored: dict[str, str] = field(default_factory=dict)  # name -> reason

    def all_targets(self) -> list[Target]:
        return [t for layer in self.targets for t in layer]


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers: the one with ``config.num_hidden_layers``
    entries (``model.layers`` in Llama/Qwen/Mistral), else the longest ModuleList."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if n is not None and len(mod) == n:
            return name, mod
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    if best is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers (nn.ModuleList) found")
    return best


_CONV1D_REASON = (
    "Conv1D (GPT-2 style, weight stored transposed) is not nn.Linear: neither "
    "compressed-tensors' 'Linear' target nor vLLM's quantized loaders take it"
)


def _is_conv1d(mod: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2, GPT-J heads...): a Linear with a transposed weight."""
    return type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None


def _group_id(name: str) -> str:
    parent, _, leaf = name.rpartition(".")
    for partners in FUSED_PARTNERS:
        if leaf in partners:
            return f"{parent}.{'+'.join(partners)}"
    return name


def plan_model(model: nn.Module) -> LayerPlan:
    """Split the model's Linears into quantized targets (grouped with their fused
    partners) and ignored ones (with the reason)."""
    prefix, layers = decoder_layers(model)
    targets: list[list[Target]] = []
    ignored: dict[str, str] = {}
    inside: set[str] = set()
    for i, layer in enumerate(layers):
        row: list[Target] = []
        for sub, mod in layer.named_modules():
            name = f"{prefix}.{i}.{sub}"
            if _is_conv1d(mod):
                ignored[name] = _CONV1D_REASON
                continue
            if not isinstance(mod, nn.Linear):
                continue
            inside.add(name)
            if mod.in_features % BLOCK_SIZE:
                ignored[name] = f"in_features {mod.in_features} is not a multiple of {BLOCK_SIZE}"
                continue
            row.append(Target(name, mod, _group_id(name)))
        targets.append(row)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, mod in model.named_modules():
        if _is_conv1d(mod) and name not in ignored:
            ignored[name] = _CONV1D_REASON
        if isinstance(mod, nn.Linear) and name not in inside:
            why = "output head (lm_head)" if mod is out_emb else "outside the decoder layers"
            ignored[name] = why
    return LayerPlan(prefix, layers, targets, ignored)


def check_finite(model: nn.Module) -> None:
    """Raise ValueError naming the first parameter holding NaN or Inf."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            raise ValueError(
                f"layer {name.rpartition('.')[0] or name}: parameter {name} has {bad} NaN/Inf "
                "values; NVFP4 cannot represent them (fix or re-export the checkpoint)"
            )
