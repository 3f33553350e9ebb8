"""Reading NVIDIA ModelOpt NVFP4 exports as vLLM serves them
(:mod:`scalesweep_vllm.evaluate.modelopt`), on a tiny hand-written checkpoint whose
packing and expected values are computed here, independently of the package."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from scalesweep_vllm.evaluate.model import Checkpoint, build_model, runtime_settings

HIDDEN, INTER, VOCAB = 32, 64, 64
LINEARS = {  # leaf -> (out, in)
    "self_attn.q_proj": (32, 32),
    "self_attn.k_proj": (16, 32),
    "self_attn.v_proj": (16, 32),
    "self_attn.o_proj": (32, 32),
    "mlp.gate_proj": (64, 32),
    "mlp.up_proj": (64, 32),
    "mlp.down_proj": (32, 64),
}
# q/k/v: different power-of-two weight_scale_2 (vLLM keeps the max, 2**-7) and different
# input_scale; gate/up: non-power-of-two weight_scale_2 (1/max is inexact in fp32).
WS2 = {
    "self_attn.q_proj": 2.0**-9,
    "self_attn.k_proj": 2.0**-7,
    "self_attn.v_proj": 2.0**-8,
    "self_attn.o_proj": 0.0021,
    "mlp.gate_proj": 0.0011,
    "mlp.up_proj": 0.0013,
    "mlp.down_proj": 2.0**-10,
}
IN_SCALE = {
    "self_attn.q_proj": 0.003,
    "self_attn.k_proj": 0.005,
    "self_attn.v_proj": 0.004,
    "self_attn.o_proj": 0.0007,
    "mlp.gate_proj": 0.002,
    "mlp.up_proj": 0.0017,
    "mlp.down_proj": 0.011,
}
GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]]
GROUPS += [["mlp.gate_proj", "mlp.up_proj"], ["self_attn.o_proj"], ["mlp.down_proj"]]
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
PFX = "model.layers.0."


def _pack(codes: list[list[int]]) -> torch.Tensor:
    """Two 4-bit codes per byte, the even element in the low nibble (vLLM's order)."""
    rows = [[r[i] | (r[i + 1] << 4) for i in range(0, len(r), 2)] for r in codes]
    return torch.tensor(rows, dtype=torch.uint8)


def _value(code: int) -> float:
    return -E2M1[code & 7] if code & 8 else E2M1[code & 7]


def _write(folder, algo="NVFP4", in_config=True, w4a16_groups=False, hf_file=True):
    """A one-layer Llama in ModelOpt's export layout; returns the codes and fp8 scales."""
    from transformers import LlamaConfig

    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, raw = {}, {}
    for leaf, (n, k) in LINEARS.items():
        codes = torch.randint(0, 16, (n, k), generator=g).tolist()
        scale = (torch.rand(n, k // 16, generator=g) * 400 + 1).to(torch.float8_e4m3fn)
        tensors[PFX + leaf + ".weight"] = _pack(codes)
        tensors[PFX + leaf + ".weight_scale"] = scale
        tensors[PFX + leaf + ".weight_scale_2"] = torch.tensor(WS2[leaf], dtype=torch.float32)
        tensors[PFX + leaf + ".input_scale"] = torch.tensor(IN_SCALE[leaf], dtype=torch.float32)
        raw[leaf] = (codes, scale)
    tensors["model.embed_tokens.weight"] = torch.randn(VOCAB, HIDDEN, generator=g).bfloat16()
    for norm in (PFX + "input_layernorm", PFX + "post_attention_layernorm", "model.norm"):
        tensors[norm + ".weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"))
    cfg = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=VOCAB,
        tie_word_embeddings=True,
    ).to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    if in_config:
        act = None if w4a16_groups else {"dynamic": False, "num_bits": 4, "type": "float"}
        cfg["quantization_config"] = {
            "config_groups": {
                "group_0": {
                    "input_activations": act,
                    "weights": {"dynamic": False, "num_bits": 4, "type": "float"},
                    "targets": ["Linear"],
                }
            },
            "ignore": ["lm_head", "model.embed_tokens"],
            "quant_algo": algo,
            "quant_method": "modelopt",
        }
    (folder / "config.json").write_text(json.dumps(cfg))
    if hf_file:
        quant = {"quant_algo": algo, "kv_cache_quant_algo": None, "group_size": 16}
        quant["exclude_modules"] = ["lm_head", "model.embed_tokens"]
        hf = {"producer": {"name": "modelopt"}, "quantization": quant}
        (folder / "hf_quant_config.json").write_text(json.dumps(hf))
    return raw


def _group_max(table, leaf) -> torch.Tensor:
    (group,) = [g for g in GROUPS if leaf in g]
    return torch.tensor([table[x] for x in group], dtype=torch.float32).max()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def test_w4a4_weights_and_input_scales_as_vllm(tmp_path):
    raw = _write(tmp_path / "ckpt")
    ckpt = Checkpoint.from_dir(tmp_path / "ckpt")
    assert ckpt.config.quantization_config["quant_method"] == "modelopt"
    assert ckpt.quantized_linears() == sorted(PFX + leaf for leaf in LINEARS)
    model = build_model(ckpt)
    parts = model._scalesweep_linear_parts
    for leaf, (codes, scale) in raw.items():
        p = PFX + leaf
        assert torch.equal(ckpt.tensors[p + ".weight_scale"].view(torch.uint8), _bits(scale))
        m = _group_max(WS2, leaf)  # vLLM: max over the fused shards, a decode factor
        g = 1.0 / m  # ours: the fp32 encode factor
        assert torch.equal(_bits(ckpt.tensors[p + ".weight_global_scale"]), _bits(g.reshape(1)))
        # vLLM's input_global_scale_inv = fp32(1 / max input_scale), same on every shard,
        # so build_model's largest-of-group rule uses exactly it
        inv = 1.0 / _group_max(IN_SCALE, leaf)
        assert torch.equal(_bits(ckpt.tensors[p + ".input_global_scale"]), _bits(inv.reshape(1)))
        assert torch.equal(_bits(parts[p].global_scale), _bits(inv))
        q = torch.tensor([[_value(c) for c in row] for row in codes])
        v = scale.float().repeat_interleave(16, dim=1)
        ours = ((v / g) * q).bfloat16()  # compressed-tensors' decode
        vllm = (q * (v * m)).bfloat16()  # vLLM's dequantize_to_dtype
        got = model.get_submodule(p).weight.detach()
        assert torch.equal(_bits(got), _bits(ours)), leaf
        if float(m).hex().startswith("0x1.0000000000000p"):  # power of two: identical
            assert torch.equal(_bits(got), _bits(vllm)), leaf
        else:  # at most one bf16 ulp apart where the fp32 roundings differ
            ulp = _bits(got).int() - _bits(vllm).int()
            assert ulp.abs().max() <= 1, leaf
    assert runtime_settings(ckpt, "W4A4").activations == "absmax"


def test_hf_quant_config_alone(tmp_path):
    _write(tmp_path / "ckpt", in_config=False)
    ckpt = Checkpoint.from_dir(tmp_path / "ckpt")
    assert ckpt.config.quantization_config["quantization"]["quant_algo"] == "NVFP4"
    assert ckpt.has_input_scales()
    build_model(ckpt)


@pytest.mark.parametrize("algo, groups", [("W4A16_NVFP4", False), ("NVFP4", True)])
def test_w4a16_checkpoint_has_no_input_scales(tmp_path, algo, groups):
    """vLLM serves W4A16 for W4A16_NVFP4, and for NVFP4 whose config_groups have no
    input_activations, dropping input_scale."""
    _write(tmp_path / "ckpt", algo=algo, w4a16_groups=groups)
    ckpt = Checkpoint.from_dir(tmp_path / "ckpt")
    assert not ckpt.has_input_scales()
    assert not any(k.endswith(("input_scale", "weight_scale_2")) for k in ckpt.tensors)
    with pytest.raises(ValueError, match="needs activations"):
        runtime_settings(ckpt, "W4A4")


@pytest.mark.parametrize("in_config", [True, False])
def test_non_nvfp4_quant_algo_is_rejected(tmp_path, in_config):
    _write(tmp_path / "ckpt", algo="FP8", in_config=in_config)
    with pytest.raises(ValueError, match="quant_algo 'FP8' is not NVFP4"):
        Checkpoint.from_dir(tmp_path / "ckpt")
