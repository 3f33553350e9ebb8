"""The op-by-op check of test_plugin_w4a4kv4q4.py on a bf16 engine (the serving
dtype): every quantized Linear, K, V and Q the running engine computes equals the
recomputation from the checkpoint files."""

from __future__ import annotations

import os

import pytest
from plugin_support import tiny_checkpoint
from test_plugin_w4a4kv4q4 import test_every_quantized_op_matches_the_checkpoint  # noqa: F401

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory, "W4A4KV4Q4")


@pytest.fixture(scope="module")
def engine(ckpt):
    saved = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_HOST_IP")}
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_HOST_IP"] = "127.0.0.1"
    llm = vllm.LLM(
        str(ckpt),
        quantization="scalesweep",
        enforce_eager=True,
        dtype="bfloat16",
        max_model_len=256,
        kv_cache_memory_bytes=64 << 20,
        seed=0,
    )
    yield llm
    del llm
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
