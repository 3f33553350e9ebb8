"""Kernel dispatch: one entry point per operation.

Triton kernels on CUDA tensors, the C++ CPU backend (:mod:`.cpu_backend`, built per
instruction-set level by :mod:`.cpu_build`) on CPU tensors, the torch reference
(:mod:`scalesweep_vllm.sweep`) elsewhere. Every kernel is tested bit for bit against
the reference.

API (stable; the offline quantizer and the vLLM plugin call only these):

* ``quantize(x, global_scale, method="mse", weight=None, backend="auto")``
  -> ``(packed uint8 [..., K/2], scales float8_e4m3fn [..., K/16])``
* ``dequantize(packed, scales, global_scale, dtype=torch.bfloat16, backend="auto")``
  -> ``[..., K]`` in ``dtype``
* ``fake_quantize(x, global_scale, method="mse", weight=None, backend="auto")``
  -> quantize-dequantize, same shape and dtype as x

* ``hessian_sweep_scales(x, global_scale, factors, backend="auto")`` -> FP8 scales of
  the block-Hessian objective (:mod:`scalesweep_vllm.hessian_sweep`; C++ on CPU, the
  reference elsewhere)

``method``: "absmax" | "mse" | "wmse" ("wmse" needs ``weight`` >= 0: a per-column
vector of length K, a per-head [H, K] weight for x [..., H, K], or anything else that
broadcasts to x's trailing dims; the torch path takes any broadcastable weight).
The Triton path checks shapes only; NaN/Inf inputs and the global scale's range are
checked by the torch reference alone (the kernels never synchronize with the host).
``backend``: "auto" (Triton on CUDA, C++ on CPU when it built, torch otherwise) |
"torch" | "triton" | "cpu" ("triton" on CPU tensors needs ``TRITON_INTERPRET=1``; used
by the CPU tests).
"""

from __future__ import annotations

from .dispatch import METHODS, dequantize, fake_quantize, hessian_sweep_scales, quantize

__all__ = ["METHODS", "dequantize", "fake_quantize", "hessian_sweep_scales", "quantize"]
