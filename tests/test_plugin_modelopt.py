"""NVIDIA ModelOpt NVFP4 exports served by ``--quantization scalesweep`` (issue 27):
their weights as they are, runtime ScaleSweep of Linear inputs, K/V and Q.

The checkpoint is written here in ModelOpt's export layout (``hf_quant_config.json``;
per Linear ``weight`` uint8, ``weight_scale`` fp8, ``weight_scale_2`` and
``input_scale`` fp32 decode factors) by a transcription of ModelOpt's max-calibrated
NVFP4 quantizer, independent of the package; q/k/v keep their own, different
``weight_scale_2`` and one MLP is excluded by a wildcard. The reference decodes the
weights with ModelOpt's own formula (``NVFP4QTensor.dequantize``: ``e2m1 * (fp8 *
weight_scale_2)`` in fp32), checked bit for bit against nvidia-modelopt itself where
its virtual environment exists (scripts/setup-peers.sh).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from plugin_support import PROMPTS, TINY, compare_teacher_forced, cpu_engine, tiny_model_dir
from safetensors.torch import load_file, save_file

from scalesweep_vllm.plugin.metadata import CheckpointError
from scalesweep_vllm.plugin.modelopt import (
    expand_excludes,
    is_modelopt_config,
    matches_exclude,
    parse_modelopt,
)

ROOT = Path(__file__).resolve().parents[1]
MODELOPT_PY = ROOT / ".venv-modelopt" / "bin" / "python"
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
#: nvidia-modelopt 0.47 ``qtensor/nvfp4_tensor.py`` ``e2m1_values`` (code 8 is +0).
MODELOPT_TABLE = E2M1 + [0.0] + [-v for v in E2M1[1:]]
EXCLUDE = ["lm_head", "model.embed_tokens", "model.layers.1.mlp*"]
MAX_TOKENS = 8
#: float32 engine, as test_plugin_w4a4kv4q4.py (whose comment explains why: in bf16 an
#: ulp crossing an FP4 rounding boundary moves a value by a whole step). What differs
#: from the reference: the packed GEMM's summation order and its alpha (vLLM's
#: input_scale * weight_scale_2 against the reference's 1 / G_a times the weight).
MEAN_TOL = 2e-3
MAX_TOL = 0.05


# ---------------------------------------------------------------------------
# ModelOpt's format, transcribed (no package code)
# ---------------------------------------------------------------------------


def _mo_quantize(w: torch.Tensor):
    """ModelOpt's NVFP4 max quantization of one weight: ``weight_scale_2 = amax /
    (6 * 448)``, block scale ``fp8(block_amax / 6 / weight_scale_2)``, codes rounded
    to the nearest E2M1 value; packed two per byte, the even element low."""
    w = w.float()
    n, k = w.shape
    ws2 = w.abs().max() / (6 * 448)
    blocks = w.reshape(n, k // 16, 16)
    s8 = (blocks.abs().amax(-1) / 6 / ws2).clamp(max=448).to(torch.float8_e4m3fn)
    scale = (s8.float() * ws2).unsqueeze(-1)
    x = torch.where(scale > 0, blocks / scale, torch.zeros_like(blocks))
    table = torch.tensor(E2M1)
    mag = (x.abs().unsqueeze(-1) - table).abs().argmin(-1)
    codes = (mag | ((x < 0) & (mag > 0)).long() * 8).reshape(n, k)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    return packed, s8, ws2.reshape(()).to(torch.float32)


def mo_dequantize(packed, scale, ws2, dtype):
    """``NVFP4QTensor.dequantize`` (non-fast path): unpack, look up, times
    ``fp8 * weight_scale_2`` per block in fp32, cast once."""
    codes = torch.stack((packed & 0xF, packed >> 4), -1).flatten(-2).long()
    vals = torch.tensor(MODELOPT_TABLE)[codes]
    per_block = scale.float() * ws2.float()
    out = vals.view(*vals.shape[:-1], -1, 16) * per_block.unsqueeze(-1)
    return out.reshape(vals.shape).to(dtype)


def _linears(model):
    return {
        n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n
    }


@torch.no_grad()
def _calibrate(model, tok):
    """Per Linear the input amax, per attention module the q/k/v output amax."""
    amax = {}

    def hook(name, kind):
        def f(_m, args, out):
            t = args[0] if kind == "in" else out
            amax[(name, kind)] = max(amax.get((name, kind), 0.0), float(t.abs().max()))

        return f

    handles = []
    for n, m in _linears(model).items():
        handles.append(m.register_forward_hook(hook(n, "in")))
        handles.append(m.register_forward_hook(hook(n, "out")))
    for p in PROMPTS:
        model(**tok(p, return_tensors="pt"))
    for h in handles:
        h.remove()
    return amax


def write_modelopt_checkpoint(src: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    amax = _calibrate(model, tok)
    sd = {k: v for k, v in load_file(str(src / "model.safetensors")).items()}
    tensors = {}
    for name in _linears(model):
        w = sd.pop(name + ".weight")
        if matches_exclude(name, tuple(expand_excludes(EXCLUDE))):
            tensors[name + ".weight"] = w
            continue
        packed, s8, ws2 = _mo_quantize(w)
        tensors[name + ".weight"] = packed
        tensors[name + ".weight_scale"] = s8
        tensors[name + ".weight_scale_2"] = ws2
        tensors[name + ".input_scale"] = torch.tensor(amax[(name, "in")] / (6 * 448))
    tensors.update(sd)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config", None)  # the legacy layout: hf_quant_config.json only
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(out)
    hf = {
        "producer": {"name": "modelopt", "version": "0.47.0"},
        "quantization": {
            "quant_algo": "NVFP4",
            "kv_cache_quant_algo": None,
            "group_size": 16,
            "exclude_modules": EXCLUDE,
        },
    }
    (out / "hf_quant_config.json").write_text(json.dumps(hf, indent=4))
    # scalesweep.json beside it: the calibrated Q/K/V encode scales (post-rotary amax
    # bounded by sqrt(2) x the projection's amax) and the runtime methods.
    heads, kv, dim = TINY["num_attention_heads"], TINY["num_key_value_heads"], TINY["head_dim"]
    attention = {}
    for i in range(TINY["num_hidden_layers"]):
        a = f"model.layers.{i}.self_attn"
        g = {c: 6 * 448 / amax[(f"{a}.{c}_proj", "out")] for c in "qkv"}
        attention[a] = {
            "num_heads": heads,
            "num_kv_heads": kv,
            "head_dim": dim,
            "q_global_scale": g["q"] / 2**0.5,
            "k_global_scale": g["k"] / 2**0.5,
            "v_global_scale": g["v"],
        }
    meta = {
        "format_version": 1,
        "scheme": "W4A4KV4Q4",
        "group_size": 16,
        "activations": {"enabled": True, "method": "mse"},
        "kv_cache": {"enabled": True, "method": "mse"},
        "query": {"enabled": True, "method": "mse"},
        "attention": attention,
    }
    (out / "scalesweep.json").write_text(json.dumps(meta, indent=2))
    return out


# ---------------------------------------------------------------------------
# Config: no engine
# ---------------------------------------------------------------------------

CONFIG_JSON_FORM = {  # ModelOpt >= 0.31 writes this into config.json
    "config_groups": {
        "group_0": {
            "input_activations": {"dynamic": False, "num_bits": 4, "type": "float"},
            "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
            "targets": ["Linear"],
        }
    },
    "ignore": ["lm_head", "model.embed_tokens"],
    "quant_algo": "NVFP4",
    "producer": {"name": "modelopt", "version": "0.47.0"},
    "quant_method": "modelopt",
}
HF_FILE_FORM = {  # hf_quant_config.json; vLLM names it modelopt_fp4
    "producer": {"name": "modelopt", "version": "0.47.0"},
    "quantization": {
        "quant_algo": "NVFP4",
        "kv_cache_quant_algo": None,
        "group_size": 16,
        "exclude_modules": ["lm_head"],
    },
    "quant_method": "modelopt_fp4",
}


def test_parse_both_forms():
    a = parse_modelopt(CONFIG_JSON_FORM)
    assert a.activations and a.ignore == ("lm_head", "model.embed_tokens")
    b = parse_modelopt(HF_FILE_FORM)
    assert b.activations and b.ignore == ("lm_head",) and b.kv_cache_scheme is None
    assert is_modelopt_config(CONFIG_JSON_FORM) and is_modelopt_config(HF_FILE_FORM)
    assert not is_modelopt_config({"quant_method": "compressed-tensors"})
    # weight-only: W4A16_NVFP4, or NVFP4 whose groups all lack input_activations (vLLM's rule)
    w = parse_modelopt({**HF_FILE_FORM, "quantization": {"quant_algo": "W4A16_NVFP4"}})
    assert not w.activations
    groups = json.loads(json.dumps(CONFIG_JSON_FORM["config_groups"]))
    groups["group_0"]["input_activations"] = None
    assert not parse_modelopt({**CONFIG_JSON_FORM, "config_groups": groups}).activations


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"quant_algo": "FP8"}, "quant_algo is 'FP8'"),
        ({"kv_cache_quant_algo": "FP8"}, "kv_cache_quant_algo is 'FP8'"),
        ({"group_size": 32}, "group_size is 32"),
    ],
)
def test_refused(change, words):
    cfg = {**HF_FILE_FORM, "quantization": {**HF_FILE_FORM["quantization"], **change}}
    with pytest.raises(CheckpointError, match=words):
        parse_modelopt(cfg)


def test_excludes_as_vllm():
    ex = tuple(expand_excludes(["lm_head", "model.layers.1.mlp*", "*.o_proj"]))
    assert matches_exclude("lm_head", ex)
    assert matches_exclude("model.layers.1.mlp.gate_proj", ex)
    assert not matches_exclude("model.layers.10.mlp.gate_proj", ex)
    assert matches_exclude("model.layers.3.self_attn.o_proj", ex)
    assert not matches_exclude("model.layers.3.self_attn.q_proj", ex)


def test_claimed_only_when_asked():
    pytest.importorskip("vllm")
    from scalesweep_vllm.plugin.config import ScaleSweepConfig

    for form in (CONFIG_JSON_FORM, HF_FILE_FORM):
        assert ScaleSweepConfig.override_quantization_method(form, "scalesweep") == "scalesweep"
        assert ScaleSweepConfig.override_quantization_method(form, None) is None
        cfg = ScaleSweepConfig.from_config(form)
        assert cfg.checkpoint_format == "modelopt"
    with pytest.raises(ValueError, match="quant_algo is 'FP8'"):
        ScaleSweepConfig.from_config({**CONFIG_JSON_FORM, "quant_algo": "FP8"})


# ---------------------------------------------------------------------------
# Weights: the plugin's decode against ModelOpt's
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.getbasetemp() / "plugin_ckpts" / "tiny-modelopt-nvfp4"
    if not (out / "hf_quant_config.json").is_file():
        write_modelopt_checkpoint(tiny_model_dir(tmp_path_factory), out)
    return out


def _quantized(tensors):
    return sorted(k[: -len(".weight_scale_2")] for k in tensors if k.endswith(".weight_scale_2"))


def test_checkpoint_has_what_the_test_needs(ckpt):
    t = load_file(str(ckpt / "model.safetensors"))
    names = _quantized(t)
    assert len(names) == 7 + 4  # layer 0 all seven, layer 1 attention only
    assert t["model.layers.1.mlp.up_proj.weight"].dtype == torch.bfloat16
    ws2 = [float(t[f"model.layers.0.self_attn.{c}_proj.weight_scale_2"]) for c in "qkv"]
    assert len(set(ws2)) == 3  # per-shard global scales really differ


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_is_modelopts_bit_for_bit(ckpt, dtype):
    pytest.importorskip("vllm")
    from scalesweep_vllm.plugin.linear import modelopt_dequantize

    t = load_file(str(ckpt / "model.safetensors"))
    for p in _quantized(t):
        args = (t[p + ".weight"], t[p + ".weight_scale"], t[p + ".weight_scale_2"])
        got, want = modelopt_dequantize(*args, dtype), mo_dequantize(*args, dtype)
        iv = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(got.view(iv), want.view(iv)), p


@pytest.mark.skipif(not MODELOPT_PY.is_file(), reason="no .venv-modelopt (setup-peers.sh)")
def test_transcription_is_modelopt(ckpt, tmp_path):
    """The reference decode against nvidia-modelopt's own NVFP4QTensor.dequantize."""
    out = tmp_path / "mo.safetensors"
    code = f"""
import torch
from safetensors.torch import load_file, save_file
from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
t = load_file({str(ckpt / "model.safetensors")!r})
res = {{}}
for k in t:
    if k.endswith(".weight_scale_2"):
        p = k[: -len(".weight_scale_2")]
        w = t[p + ".weight"]
        shape = torch.Size((w.shape[0], w.shape[1] * 2))
        for dt, tag in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
            q = NVFP4QTensor(shape, dt, w)
            res[p + "." + tag] = q.dequantize(dtype=dt, scale=t[p + ".weight_scale"],
                double_scale=t[k], block_sizes={{-1: 16}}).contiguous()
save_file(res, {str(out)!r})
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    subprocess.run([str(MODELOPT_PY), "-c", code], check=True, env=env, timeout=600)
    theirs = load_file(str(out))
    t = load_file(str(ckpt / "model.safetensors"))
    assert len(theirs) == 2 * len(_quantized(t))
    for p in _quantized(t):
        args = (t[p + ".weight"], t[p + ".weight_scale"], t[p + ".weight_scale_2"])
        for dt, tag, iv in (
            (torch.float32, "f32", torch.int32),
            (torch.bfloat16, "bf16", torch.int16),
        ):
            assert torch.equal(mo_dequantize(*args, dt).view(iv), theirs[f"{p}.{tag}"].view(iv)), p


# ---------------------------------------------------------------------------
# Served by the CPU engine
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(ckpt):
    pytest.importorskip("vllm")
    with cpu_engine(ckpt, "float32") as llm:
        yield llm


def reference(ckpt: Path, kv_cache="mse", query="mse"):
    """The evaluation's quantized forward (ScaleSweep MSE of every quantized Linear's
    input with ``G_a = 1 / max(input_scale)`` of its fused group, Q/K/V per 16 along
    head_dim with scalesweep.json's scales), its weights replaced by ModelOpt's decode."""
    from scalesweep_vllm.evaluate.model import Checkpoint, RuntimeSettings, build_model

    ck = Checkpoint.from_dir(ckpt)
    ck.meta = json.loads((ckpt / "scalesweep.json").read_text())
    model = build_model(ck, RuntimeSettings("mse", kv_cache, query), torch.float32)
    t = load_file(str(ckpt / "model.safetensors"))
    with torch.no_grad():
        for p in _quantized(t):
            args = (t[p + ".weight"], t[p + ".weight_scale"], t[p + ".weight_scale_2"])
            w = mo_dequantize(*args, torch.float32)
            model.get_submodule(p).weight.copy_(w)
    return model


@pytest.mark.vllm
def test_served_layers(engine):
    def probe(model):
        out = {}
        for n, m in model.named_modules():
            qm = getattr(m, "quant_method", None)
            if qm is None or "Embedding" in type(qm).__name__:
                continue
            out[n] = (type(qm).__name__, getattr(qm, "act_method", None),
                      getattr(m, "scalesweep_backend", None))  # fmt: skip
            if hasattr(m, "scalesweep_ws2"):
                out[n] += (tuple(m.scalesweep_ws2.tolist()),)
        return out

    (layers,) = engine.apply_model(probe)
    t = load_file(str(Path(engine.llm_engine.model_config.model) / "model.safetensors"))
    qkv = tuple(float(t[f"model.layers.0.self_attn.{c}_proj.weight_scale_2"]) for c in "qkv")
    ours = ("ScaleSweepLinearMethod", "mse", "packed")
    assert layers["model.layers.0.self_attn.qkv_proj"] == (*ours, qkv)
    assert layers["model.layers.1.mlp.gate_up_proj"][0] == "UnquantizedLinearMethod"
    assert layers["model.layers.1.mlp.down_proj"][0] == "UnquantizedLinearMethod"
    assert layers["model.layers.1.self_attn.o_proj"][:3] == ours
    attn = [n for n, v in layers.items() if v[0] == "ScaleSweepKVCacheMethod"]
    assert len(attn) == TINY["num_hidden_layers"]


@pytest.mark.vllm
@torch.no_grad()
def test_logprobs_match_reference(ckpt, engine):
    vllm = pytest.importorskip("vllm")
    sp = vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0)
    rows = []
    for o in engine.generate(PROMPTS, sp):
        c = o.outputs[0]
        gen = list(c.token_ids)
        lp = torch.tensor([d[t].logprob for d, t in zip(c.logprobs, gen, strict=True)])
        rows.append((list(o.prompt_token_ids), gen, lp))
    ref = reference(ckpt)
    d, agree = compare_teacher_forced(ref, rows)
    # the reference without K/V/Q quantization: what silently skipping it would give
    d_off, _ = compare_teacher_forced(reference(ckpt, None, None), rows)
    print(
        f"ModelOpt W4A4KV4Q4 |dlogprob| mean {d.mean():.2e} max {d.max():.2e}; greedy "
        f"agrees on {agree}/{len(PROMPTS)} prompts; against no K/V/Q quantization: "
        f"mean {d_off.mean():.2e}"
    )
    assert d.mean() < MEAN_TOL and d.max() < MAX_TOL
    assert agree >= len(PROMPTS) - 1
    assert d_off.mean() > 10 * d.mean()  # K/V/Q quantization really ran
