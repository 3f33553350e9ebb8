"""The op-by-op check of test_plugin_w4a4kv4q4.py on a bf16 engine (the serving
dtype): every quantized Linear, K, V and Q the running engine computes equals the
recomputation from the checkpoint files."""

from __future__ import annotations

import pytest
from plugin_support import cpu_engine, tiny_checkpoint
from test_plugin_w4a4kv4q4 import test_every_quantized_op_matches_the_checkpoint  # noqa: F401

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory, "W4A4KV4Q4")


@pytest.fixture(scope="module")
def engine(ckpt):
    with cpu_engine(ckpt, "bfloat16") as llm:
        yield llm
