"""Q and K quantized around the rotary image of their projection bias
(scalesweep_vllm/rope_bias.py): the offsets, the quantizer's metadata, the
evaluation's accuracy gain, and the plugin against the evaluation on the real vLLM
CPU engine.

The independent reference for ``R_p b``: RoPE is linear, so the post-rotary key of
the model with its bias, less the key of the same model with the bias zeroed, is
``R_p b``. The residual the blocks see is the key of the zero-bias model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _quantize_models import calib_tokens, save_tiny_model
from safetensors.torch import load_file

from scalesweep_vllm import nvfp4
from scalesweep_vllm.quantize import quantize_model
from scalesweep_vllm.rope_bias import HFRope, attention_biases, quantize_around
from scalesweep_vllm.runtime import Part

#: Outlier channels like Qwen2.5's: a few low-frequency dims of b_k (and one of b_q)
#: far above the rest of K (|k| under ~1 in these tiny models).
K_OUTLIER, Q_OUTLIER = 30.0, 8.0


def _add_outlier_biases(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            d = attn.head_dim
            for lin, big in ((attn.k_proj, K_OUTLIER), (attn.q_proj, Q_OUTLIER)):
                b = torch.randn(lin.out_features, generator=g) * 0.1
                heads = lin.out_features // d
                for h in range(heads):  # the last dims of each half: lowest frequencies
                    b[h * d + d // 2 - 1] = big * (1 if h % 2 else -1)
                    b[h * d + d - 2] = 0.5 * big
                lin.bias.copy_(b.to(torch.bfloat16).to(lin.bias.dtype))  # bf16-exact


@pytest.fixture(scope="module")
def biased_qwen2(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    path = save_tiny_model("qwen2", tmp_path_factory.mktemp("qwen2_bias") / "m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    _add_outlier_biases(model)
    model.save_pretrained(path)
    return path


def _keys(model, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Post-rotary (q, k) of every layer, [B, H, T, D], via a registered attention
    function (transformers' own interface, not our code)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    got, sdpa = {}, ALL_ATTENTION_FUNCTIONS["sdpa"]

    def grab(module, q, k, v, mask, *a, **kw):
        got[module.layer_idx] = (q.detach().clone(), k.detach().clone())
        return sdpa(module, q, k, v, mask, *a, **kw)

    AttentionInterface.register("rope_bias_test_grab", grab)
    old = model.config._attn_implementation
    model.config._attn_implementation = "rope_bias_test_grab"
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        model.config._attn_implementation = old
    return got


def _without_biases(model, i: int):
    """A copy with layer ``i``'s q/k biases zeroed: layers before it, and so its input,
    are unchanged."""
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        m.model.layers[i].self_attn.q_proj.bias.zero_()
        m.model.layers[i].self_attn.k_proj.bias.zero_()
    return m


def test_quantize_around_is_its_definition():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 2, 32, generator=g) * 3).to(torch.bfloat16)
    off = torch.randn(5, 2, 32, generator=g) * 40
    part = Part("mse", 448 * 6 / 50.0)
    want = (part(x.float() - off) + off).to(torch.bfloat16)
    assert torch.equal(quantize_around(part, x, off), want)
    assert torch.equal(quantize_around(part, x, None), part(x))


def test_offsets_are_the_rotary_image_of_the_bias(biased_qwen2):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(biased_qwen2, dtype=torch.float32).eval()
    ids = calib_tokens(2, 40)
    with_b = _keys(model, ids)
    rope = HFRope(model)
    pos = torch.arange(ids.shape[1])[None]
    for i, layer in enumerate(model.model.layers):
        without_b = _keys(_without_biases(model, i), ids)
        biases = attention_biases(layer.self_attn)
        assert set(biases) == {"q", "k"}
        offs = rope.offsets(biases, pos, layer.self_attn.head_dim)
        for j, c in enumerate("qk"):
            want = (with_b[i][j] - without_b[i][j]).transpose(1, 2)  # [B, T, H, D]
            got = offs[c].expand_as(want)
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-5), (i, c)
            assert float(want.abs().max()) > 0.9 * (K_OUTLIER if c == "k" else Q_OUTLIER)


def _quantize(src, out, **kw):
    return quantize_model(
        str(src),
        str(out),
        objective="wmse",
        calib=calib_tokens(8, 48),
        device="cpu",
        progress=False,
        **kw,
    )


@pytest.fixture(scope="module")
def ckpts(biased_qwen2, tmp_path_factory):
    root = tmp_path_factory.mktemp("rope_bias_ckpts")
    out = {}
    for mode in ("auto", "off"):
        out[mode] = root / mode
        _quantize(biased_qwen2, out[mode], scheme="W4A4KV4Q4", rope_bias=mode)
    return out


def test_quantizer_records_residual_scales_and_biases(biased_qwen2, ckpts):
    from transformers import AutoModelForCausalLM

    # as the quantizer loads it: bf16 weights, computed in float32
    model = AutoModelForCausalLM.from_pretrained(biased_qwen2, dtype=torch.bfloat16).float().eval()
    tokens = calib_tokens(8, 48)
    full = _keys(model, tokens)
    meta = json.loads((ckpts["auto"] / "scalesweep.json").read_text())
    vec = load_file(ckpts["auto"] / "scalesweep_vectors.safetensors")
    assert meta["format_version"] == 2
    for i, layer in enumerate(model.model.layers):
        res = _keys(_without_biases(model, i), tokens)
        e = meta["attention"][f"model.layers.{i}.self_attn"]
        assert e["rope_bias"] == ["k", "q"]
        for j, c in enumerate("qk"):
            r_amax = float(res[i][j].abs().max())
            assert e[f"{c}_residual_amax"] == pytest.approx(r_amax, rel=1e-5)
            assert e[f"{c}_amax"] == pytest.approx(float(full[i][j].abs().max()), rel=1e-5)
            want = float(nvfp4.global_scale(torch.tensor(r_amax), meta["global_scale_convention"]))
            assert e[f"{c}_global_scale"] == pytest.approx(want, rel=1e-5)
            lin = getattr(layer.self_attn, f"{c}_proj")
            b = vec[f"model.layers.{i}.self_attn.{c}_bias"]
            assert torch.equal(b, lin.bias.detach().float().view(-1, layer.self_attn.head_dim))
    off = json.loads((ckpts["off"] / "scalesweep.json").read_text())
    assert off["format_version"] == 1
    assert all("rope_bias" not in e for e in off["attention"].values())


def test_rope_bias_modes_refuse_what_cannot_be_served(biased_qwen2, tmp_path):
    llama = save_tiny_model("llama", tmp_path / "llama")
    with pytest.raises(ValueError, match="no q_proj/k_proj bias"):
        _quantize(llama, tmp_path / "o1", scheme="W4A4KV4Q4", rope_bias="on", dry_run=False)
    with pytest.raises(ValueError, match="auto, on or off"):
        _quantize(biased_qwen2, tmp_path / "o2", scheme="W4A4KV4", rope_bias="yes")
    rep = _quantize(biased_qwen2, None, scheme="W4A16", rope_bias="auto", in_memory=True)
    assert rep["header"]["rope_bias"] is False  # nothing quantized at run time


def test_rope_bias_cuts_the_error_of_4bit_qk(biased_qwen2, ckpts):
    """The same checkpoint served with and without the correction: logit KL to the
    float32 model falls by far (K_OUTLIER rounds the rest of its blocks to zero)."""
    from transformers import AutoModelForCausalLM

    from scalesweep_vllm.evaluate import Checkpoint, build_model

    base = AutoModelForCausalLM.from_pretrained(biased_qwen2, dtype=torch.float32).eval()
    ids = calib_tokens(4, 64, seed=7)
    with torch.no_grad():
        ref = torch.log_softmax(base(ids).logits.float(), -1)

    def kl(path):
        m = build_model(Checkpoint.from_dir(path), dtype=torch.float32)
        with torch.no_grad():
            lp = torch.log_softmax(m(ids).logits.float(), -1)
        return float((ref.exp() * (ref - lp)).sum(-1).mean())

    on, off = kl(ckpts["auto"]), kl(ckpts["off"])
    print(f"logit KL to fp32: rope_bias {on:.4f}, without {off:.4f}")
    assert on < 0.5 * off


def test_evaluation_refuses_missing_bias_vectors(ckpts, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from scalesweep_vllm.evaluate import Checkpoint, build_model

    bad = tmp_path / "bad"
    shutil.copytree(ckpts["auto"], bad)
    vec = load_file(bad / "scalesweep_vectors.safetensors")
    save_file(
        {k: v for k, v in vec.items() if not k.endswith("k_bias")},
        bad / "scalesweep_vectors.safetensors",
    )
    with pytest.raises(ValueError, match="k_bias"):
        build_model(Checkpoint.from_dir(bad), dtype=torch.float32)
