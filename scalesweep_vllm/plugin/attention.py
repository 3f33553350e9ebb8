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

from ..rope_bias import quantize_around
from ..runtime import Part
from .compat import AttentionFacts, check_attention

__all__ = ["ScaleSweepKVCacheMethod", "attention_facts", "head_slice"]

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


#: One of Q, K, V: method, encode global scale, WMSE weight [heads, head_dim]; the
#: same quantizer the evaluation applies (scalesweep_vllm/runtime.py).
_Part = Part


def _supported(impl, name: str) -> bool:
    """``impl.<name>()`` of vLLM's fusion-capability queries; False where absent."""
    fn = getattr(impl, name, None)
    if not callable(fn):
        return False
    try:
        return bool(fn())
    except Exception:  # a query that needs state the impl lacks: not fusable
        return False


def attention_facts(layer: torch.nn.Module, prefix: str) -> AttentionFacts:
    """Read what :func:`.compat.attention_refusals` decides on off a vLLM ``Attention``
    layer under construction. vLLM (0.32 and 0.33,
    vllm/model_executor/layers/attention/attention.py) calls the quant config's
    ``get_quant_method`` from ``_init_kv_cache_quant`` after it has set
    ``layer.kv_cache_dtype``, ``layer.attn_backend`` and ``layer.impl`` and before its
    own checks (the fp8_e5m2 one) and ``query_quant``: so the plugin refuses first."""
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()  # set while vLLM builds the model
    passes = getattr(getattr(config, "compilation_config", None), "pass_config", None)
    impl = layer.impl
    backend = layer.attn_backend
    try:
        name = backend.get_name()
    except Exception:
        name = getattr(backend, "__name__", type(impl).__name__)
    qk_norm = _supported(impl, "fused_qk_norm_rope_kvcache_supported") or _supported(
        impl, "fused_qk_norm_mrope_kvcache_supported"
    )
    parallel = getattr(config, "parallel_config", None)
    return AttentionFacts(
        prefix=prefix,
        backend=str(name),
        kv_cache_dtype=str(getattr(layer, "kv_cache_dtype", "auto")),
        supports_quant_query_input=bool(getattr(impl, "supports_quant_query_input", False)),
        forward_includes_kv_cache_update=bool(
            getattr(backend, "forward_includes_kv_cache_update", True)
        ),
        has_do_kv_cache_update=callable(getattr(impl, "do_kv_cache_update", None)),
        fused_rope_kvcache=bool(getattr(passes, "fuse_rope_kvcache", False))
        and _supported(impl, "fused_rope_kvcache_supported"),
        fused_qk_norm_rope_kvcache=bool(getattr(passes, "fuse_qk_norm_rope_kvcache", False))
        and qk_norm,
        decode_context_parallel_size=int(getattr(parallel, "decode_context_parallel_size", 1) or 1),
    )


class ScaleSweepKVCacheMethod(BaseKVCacheMethod):
    """Wraps the attention impl of one layer; vLLM's own scale handling is kept.

    Given the layer (as ``ScaleSweepConfig.get_quant_method`` does), refuses at once
    the vLLM settings under which the hooks would crash, do nothing, or be undone
    (:mod:`.compat`)."""

    def __init__(self, quant_config, prefix: str, layer: torch.nn.Module | None = None):
        super().__init__(quant_config)
        self.prefix = prefix
        settings = quant_config.settings
        self.kv_method, self.q_method = settings.kv_cache, settings.query
        if layer is not None:
            check_attention(attention_facts(layer, prefix), self.kv_method, self.q_method)
        self.key, self.entry = quant_config.attention_entry(prefix)
        self.rope = None
        if self.entry.rope_bias and (self.kv_method or self.q_method):
            self.rope = _served_rope(self.entry.head_dim)

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
        biases = {}
        for c in self.entry.rope_bias:
            if c in parts:
                rows = q_rows if c == "q" else kv_rows
                b = self.quant_config.meta.vectors[f"{self.key}.{c}_bias"]
                biases[c] = b[rows].to(device, torch.float32).contiguous()
        offsets = _RopeOffsets(self.rope, biases, layer.layer_name) if biases else None
        layer.scalesweep_rope_offsets = offsets
        _wrap_impl(impl, parts, offsets)

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


