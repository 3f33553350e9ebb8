"""Quantize Q and K around the rotary image of their projection bias.

Models whose ``q_proj`` / ``k_proj`` carry a bias (Qwen2 and Qwen2.5) send it
through the rotary embedding with the rest: the key that attention sees at
position p is ``k = R_p (x W_k^T) + R_p b_k``. Some of those biases are huge. In
Qwen2.5-Coder-1.5B, layer 0's ``|b_k|`` reaches 354 while the rest of its K stays
under 8, so any 16-element block that holds such a channel gets a scale that rounds
the other fifteen to zero. With 4-bit K the model collapses: perplexity goes from
11.3 to 50.6 with ScaleSweep and to 279 with AbsMax.

``R_p b`` is known exactly from the bias and the position, so we quantize the
residual and add the offset back:

    k_hat = Q(k - R_p b_k) + R_p b_k        (likewise q with b_q)

The error is ``Q(r) - r``, the block error of a tensor without the outliers. On
that model it makes the attention-probability KL of 4-bit K 17x smaller, summed
over layers, and 4x smaller for 4-bit Q. The global scale comes from the
residual's calibrated amax.

A packed NVFP4 cache stores ``Q(k - R_p b_k)`` and adds ``R_p b_k`` on read: one
rotation of a per-head constant per position. The quantize-dequantize here gives
exactly that format's values, in float32: ``(Q(x - o) + o).to(x.dtype)``.

Offsets are float32, ``[..., T, H, D]``, in the ``[..., heads, head_dim]`` layout of
:class:`scalesweep_vllm.runtime.Part`. Calibration and evaluation build them with
the model's own transformers rotary module and ``apply_rotary_pos_emb``. The vLLM
plugin builds them with vLLM's ``get_rope`` for the architectures in
:data:`SERVED_ARCHITECTURES` (``scalesweep_vllm/plugin/attention.py``).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

__all__ = [
    "SERVED_ARCHITECTURES",
    "HFRope",
    "attention_biases",
    "quantize_around",
    "recorded",
]

#: Architectures whose served rotary embedding the plugin rebuilds and that a test
#: checks against the evaluation (tests/test_rope_bias.py). The quantizer turns the
#: correction on by default only for these.
SERVED_ARCHITECTURES = ("Qwen2ForCausalLM",)


def quantize_around(part, x: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """``part(x - offset) + offset`` in float32, cast back to ``x.dtype``.

    ``offset`` None: ``part(x)``.
    """
    if offset is None:
        return part(x)
    r = x.to(torch.float32) - offset
    return (part(r) + offset).to(x.dtype)


def recorded(attention: dict | None) -> bool:
    """Whether scalesweep.json's ``attention`` entries quantize any Q or K around its
    rotary bias (an entry's ``rope_bias`` list is not empty)."""
    return any(e.get("rope_bias") for e in (attention or {}).values())


def attention_biases(attn: nn.Module) -> dict[str, torch.Tensor]:
    """``{"q": b_q, "k": b_k}`` (float32 ``[out_features]``) of an attention module's
    projections, where they exist and are not all zero."""
    out = {}
    for c in ("q", "k"):
        lin = getattr(attn, f"{c}_proj", None)
        b = getattr(lin, "bias", None)
        if isinstance(b, torch.Tensor) and bool(b.detach().abs().amax() > 0):
            out[c] = b.detach().to(torch.float32).cpu()
    return out


def _rotary(model: nn.Module) -> nn.Module | None:
    """The model's one shared transformers rotary module (``...RotaryEmbedding`` with
    ``inv_freq``); None where there is none or more than one."""
    found = [
        m
        for _, m in model.named_modules()
        if type(m).__name__.endswith("RotaryEmbedding") and hasattr(m, "inv_freq")
    ]
    return found[0] if len(found) == 1 else None


class HFRope:
    """``R_p b`` for a transformers model: the model's own rotary module (cos/sin in
    float32) and its modeling file's ``apply_rotary_pos_emb``."""

    def __init__(self, model: nn.Module):
        self.rotary = _rotary(model)
        self.apply = None
        for m in model.modules():
            fn = getattr(sys.modules.get(type(m).__module__), "apply_rotary_pos_emb", None)
            if fn is not None and type(m).__name__.endswith("Attention"):
                self.apply = fn
                break
        if self.rotary is None or self.apply is None:
            raise ValueError(
                f"{type(model).__name__}: no single rotary module with apply_rotary_pos_emb; "
                "quantizing Q/K around the rotary bias needs both"
            )

    def offsets(
        self, biases: dict[str, torch.Tensor], position_ids: torch.Tensor, head_dim: int
    ) -> dict[str, torch.Tensor]:
        """``{c: R_p b_c}`` float32 ``[B, T, H_c, D]`` at ``position_ids`` ``[B, T]``
        for ``biases[c]`` of shape ``[H_c * D]`` or ``[H_c, D]``."""
        if position_ids is None:
            raise ValueError("quantizing Q/K around the rotary bias needs position_ids")
        pid = position_ids if position_ids.dim() == 2 else position_ids.view(1, -1)
        dev = pid.device
        cos, sin = self.rotary(torch.empty(0, dtype=torch.float32, device=dev), pid)
        cos, sin = cos.to(torch.float32), sin.to(torch.float32)
        b, t = pid.shape
        out = {}
        for c, bias in biases.items():
            v = bias.to(dev, torch.float32).reshape(-1, head_dim)
            x = v[None, :, None, :].expand(b, v.shape[0], t, head_dim)  # [B, H, T, D]
            rot, _ = self.apply(x, x, cos, sin)
            out[c] = rot.transpose(1, 2).contiguous()
        return out
