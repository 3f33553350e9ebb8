"""Runtime ScaleSweep of K, V (where they enter the KV cache) and Q (where it enters
attention), per 16 elements along head_dim.

vLLM gives a quantization method no per-forward call on an Attention layer, but
its ``process_weights_after_loading`` can wrap the layer's backend ``impl``:

* K and V reach the cache through ``impl.do_kv_cache_update(layer, key, value,
  kv_cache, slot_mapping)`` (``unified_kv_cache_update`` in
  ``vllm/model_executor/layers/attention/attention.py``), a call separate from
  ``impl.forward``; prefill and decode then read K/V back FROM THE CACHE. So
  quantizing ``key``/``value`` inside ``forward`` would change nothing (the trap a
  test guards against): we quantize them in ``do_kv_cache_update``.
* Q is used once, in ``impl.forward(layer, query, ...)``: we quantize it there.

The same split holds for CPU_ATTN (vLLM 0.32/0.33) and the CUDA backends of 0.33
(FlashAttention, FlashInfer, Triton). This is quantize-dequantize: the cache
keeps the model dtype (bf16), so the accuracy is NVFP4's but no memory is saved
(docs/SERVING.md says where a packed 4-bit cache exists).
"""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod

from .. import kernels

__all__ = ["ScaleSweepKVCacheMethod", "head_slice"]

logger = logging.getLogger("vllm.scalesweep")  # under vLLM's configured logger


def head_slice(total: int, local: int, rank: int, tp: int) -> slice:
    """Rows of a per-head vector [total, head_dim] that tensor-parallel rank ``rank``
    holds, as vLLM's QKVParallelLinear splits heads: a contiguous slice, or, when
    there are fewer KV heads than ranks, the one head this rank replicates."""
    if local * tp == total:
        return slice(rank * local, (rank + 1) * local)
    if local == total:
        return slice(0, total)
    idx = rank // max(1, tp // total)
    return slice(idx, idx + 1)


def _tp_size() -> int:
    from vllm.distributed import get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_world_size()


def _tp_rank() -> int:
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


class _Part:
    """One of Q, K, V: its method, encode global scale and WMSE weight [heads, head_dim]."""

    def __init__(self, method: str, global_scale: float, weight: torch.Tensor | None):
        self.method = method
        self.global_scale = torch.tensor(global_scale, dtype=torch.float32)
        self.weight = weight

    def to(self, device: torch.device) -> _Part:
        self.global_scale = self.global_scale.to(device)
        if self.weight is not None:
            self.weight = self.weight.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.fake_quantize(x, self.global_scale, self.method, self.weight)


class ScaleSweepKVCacheMethod(BaseKVCacheMethod):
    """Wraps the attention impl of one layer; vLLM's own scale handling is kept."""

    def __init__(self, quant_config, prefix: str):
        super().__init__(quant_config)
        self.prefix = prefix
        settings = quant_config.settings
        self.kv_method, self.q_method = settings.kv_cache, settings.query
        self.key, self.entry = quant_config.attention_entry(prefix)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        super().process_weights_after_loading(layer)
        impl = layer.impl
        if getattr(impl, "_scalesweep_wrapped", False):
            return
        e = self.entry
        if impl.head_size != e.head_dim:
            raise ValueError(
                f"scalesweep: {self.prefix} has head_size {impl.head_size}, "
                f"scalesweep.json says {e.head_dim}"
            )
        device = _param_device(layer)
        rank, tp = _tp_rank(), _tp_size()
        q_rows = head_slice(e.num_heads, impl.num_heads, rank, tp)
        kv_rows = head_slice(e.num_kv_heads, impl.num_kv_heads, rank, tp)
        parts = {}
        if self.kv_method is not None:
            parts["k"] = self._part("k", self.kv_method, e.k_global_scale, kv_rows, e.num_kv_heads)
            parts["v"] = self._part("v", self.kv_method, e.v_global_scale, kv_rows, e.num_kv_heads)
        if self.q_method is not None:
            parts["q"] = self._part("q", self.q_method, e.q_global_scale, q_rows, e.num_heads)
        parts = {k: p.to(device) for k, p in parts.items()}
        layer.scalesweep_parts = parts
        _wrap_impl(impl, parts)

    def _part(self, c: str, method: str, gs: float, rows: slice, heads: int) -> _Part:
        weight = None
        if method == "wmse":
            name = f"{self.key}.{c}_weight"
            vectors = self.quant_config.meta.vectors
            if name not in vectors:
                raise ValueError(f"scalesweep: method 'wmse' needs {name} in the vectors file")
            w = vectors[name]
            if w.shape != (heads, self.entry.head_dim):
                raise ValueError(
                    f"scalesweep: {name} has shape {tuple(w.shape)}, "
                    f"expected {(heads, self.entry.head_dim)}"
                )
            weight = w[rows].contiguous()
        return _Part(method, gs, weight)


def _param_device(layer: torch.nn.Module) -> torch.device:
    for t in (*layer.parameters(), *layer.buffers()):
        return t.device
    return torch.device("cpu")


def _wrap_impl(impl, parts: dict[str, _Part]) -> None:
    """Instance-level wrappers around the backend's two entry points."""
    k, v, q = parts.get("k"), parts.get("v"), parts.get("q")
    if k is not None:
        update = impl.do_kv_cache_update

        def do_kv_cache_update(layer, key, value, kv_cache, slot_mapping):
            return update(layer, k(key), v(value), kv_cache, slot_mapping)

        impl.do_kv_cache_update = do_kv_cache_update
    if q is not None:
        forward = impl.forward

        def forward_q(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs):
            if attn_metadata is not None:  # None: the warm-up call, nothing to attend
                query = q(query)
            return forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)

        impl.forward = forward_q
    impl._scalesweep_wrapped = True
