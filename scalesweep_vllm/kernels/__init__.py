"""Kernel dispatch: one entry point per operation.

Triton kernels on CUDA tensors, the torch reference (:mod:`scalesweep_vllm.sweep`)
elsewhere. Every Triton kernel is tested bit for bit against the reference.

API (stable; the offline quantizer and the vLLM plugin call only these):

* ``quantize(x, global_scale, method="mse", weight=None, backend="auto")``
  -> ``(packed uint8 [..., K/2], scales float8_e4m3fn [..., K/16])``
* ``dequantize(packed, scales, global_scale, dtype=torch.bfloat16, backend="auto")``
  -> ``[..., K]`` in ``dtype``
* ``fake_quantize(x, global_scale, method="mse", weight=None, backend="auto")``
  -> quantize-dequantize, same shape and dtype as x

``method``: "absmax" | "mse" | "wmse" ("wmse" needs ``weight``, a per-column
vector of length K or anything broadcastable to x, >= 0).
``backend``: "auto" (Triton on CUDA, torch otherwise) | "torch" | "triton"
("triton" on CPU tensors needs ``TRITON_INTERPRET=1``; used by the CPU tests).
"""

from __future__ import annotations

from .dispatch import METHODS, dequantize, fake_quantize, quantize

__all__ = ["METHODS", "dequantize", "fake_quantize", "quantize"]
