"""What a checkpoint quantizes at run time, in one place for every consumer.

The vLLM plugin (:mod:`scalesweep_vllm.plugin`), the evaluation
(:mod:`scalesweep_vllm.evaluate`) and the plugin tests' transformers reference all
fake-quantize the same three things with the same numbers:

* each quantized Linear's input, per 16 input features, with the encode scale
  ``input_global_scale`` (the max over fused partners, as vLLM keeps it) and the
  runtime method; for ``wmse`` the importance of input channel i is the sum over
  the fused partners P of ``P.input_weight[i]`` (:func:`fused_input_weight`);
* K and V (where they enter the KV cache) and Q (where it enters attention), after
  the rotary embedding, per 16 along head_dim, with the ``attention`` entry's
  ``{q,k,v}_global_scale`` and, for ``wmse``, the per-head vectors ``[heads, head_dim]``.

A :class:`Part` is one such quantizer. Its input is laid out ``[..., heads,
head_dim]`` for Q/K/V (vLLM's layout; transformers' ``[B, H, T, D]`` is transposed
by the caller) and ``[..., K]`` for Linear inputs, so the per-head vector broadcasts
over trailing dims (what the kernels' fast paths take).

``four_over_six`` is an evaluation-only runtime method (the peer baseline: the better
of amax/6 and amax/4 per block by MSE, :func:`scalesweep_vllm.sweep.four_over_six_scales`:
the C++ CPU backend on CPU tensors, bit for bit, and the torch reference elsewhere);
the plugin serves only :data:`kernels.METHODS`.

No vLLM and no transformers import here.
"""

from __future__ import annotations

import torch

from . import kernels, sweep
from .kernels import cpu_backend

__all__ = ["RUNTIME_METHODS", "Part", "fused_input_weight"]

#: Methods a runtime part may use: the kernels' three, plus the four-over-six peer.
RUNTIME_METHODS = (*kernels.METHODS, "four_over_six")


class Part:
    """One runtime quantizer: method, encode global scale and WMSE weight (or None)."""

    def __init__(
        self,
        method: str,
        global_scale: float | torch.Tensor,
        weight: torch.Tensor | None = None,
    ):
        if method not in RUNTIME_METHODS:
            raise ValueError(f"unknown runtime method {method!r}; choose one of {RUNTIME_METHODS}")
        if method == "wmse" and weight is None:
            raise ValueError("runtime method 'wmse' needs its weight vector")
        self.method = method
        self.global_scale = torch.as_tensor(global_scale, dtype=torch.float32).reshape(())
        self.weight = weight if method == "wmse" else None

    def to(self, device: torch.device | str) -> Part:
        self.global_scale = self.global_scale.to(device)
        if self.weight is not None:
            self.weight = self.weight.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "four_over_six":
            if x.device.type == "cpu" and cpu_backend.available():
                got = cpu_backend.fake_quantize(x, self.global_scale, "four_over_six", None)
                if got is not None:
                    return got
            g = self.global_scale.to(x.device)
            scales = sweep.four_over_six_scales(x, g)
            return sweep.quantize_dequantize(x, g, scales).to(x.dtype)
        return kernels.fake_quantize(x, self.global_scale, self.method, self.weight)

    def __repr__(self) -> str:
        return f"Part({self.method}, G={float(self.global_scale):.6g})"


def fused_input_weight(vectors: dict[str, torch.Tensor], shards: list[str]) -> torch.Tensor:
    """The runtime WMSE weight of a fused layer's shared input: the sum over its
    shards of ``{shard}.input_weight`` (float32 [K]); ValueError naming a missing one."""
    vecs = []
    for shard in shards:
        key = f"{shard}.input_weight"
        if key not in vectors:
            raise ValueError(f"activation method 'wmse' needs {key} in the vectors file")
        vecs.append(vectors[key].to(torch.float32))
    return torch.stack(vecs).sum(0)
