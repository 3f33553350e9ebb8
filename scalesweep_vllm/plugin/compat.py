"""Which vLLM settings the plugin can serve: pure decisions, no vLLM import.

The plugin's runtime K/V and Q quantization (:mod:`.attention`) hooks two entry
points of a backend's ``impl``: ``do_kv_cache_update`` (K, V) and ``forward`` (Q).
Some vLLM settings bypass those hooks, or hand them tensors they cannot take, or
quantize our values a second time. Each function here decides from plain facts
(strings, bools, ints that :mod:`.attention` and :mod:`.linear` read off vLLM's
objects) and returns the reasons to refuse, each naming the option to change, so
the decisions are unit-tested without the vLLM version (0.33, CUDA, ROCm) that
can express them. Read against vLLM 0.33.0's source; the file that each rule
mirrors is cited next to it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "KV_OFF_HINT",
    "Q_OFF_HINT",
    "UNQUANTIZED_KV_CACHE_DTYPES",
    "AttentionFacts",
    "attention_refusals",
    "check_attention",
    "LINEAR_CHOICES",
    "LINEAR_ENV",
    "linear_backend",
    "vllm_quantizes_query",
]

#: ``--kv-cache-dtype`` values whose cache keeps what our hook writes (the model
#: dtype, or a 16-bit float that holds every NVFP4 value exactly: E2M1 x E4M3 / G
#: has at most 5 significant bits). Everything else (fp8*, nvfp4*, int8/int4,
#: turboquant, ...) re-quantizes the cache.
UNQUANTIZED_KV_CACHE_DTYPES = ("auto", "bfloat16", "float16")

KV_OFF_HINT = "or turn the plugin's KV-cache quantization off with SCALESWEEP_KV_CACHE=off"
Q_OFF_HINT = "or turn the plugin's query quantization off with SCALESWEEP_QUERY=off"


@dataclass(frozen=True)
class AttentionFacts:
    """What one vLLM ``Attention`` layer will do, read at model build time."""

    prefix: str
    #: ``layer.attn_backend.get_name()`` (e.g. CPU_ATTN, FLASH_ATTN, HPC_ATTN).
    backend: str
    #: ``layer.kv_cache_dtype``: ``--kv-cache-dtype`` after vLLM's per-layer
    #: ``kv_cache_dtype_skip_layers`` (vllm/model_executor/layers/attention/attention.py).
    kv_cache_dtype: str
    #: ``layer.impl.supports_quant_query_input`` (vllm/v1/attention/backend.py,
    #: AttentionImplBase; set True by FlashAttention/Triton/FlashInfer impls).
    supports_quant_query_input: bool = False
    #: ``layer.attn_backend.forward_includes_kv_cache_update`` (AttentionBackend
    #: default True; False for the backends that write the cache in
    #: ``do_kv_cache_update``: CPU_ATTN, FLASH_ATTN, TRITON_ATTN, FLASHINFER, ...).
    forward_includes_kv_cache_update: bool = False
    #: ``hasattr(layer.impl, "do_kv_cache_update")`` (HPC_ATTN's impl has none).
    has_do_kv_cache_update: bool = True
    #: ``pass_config.fuse_rope_kvcache and impl.fused_rope_kvcache_supported()``:
    #: RopeKVCacheFusionPass (vllm/compilation/passes/fusion/rope_kvcache_fusion.py,
    #: ROCm AITER) replaces rope + unified_kv_cache_update by
    #: ``impl.do_rope_and_kv_cache_update``.
    fused_rope_kvcache: bool = False
    #: ``pass_config.fuse_qk_norm_rope_kvcache`` and the impl's
    #: ``fused_qk_norm_(m)rope_kvcache_supported()``: QkNormRopeKvCacheFusionPass
    #: (.../fusion/qk_norm_rope_kvcache_fusion.py) calls
    #: ``impl.do_qk_norm_(m)rope_kvcache_update`` instead.
    fused_qk_norm_rope_kvcache: bool = False
    #: ``parallel_config.decode_context_parallel_size`` (vllm/config/parallel.py).
    decode_context_parallel_size: int = 1


def vllm_quantizes_query(facts: AttentionFacts) -> bool:
    """Whether vLLM turns the query into FP8 in ``Attention.forward`` before the
    attention custom op, i.e. before our ``impl.forward`` hook sees it.

    Mirrors vLLM 0.33 ``Attention.__init__`` (vllm/model_executor/layers/attention/
    attention.py): ``query_quant`` is built when ``impl.supports_quant_query_input``
    and the cache dtype starts with ``fp8`` or ``nvfp4`` and does not end with
    ``per_token_head``."""
    d = facts.kv_cache_dtype
    return (
        facts.supports_quant_query_input
        and (d.startswith("fp8") or d.startswith("nvfp4"))
        and not d.endswith("per_token_head")
    )


def attention_refusals(facts: AttentionFacts, kv_method: str | None, q_method: str | None):
    """Reasons (strings) why this layer cannot be served with the plugin's K/V
    method ``kv_method`` and Q method ``q_method`` (None: that part is off)."""
    out = []
    where = f"{facts.prefix} (attention backend {facts.backend})"
    if kv_method is not None:
        # Item 5 of issue 14: our hook writes NVFP4 values in the model dtype; a
        # quantized cache rounds them again (to FP8, or to NVFP4 by AbsMax with
        # k_scale = 1 since our checkpoint has none). Silent double quantization.
        if facts.kv_cache_dtype not in UNQUANTIZED_KV_CACHE_DTYPES:
            out.append(
                f"{where}: --kv-cache-dtype {facts.kv_cache_dtype} would quantize the K/V "
                f"that the plugin already quantized to NVFP4 ({kv_method}) a second time, "
                "silently (the plugin stores its NVFP4 values in the model dtype; a packed "
                "ScaleSweep KV cache is not implemented). Serve with --kv-cache-dtype auto "
                f"(or bfloat16/float16), {KV_OFF_HINT}"
            )
        # Item 6: K/V reach the cache only through impl.do_kv_cache_update, called
        # by unified_kv_cache_update when the backend's
        # forward_includes_kv_cache_update is False (attention.py, Attention.forward).
        if facts.forward_includes_kv_cache_update or not facts.has_do_kv_cache_update:
            why = (
                "writes the KV cache inside its forward (forward_includes_kv_cache_update)"
                if facts.forward_includes_kv_cache_update
                else "has no do_kv_cache_update"
            )
            out.append(
                f"{where}: the backend {why}, so the plugin's K/V quantization would "
                "never run. Choose a backend that writes the cache in do_kv_cache_update "
                "with --attention-backend (e.g. FLASH_ATTN, TRITON_ATTN, FLASHINFER), "
                f"{KV_OFF_HINT}"
            )
        if facts.fused_rope_kvcache or facts.fused_qk_norm_rope_kvcache:
            flag = "fuse_rope_kvcache" if facts.fused_rope_kvcache else "fuse_qk_norm_rope_kvcache"
            out.append(
                f"{where}: the ROCm compilation pass {flag} writes K/V through the "
                "backend's fused rope+KV-cache kernel and skips do_kv_cache_update, so the "
                "plugin's K/V quantization would never run. Disable it with "
                f'--compilation-config \'{{"pass_config": {{"{flag}": false}}}}\', '
                f"{KV_OFF_HINT}"
            )
        # FlashAttention/FlashInfer with DCP > 1 attend over the new tokens' K/V as
        # passed to forward (all-gathered), not as read back from the cache
        # (vllm/v1/attention/backends/flash_attn.py, _forward_with_dcp).
        if facts.decode_context_parallel_size > 1:
            out.append(
                f"{where}: decode-context parallelism "
                f"(--decode-context-parallel-size {facts.decode_context_parallel_size}) "
                "attends over the new tokens' unquantized K/V, not the cache the plugin "
                f"writes. Serve with --decode-context-parallel-size 1, {KV_OFF_HINT}"
            )
    if q_method is not None and vllm_quantizes_query(facts):
        # Item 4: vLLM quantizes Q to FP8 in Attention.forward before the custom op;
        # our forward hook would receive an FP8 tensor (TypeError mid-request).
        out.append(
            f"{where}: with --kv-cache-dtype {facts.kv_cache_dtype} this backend takes an "
            "FP8 query (supports_quant_query_input): vLLM quantizes the query to FP8 before "
            f"the plugin's NVFP4 query quantization ({q_method}) could run. Serve with "
            "--kv-cache-dtype auto, choose a backend that takes a bf16 query with "
            f"--attention-backend, {Q_OFF_HINT}"
        )
    return out


def check_attention(facts: AttentionFacts, kv_method: str | None, q_method: str | None) -> None:
    """Raise ValueError listing every refusal for this layer (nothing when it can serve)."""
    reasons = attention_refusals(facts, kv_method, q_method)
    if reasons:
        raise ValueError("scalesweep: " + "\nscalesweep: ".join(reasons))


#: Environment variable choosing the Linear backend: auto | packed | dequant.
LINEAR_ENV = "SCALESWEEP_LINEAR"
LINEAR_CHOICES = ("auto", "packed", "dequant")


def linear_backend(
    act_method: str | None,
    device_type: str,
    capability: tuple[int, int] | None,
    params_dtype: str,
    cutlass_fp4: bool,
    cpu_packed: str | None = None,
    requested: str = "auto",
) -> tuple[str, str]:
    """(``cutlass`` | ``packed`` | ``dequant``, why) for one NVFP4 Linear layer.

    ``cutlass``: vLLM's ``cutlass_scaled_fp4_mm`` (FP4 tensor cores, sm_100/sm_120)
    for W4A4. Its output dtype is fp16 or bf16 only (vLLM's
    ``csrc/quantization/fp4/nvfp4_scaled_mm_kernels.cu`` raises "Unsupported output
    data type of nvfp4 mm" otherwise, and vLLM's own ``scaled_fp4_quant`` in
    ``vllm/_custom_ops.py`` asserts an fp16/bf16 input), so a float32 model takes
    the exact ``dequant`` fallback. ``params_dtype`` is the torch dtype's name
    (``"float32"``, ``"bfloat16"``, ...).

    ``packed``: our C++ NVFP4 GEMMs on the CPU (W4A16 and W4A4), weights kept at 4.5
    bits. ``cpu_packed`` is why they cannot run here ('' when they can, None when not
    asked). ``requested`` is ``$SCALESWEEP_LINEAR``: ``auto`` (the best that runs),
    ``packed`` (an error where it cannot run: no silent fallback when asked for) or
    ``dequant`` (decode the weights once at load, vLLM's own GEMM)."""
    if requested not in LINEAR_CHOICES:
        raise ValueError(f"{LINEAR_ENV}={requested!r}: choose one of {', '.join(LINEAR_CHOICES)}")
    if device_type == "cpu" and requested != "dequant":
        if cpu_packed == "":
            return "packed", "C++ NVFP4 GEMM, weights stay packed"
        if requested == "packed":
            raise ValueError(
                f"scalesweep: {LINEAR_ENV}=packed, but the packed CPU GEMM cannot run: "
                f"{cpu_packed or 'not available'}"
            )
    if requested == "packed" and device_type != "cpu":
        raise ValueError(f"scalesweep: {LINEAR_ENV}=packed runs on CPUs only, not {device_type}")
    if requested == "dequant":
        return "dequant", f"{LINEAR_ENV}=dequant"
    if device_type == "cpu" and cpu_packed:
        return "dequant", f"the packed CPU GEMM is unavailable ({cpu_packed})"
    if act_method is None:
        return "dequant", "weight-only (W4A16): nothing to quantize at run time"
    if device_type != "cuda":
        return "dequant", f"no FP4 GEMM on {device_type}"
    major = capability[0] if capability else -1
    if major not in (10, 12):
        return "dequant", f"compute capability {capability} has no FP4 tensor cores"
    if params_dtype not in ("float16", "bfloat16"):
        return "dequant", f"CUTLASS FP4 GEMM outputs only float16/bfloat16, model is {params_dtype}"
    if not cutlass_fp4:
        return "dequant", "this vLLM build has no CUTLASS FP4 GEMM (cutlass_fp4_supported)"
    return "cutlass", f"compute capability {major}.{capability[1]}, {params_dtype}"
