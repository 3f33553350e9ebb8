"""The offline quantizer on tiny random Llama / Qwen2 / Qwen3 models.

Checks against independent references: compressed-tensors' decompression and stock
transformers' loading (bit-exact bf16 weights), ``sweep.sweep_scales`` on the same
weights with E[x^2] measured here by plain hooks on the full model, global scales
from ``nvfp4.global_scale`` on amaxes measured here, post-rotary q/k recomputed here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _quantize_models import calib_tokens, save_tiny_model
from safetensors.torch import load_file

from scalesweep_vllm import nvfp4, sweep
from scalesweep_vllm.quantize import quantize_model
from scalesweep_vllm.quantize.calibration import WMSE_FLOOR

ARCHS = ["llama", "qwen2", "qwen3"]
PARTNERS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
#: Relative logit MSE bounds (tiny random models: activation noise dominates at W4A4).
LOGIT_BOUND = {"W4A16": 0.1, "W4A4": 0.2}
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _decode(packed: torch.Tensor, scale: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Independent NVFP4 decode: nibbles (low first) -> E2M1, times (fp8 scale / G) in fp32."""
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2).long()
    vals = E2M1[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
    s = (scale.to(torch.float32) / g.to(torch.float32)).repeat_interleave(16, dim=-1)
    return (s * vals).to(torch.bfloat16)


def _source(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


def _input_stats(model, tokens: torch.Tensor, batch: int):
    """E[x^2] and max|x| of every Linear's input, by forward hooks on the full fp32 model."""
    model = model.to(torch.float32)
    sums, counts, amax, hooks = {}, {}, {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):

            def hook(_m, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                sums[name] = sums.get(name, 0) + (x * x).sum(0, dtype=torch.float64)
                counts[name] = counts.get(name, 0) + x.shape[0]
                amax[name] = max(amax.get(name, 0.0), float(x.abs().max()))

            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for i in range(0, tokens.shape[0], batch):
            model(input_ids=tokens[i : i + batch], use_cache=False)
    for h in hooks:
        h.remove()
    return {k: (sums[k] / counts[k]).float() for k in sums}, amax


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{arch: (source dir, checkpoint dir, report)} for W4A4KV4Q4 / wmse."""
    root = tmp_path_factory.mktemp("quantize")
    out = {}
    for arch in ARCHS:
        src = save_tiny_model(arch, root / f"src-{arch}")
        dst = root / f"ckpt-{arch}"
        rep = quantize_model(
            src,
            dst,
            scheme="W4A4KV4Q4",
            calib=calib_tokens(),
            num_samples=8,
            seq_len=48,
            progress=False,
        )
        out[arch] = (src, dst, rep)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_layout(built, arch):
    src, dst, rep = built[arch]
    model = _source(src)
    sd = load_file(dst / "model.safetensors")
    cfg = json.loads((dst / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert cfg["dtype"] == "bfloat16"
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == "nvfp4-pack-quantized"
    assert qc["quantization_status"] == "compressed"
    assert qc.get("kv_cache_scheme") is None
    grp = qc["config_groups"]["group_0"]
    assert grp["targets"] == ["Linear"]
    for args in (grp["weights"], grp["input_activations"]):
        assert (args["num_bits"], args["type"], args["strategy"], args["group_size"]) == (
            4,
            "float",
            "tensor_group",
            16,
        )
        assert args["symmetric"] is True and args["scale_dtype"] == "torch.float8_e4m3fn"
    assert grp["weights"]["dynamic"] is False and grp["input_activations"]["dynamic"] == "local"
    assert qc["ignore"][0] == "lm_head"
    # an index even for one shard: vLLM then loads only the listed files, never the
    # runtime vectors beside them as weights
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {k: "model.safetensors" for k in sd}
    assert (dst / "scalesweep_vectors.safetensors").is_file()

    n_quant = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if name in qc["ignore"]:
            assert sd[f"{name}.weight"].dtype == torch.bfloat16
            assert f"{name}.weight_packed" not in sd
            continue
        n, k = mod.weight.shape
        assert k % 16 == 0
        assert sd[f"{name}.weight_packed"].dtype == torch.uint8
        assert sd[f"{name}.weight_packed"].shape == (n, k // 2)
        assert sd[f"{name}.weight_scale"].dtype == torch.float8_e4m3fn
        assert sd[f"{name}.weight_scale"].shape == (n, k // 16)
        for g in ("weight_global_scale", "input_global_scale"):
            assert sd[f"{name}.{g}"].dtype == torch.float32 and sd[f"{name}.{g}"].shape == (1,)
        assert f"{name}.weight" not in sd
        if mod.bias is not None:
            assert torch.equal(sd[f"{name}.bias"], mod.bias.detach())
        n_quant += 1
    assert n_quant == len(rep["layers"]) > 0
    # everything that is not a quantized Linear is the source tensor in bf16
    for name, t in model.state_dict().items():
        if name in sd:
            assert sd[name].dtype == torch.bfloat16 and torch.equal(sd[name], t), name

    meta = json.loads((dst / "scalesweep.json").read_text())
    assert meta["scheme"] == "W4A4KV4Q4" and meta["objective"] == "wmse"
    assert meta["bounds_version"] == sweep.BOUNDS_VERSION
    assert meta["kv_cache"] == {"enabled": True, "method": "wmse"}
    assert meta["query"] == {"enabled": True, "method": "wmse"}
    assert meta["ignore"] == qc["ignore"]
    vec = load_file(dst / meta["vectors_file"])
    assert len(meta["attention"]) == 2
    for prefix, a in meta["attention"].items():
        assert (a["num_heads"], a["num_kv_heads"], a["head_dim"]) == (4, 2, 16)
        assert vec[f"{prefix}.q_weight"].shape == (4, 16)
        assert vec[f"{prefix}.k_weight"].shape == (2, 16)
        assert vec[f"{prefix}.v_weight"].shape == (2, 16)
        # v weight: per KV head, the squared input-channel norms of W_O over its query heads
        w_o = model.get_submodule(f"{prefix}.o_proj").weight.float()
        ref_v = w_o.square().sum(0).view(2, 2, 16).sum(1)
        torch.testing.assert_close(vec[f"{prefix}.v_weight"], ref_v, rtol=1e-5, atol=0)
    for row in rep["layers"]:
        w = model.get_submodule(row["name"]).weight.float()
        torch.testing.assert_close(vec[f"{row['name']}.input_weight"], w.square().sum(0))
    for f in ("quantization_report.json", "quantization_report.txt", "generation_config.json"):
        assert (dst / f).is_file()
    assert not list(dst.parent.glob(f".{dst.name}.tmp-*"))


def test_odd_in_features_left_bf16_and_listed(built):
    src, dst, rep = built["llama"]
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    odd = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]  # in_features 120
    for name in odd:
        assert name in qc["ignore"] and name in rep["ignored"]
        assert "120" in rep["ignored"][name]
    assert "model.layers.0.mlp.down_proj" in (dst / "quantization_report.txt").read_text()


@pytest.mark.parametrize("arch", ARCHS)
def test_stock_decoders_reproduce_reference_exactly(built, arch):
    """compressed-tensors' decompressor and transformers' loader give exactly our decode."""
    from compressed_tensors.compressors import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    _, dst, rep = built[arch]
    sd = load_file(dst / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(
        dst, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    scheme = preset_name_to_scheme("NVFP4", ["Linear"])
    for row in rep["layers"]:
        p = row["name"]
        ref = _decode(
            sd[f"{p}.weight_packed"], sd[f"{p}.weight_scale"], sd[f"{p}.weight_global_scale"]
        )
        got = loaded.get_submodule(p).weight
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, ref), p
        local = {k[len(p) + 1 :]: v for k, v in sd.items() if k.startswith(p + ".")}
        dec = NVFP4PackedCompressor.decompress(local, scheme)["weight"]
        assert torch.equal(dec.to(torch.bfloat16), ref), p


@pytest.mark.parametrize("arch", ARCHS)
def test_scales_are_sweep_scales_with_shared_global_scales(built, arch):
    """Block scales == sweep_scales(W, G, E[x^2]); G, G_a from amaxes measured here."""
    src, dst, _ = built[arch]
    sd = load_file(dst / "model.safetensors")
    model = _source(src)
    weights = {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    ex2, amax = _input_stats(model, calib_tokens(), batch=4096 // 48)
    groups = {}
    for p in (k[: -len(".weight_packed")] for k in sd if k.endswith(".weight_packed")):
        parent, _, leaf = p.rpartition(".")
        key = next((f"{parent}:{'+'.join(ps)}" for ps in PARTNERS if leaf in ps), p)
        groups.setdefault(key, []).append(p)
    assert any(len(g) == 3 for g in groups.values()) and any(len(g) == 2 for g in groups.values())
    conv = json.loads((dst / "scalesweep.json").read_text())["global_scale_convention"]
    assert conv == "compressed-tensors"  # the default
    for members in groups.values():
        g_w = nvfp4.global_scale(max(float(weights[p].float().abs().max()) for p in members), conv)
        g_a = nvfp4.global_scale(max(amax[p] for p in members), conv)
        for p in members:
            assert torch.equal(sd[f"{p}.weight_global_scale"], g_w), p
            torch.testing.assert_close(sd[f"{p}.input_global_scale"], g_a, rtol=1e-6, atol=0)
            w = ex2[p] + WMSE_FLOOR * ex2[p].mean()
            ref = sweep.sweep_scales(weights[p], g_w, w)
            got = sd[f"{p}.weight_scale"]
            same = got.view(torch.uint8) == ref.view(torch.uint8)
            assert bool(same.all()), f"{p}: {int((~same).sum())} of {same.numel()} scales differ"


def test_post_rotary_query_key_statistics(built):
    """q/k amax and E[q^2] per head recomputed here from q_proj/k_proj + rotary (Llama)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    src, dst, _ = built["llama"]
    model = _source(src).to(torch.float32)
    meta = json.loads((dst / "scalesweep.json").read_text())
    vec = load_file(dst / "scalesweep_vectors.safetensors")
    seen = {}

    def hook(mod, args, kwargs, name):
        h = kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        shp = (*h.shape[:-1], -1, 16)
        q = mod.q_proj(h).view(shp).transpose(1, 2)
        k = mod.k_proj(h).view(shp).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        s = seen.setdefault(name, {"q2": 0, "k2": 0, "n": 0, "qa": 0.0, "ka": 0.0})
        s["q2"] = s["q2"] + (q * q).sum((0, 2), dtype=torch.float64)
        s["k2"] = s["k2"] + (k * k).sum((0, 2), dtype=torch.float64)
        s["n"] += q.shape[0] * q.shape[2]
        s["qa"], s["ka"] = max(s["qa"], float(q.abs().max())), max(s["ka"], float(k.abs().max()))

    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw, n=f"model.layers.{i}.self_attn": hook(m, a, kw, n), with_kwargs=True
        )
    toks = calib_tokens()
    with torch.no_grad():
        model(input_ids=toks, use_cache=False)
    for name, s in seen.items():
        a = meta["attention"][name]
        conv = meta["global_scale_convention"]
        g_q, g_k = nvfp4.global_scale(s["qa"], conv), nvfp4.global_scale(s["ka"], conv)
        assert a["q_global_scale"] == pytest.approx(float(g_q), rel=1e-5)
        assert a["k_global_scale"] == pytest.approx(float(g_k), rel=1e-5)
        q2, k2 = (s["q2"] / s["n"]).float(), (s["k2"] / s["n"]).float()
        torch.testing.assert_close(
            vec[f"{name}.k_weight"], q2.view(2, 2, 16).sum(1), rtol=1e-4, atol=0
        )
        torch.testing.assert_close(
            vec[f"{name}.q_weight"], k2.repeat_interleave(2, 0), rtol=1e-4, atol=0
        )


def _logit_error(ckpt: Path, ref_logits: torch.Tensor, toks: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    with torch.no_grad():
        out = m(input_ids=toks).logits.float()
    return float((out - ref_logits).square().mean() / ref_logits.var())


@pytest.mark.parametrize("scheme", ["W4A16", "W4A4"])
def test_logits_close_and_scalesweep_beats_absmax(tmp_path, scheme):
    """Relative logit MSE vs the source: small for all, smaller for ScaleSweep on average."""
    toks = calib_tokens(n=4, seq_len=32, seed=7)  # held out: not the calibration tokens
    errs = {"absmax": [], "mse": [], "wmse": []}
    for arch in ARCHS:
        for seed in (0, 1):
            src = save_tiny_model(arch, tmp_path / f"{arch}{seed}", seed=seed)
            with torch.no_grad():
                ref = _source(src)(input_ids=toks).logits.float()
            for obj in errs:
                dst = tmp_path / f"{arch}{seed}-{obj}"
                quantize_model(
                    src,
                    dst,
                    scheme=scheme,
                    objective=obj,
                    calib=calib_tokens(),
                    num_samples=8,
                    seq_len=48,
                    progress=False,
                )
                errs[obj].append(_logit_error(dst, ref, toks))
    mean = {k: sum(v) / len(v) for k, v in errs.items()}
    print(scheme, {k: [round(e, 4) for e in v] for k, v in errs.items()}, mean)
    assert all(e < LOGIT_BOUND[scheme] for v in errs.values() for e in v), errs
    assert mean["wmse"] < mean["absmax"], mean
    assert mean["mse"] < mean["absmax"], mean
