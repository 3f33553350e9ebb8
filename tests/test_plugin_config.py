"""Registration and load-time errors of the vLLM plugin (no engine runs here:
every error below is raised while vLLM builds its config, before any worker)."""

from __future__ import annotations

import json
import os
import shutil
from importlib.metadata import entry_points

import pytest
from plugin_support import tiny_checkpoint

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")


@pytest.fixture(autouse=True)
def _in_process(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_HOST_IP", "127.0.0.1")
    for var in ("SCALESWEEP_ACTIVATIONS", "SCALESWEEP_KV_CACHE", "SCALESWEEP_QUERY"):
        monkeypatch.delenv(var, raising=False)


def _llm(path, **kw):
    return vllm.LLM(
        str(path),
        enforce_eager=True,
        dtype="bfloat16",
        max_model_len=128,
        kv_cache_memory_bytes=64 << 20,
        **kw,
    )


def _copy(src, dst, edit_config=None, edit_meta=None, drop=()):
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit_meta:
        meta = json.loads((dst / "scalesweep.json").read_text())
        edit_meta(meta)
        (dst / "scalesweep.json").write_text(json.dumps(meta))
    for f in drop:
        os.remove(dst / f)
    return dst


@pytest.fixture(scope="module")
def w4a4(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory, "W4A4KV4Q4")


def test_entry_point_is_declared():
    eps = {ep.name: ep for ep in entry_points(group="vllm.general_plugins")}
    assert eps["scalesweep"].value == "scalesweep_vllm.plugin:register"
    assert eps["scalesweep"].load() is __import__("scalesweep_vllm.plugin").plugin.register


def test_register_is_idempotent_and_registers_the_name():
    from vllm.model_executor.layers.quantization import (
        QUANTIZATION_METHODS,
        get_quantization_config,
    )

    from scalesweep_vllm.plugin import register
    from scalesweep_vllm.plugin.config import ScaleSweepConfig

    register()
    register()
    assert QUANTIZATION_METHODS.count("scalesweep") == 1
    assert get_quantization_config("scalesweep") is ScaleSweepConfig


def test_override_claims_only_when_asked():
    from scalesweep_vllm.plugin.config import ScaleSweepConfig

    ct = {"quant_method": "compressed-tensors"}
    assert ScaleSweepConfig.override_quantization_method(ct, "scalesweep") == "scalesweep"
    assert ScaleSweepConfig.override_quantization_method(ct, None) is None
    assert ScaleSweepConfig.override_quantization_method(ct, "compressed-tensors") is None
    assert (
        ScaleSweepConfig.override_quantization_method({"quant_method": "gptq"}, "scalesweep")
        is None
    )


def test_vllm_resolves_our_method_only_with_the_flag(w4a4):
    from vllm.engine.arg_utils import EngineArgs

    ours = EngineArgs(str(w4a4), quantization="scalesweep").create_model_config()
    stock = EngineArgs(str(w4a4)).create_model_config()
    assert ours.quantization == "scalesweep"
    assert stock.quantization == "compressed-tensors"


def test_unsupported_vllm_version(monkeypatch, w4a4):
    from scalesweep_vllm.plugin import check_vllm_version

    check_vllm_version("0.32.0")
    check_vllm_version("0.33.0+cu130")
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32\.x, 0\.33\.x; this is vLLM 0\.31"):
        check_vllm_version("0.31.2")
    monkeypatch.setattr(vllm, "__version__", "0.34.0")
    with pytest.raises(RuntimeError, match="this is vLLM 0.34.0"):
        _llm(w4a4, quantization="scalesweep")
    monkeypatch.setenv("SCALESWEEP_ALLOW_UNTESTED_VLLM", "1")
    check_vllm_version("0.34.0")


def test_kv_asked_without_metadata(tmp_path, w4a4):
    ck = _copy(w4a4, tmp_path / "c", drop=("scalesweep.json",))
    os.environ["SCALESWEEP_KV_CACHE"] = "mse"
    try:
        with pytest.raises(ValueError, match="no scalesweep.json"):
            _llm(ck, quantization="scalesweep")
    finally:
        del os.environ["SCALESWEEP_KV_CACHE"]


def test_vectors_file_missing(tmp_path, w4a4):
    ck = _copy(w4a4, tmp_path / "c", drop=("scalesweep_vectors.safetensors",))
    with pytest.raises(ValueError, match="vectors_file .* not found"):
        _llm(ck, quantization="scalesweep")


@pytest.mark.parametrize("where", ["config", "metadata"])
def test_group_size_mismatch(tmp_path, w4a4, where):
    def cfg(q):
        q["config_groups"]["group_0"]["weights"]["group_size"] = 32

    def meta(m):
        m["group_size"] = 32

    ck = _copy(
        w4a4, tmp_path / "c", **({"edit_config": cfg} if where == "config" else {"edit_meta": meta})
    )
    with pytest.raises(ValueError, match="group_size is 32; NVFP4 blocks are 16"):
        _llm(ck, quantization="scalesweep")


def test_unsupported_target_layer_type(tmp_path, w4a4):
    def cfg(q):
        q["config_groups"]["group_0"]["targets"] = ["Embedding"]

    ck = _copy(w4a4, tmp_path / "c", edit_config=cfg)
    with pytest.raises(ValueError, match="unsupported layer type"):
        _llm(ck, quantization="scalesweep")


def test_unsupported_layer_class():
    """A layer kind the method does not implement (here vLLM's MoE layer) fails by name."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    from scalesweep_vllm.plugin.config import ScaleSweepConfig

    cfg = ScaleSweepConfig(
        {
            "quant_method": "compressed-tensors",
            "format": "nvfp4-pack-quantized",
            "config_groups": {
                "g": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 4,
                        "type": "float",
                        "strategy": "tensor_group",
                        "group_size": 16,
                    },
                }
            },
        }
    )
    cfg.maybe_update_config("/nonexistent-dir-for-test")
    layer = RoutedExperts.__new__(RoutedExperts)
    with pytest.raises(NotImplementedError, match="type RoutedExperts is not supported"):
        cfg.get_quant_method(layer, "model.layers.0.mlp.experts")


def test_bad_runtime_override(w4a4, monkeypatch):
    monkeypatch.setenv("SCALESWEEP_QUERY", "fastest")
    with pytest.raises(ValueError, match="SCALESWEEP_QUERY='fastest'"):
        _llm(w4a4, quantization="scalesweep")


# -- issue 13: load-time errors that name the file and the field --------------------


def test_model_without_quantization_config(tmp_path_factory):
    from plugin_support import tiny_model_dir

    with pytest.raises(ValueError, match="has no quantization_config in config.json") as exc:
        _llm(tiny_model_dir(tmp_path_factory), quantization="scalesweep")
    assert "scalesweep-quantize" in str(exc.value)


def test_invalid_metadata_json_names_the_file(tmp_path, w4a4):
    ck = _copy(w4a4, tmp_path / "c")
    (ck / "scalesweep.json").write_text('{"format_version": 1, "scheme": ')
    with pytest.raises(ValueError, match=r"scalesweep: .*scalesweep\.json is not valid JSON"):
        _llm(ck, quantization="scalesweep")


@pytest.mark.parametrize(
    "field,value,src",
    [
        ("num_kv_heads", 5, "num_key_value_heads"),
        ("num_heads", 3, "num_attention_heads"),
        ("head_dim", 32, "head_dim"),
    ],
)
def test_metadata_heads_checked_against_config(tmp_path, w4a4, field, value, src):
    """Checked when vLLM builds its config, before any weight (or vector) loads."""

    def meta(m):
        first = next(iter(m["attention"]))
        m["attention"][first][field] = value

    ck = _copy(w4a4, tmp_path / "c", edit_meta=meta)
    with pytest.raises(
        ValueError,
        match=rf"attention\..*\.{field} is {value} but config\.json "
        rf"has {src}",
    ) as exc:
        _llm(ck, quantization="scalesweep")
    assert "vectors" not in str(exc.value)


@pytest.fixture(scope="module")
def rope_bias_ckpt(tmp_path_factory):
    from plugin_support import rope_bias_checkpoint

    return rope_bias_checkpoint(tmp_path_factory)


def test_rope_bias_refused_for_an_architecture_it_cannot_serve(tmp_path, w4a4):
    """A Llama checkpoint claiming rope_bias (with the vectors it needs): the plugin
    rebuilds R_p b only for the architectures it checks, so it refuses at config time."""
    from safetensors.torch import load_file, save_file

    def meta(m):
        m["format_version"] = 2
        for e in m["attention"].values():
            e["rope_bias"] = ["k"]

    ck = _copy(w4a4, tmp_path / "c", edit_meta=meta)
    vec = load_file(ck / "scalesweep_vectors.safetensors")
    for k in [k for k in vec if k.endswith(".k_weight")]:
        vec[k.replace(".k_weight", ".k_bias")] = vec[k].clone()
    save_file(vec, ck / "scalesweep_vectors.safetensors")
    with pytest.raises(ValueError, match=r"around the rotary bias.*only for Qwen2ForCausalLM"):
        _llm(ck, quantization="scalesweep")


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m.update(format_version=1), "rope_bias needs format_version 2"),
        (
            lambda m: [e.update(rope_bias=["v"]) for e in m["attention"].values()],
            "rope_bias must list only 'q' and 'k'",
        ),
    ],
)
def test_rope_bias_metadata_checked(tmp_path, rope_bias_ckpt, edit, match):
    ck = _copy(rope_bias_ckpt, tmp_path / "c", edit_meta=edit)
    with pytest.raises(ValueError, match=match):
        _llm(ck, quantization="scalesweep")


def test_rope_bias_needs_its_bias_vectors(tmp_path, rope_bias_ckpt):
    from safetensors.torch import load_file, save_file

    ck = _copy(rope_bias_ckpt, tmp_path / "c")
    vec = load_file(ck / "scalesweep_vectors.safetensors")
    save_file(
        {k: v for k, v in vec.items() if not k.endswith(".q_bias")},
        ck / "scalesweep_vectors.safetensors",
    )
    with pytest.raises(ValueError, match=r"rope_bias needs vector .*\.q_bias"):
        _llm(ck, quantization="scalesweep")