def _served_rope(head_dim: int):
    """vLLM's own rotary embedding of the model being built, in float32, made as the
    architectures in :data:`SERVED_ARCHITECTURES` make theirs (vLLM 0.32/0.33
    ``models/qwen2.py``: ``get_rope(head_dim, max_position=max_position_embeddings,
    rope_parameters=config.rope_parameters)``, neox style). ``check_model`` has
    refused every other architecture."""
    from vllm.config import get_current_vllm_config_or_none
    from vllm.model_executor.layers.rotary_embedding import get_rope

    config = get_current_vllm_config_or_none()
    hf = getattr(getattr(config, "model_config", None), "hf_config", None)
    if hf is None:
        raise RuntimeError("scalesweep: rope_bias needs the model config while vLLM builds it")
    return get_rope(
        head_dim,
        max_position=int(getattr(hf, "max_position_embeddings", 32768)),
        rope_parameters=getattr(hf, "rope_parameters", None),
        dtype=torch.float32,
    )


def token_positions(attn_metadata, num_tokens: int) -> torch.Tensor:
    """The position of each of ``num_tokens`` rows of a forward, from vLLM's attention
    metadata: token j of request r (``query_start_loc[r] <= j < query_start_loc[r+1]``)
    sits at ``seq_lens[r] - query_start_loc[r+1] + j`` (seq_lens counts the cached
    tokens plus this step's). Padding rows past the last request get 0."""
    qsl = attn_metadata.query_start_loc.to(torch.int64)
    seq = attn_metadata.seq_lens.to(device=qsl.device, dtype=torch.int64)
    j = torch.arange(num_tokens, device=qsl.device, dtype=torch.int64)
    req = torch.searchsorted(qsl[1:], j, right=True).clamp(max=seq.numel() - 1)
    pos = seq[req] - qsl[req + 1] + j
    return torch.where(j < qsl[-1], pos, torch.zeros_like(pos)).clamp(min=0)


class _RopeOffsets:
    """``R_p b`` for Q and K of one attention layer at the positions of the current
    forward (:mod:`scalesweep_vllm.rope_bias`), float32 ``[T, heads, head_dim]``."""

    def __init__(self, rope, biases: dict[str, torch.Tensor], layer_name: str):
        self.rope, self.biases, self.layer_name = rope, biases, layer_name

    def __call__(self, c: str, num_tokens: int, attn_metadata=None) -> torch.Tensor | None:
        b = self.biases.get(c)
        if b is None:
            return None
        if attn_metadata is None:
            from vllm.forward_context import get_forward_context

            md = get_forward_context().attn_metadata
            if md is None:  # a dummy (profiling) run: no positions, nothing is attended
                return None
            if not isinstance(md, dict):
                raise RuntimeError(
                    "scalesweep: rope_bias needs per-layer attention metadata "
                    f"(got {type(md).__name__}; micro-batching is not supported)"
                )
            attn_metadata = md[self.layer_name]
        pos = token_positions(attn_metadata, num_tokens).to(b.device)
        x = b.unsqueeze(0).expand(num_tokens, *b.shape).contiguous()
        rot, _ = self.rope.forward_native(pos, x, None)
        return rot


def _wrap_impl(impl, parts: dict[str, _Part], offsets: _RopeOffsets | None = None) -> None:
    """Instance-level wrappers around the backend's two entry points; Q and K around
    their rotary bias where ``offsets`` has one."""
    k, v, q = parts.get("k"), parts.get("v"), parts.get("q")

    def offset(c, x, md=None):
        return offsets(c, x.shape[0], md) if offsets is not None else None

    if k is not None:
        update = impl.do_kv_cache_update

        def do_kv_cache_update(layer, key, value, kv_cache, slot_mapping):
            key = quantize_around(k, key, offset("k", key))
            return update(layer, key, v(value), kv_cache, slot_mapping)

        impl.do_kv_cache_update = do_kv_cache_update
    if q is not None:
        forward = impl.forward

        def forward_q(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs):
            if attn_metadata is not None:  # None: the warm-up call, nothing to attend
                query = quantize_around(q, query, offset("q", query, attn_metadata))
            return forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)

        impl.forward = forward_q
    impl._scalesweep_wrapped = True
