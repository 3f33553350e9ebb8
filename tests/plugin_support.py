"""Shared pieces of the plugin tests: a tiny checkpoint from the real offline
quantizer and a transformers reference with the same quantize-dequantize.

The reference is written independently of the plugin (no vLLM, no plugin code):
it decodes weights with the kernels' ``dequantize``, fake-quantizes every
quantized Linear's input with its ``input_global_scale`` and the fused partners'
summed ``input_weight``, and Q/K/V after the rotary embedding per 16 along
head_dim with the global scales and vectors of ``scalesweep.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import torch

from scalesweep_vllm import kernels

#: head_dim 64 (a size vLLM's CPU attention supports), GQA 4:2, two layers, tied
#: embeddings, the real SmolLM2 tokenizer. Random weights with a wide init so the
#: greedy choice has a margin.
TINY = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=49152,
    tie_word_embeddings=True,
    max_position_embeddings=1024,
    initializer_range=0.08,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)

PROMPTS = [
    "The capital of France is",
    "Hello, my name is",
    "In 1905, Albert Einstein published",
    "The quick brown fox",
    "Water boils at a temperature of",
    "A list of prime numbers: 2, 3, 5,",
    "def fibonacci(n):",
    "The largest planet in the solar system",
]

FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}


def _root(tmp_path_factory) -> Path:
    """A folder shared by all test modules of one pytest session."""
    root = tmp_path_factory.getbasetemp() / "plugin_ckpts"
    root.mkdir(exist_ok=True)
    return root


def tiny_model_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from scalesweep_vllm.quantize import assets

    out = _root(tmp_path_factory) / "tiny-bf16"
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**TINY)).to(torch.bfloat16)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(assets.default_model_dir()).save_pretrained(out)
    return out


def tiny_checkpoint(tmp_path_factory, scheme: str) -> Path:
    """The tiny model quantized by ``scalesweep_vllm.quantize.quantize_model``."""
    from scalesweep_vllm.quantize import assets, quantize_model

    out = _root(tmp_path_factory) / f"tiny-{scheme}"
    if not (out / "config.json").is_file():
        quantize_model(
            str(tiny_model_dir(tmp_path_factory)),
            str(out),
            scheme=scheme,
            objective="wmse",
            calib=assets.calibration_texts()[:32],
            num_samples=16,
            seq_len=64,
            device="cpu",
            progress=False,
        )
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# The transformers reference
# ---------------------------------------------------------------------------


def _fused_key(name: str) -> str:
    head, _, last = name.rpartition(".")
    return f"{head}.{FUSED[last]}" if last in FUSED else name


def reference_model(ckpt: Path, activations=True, kv_cache=True, query=True, dtype=torch.bfloat16):
    """A transformers Llama computing what the checkpoint asks for, in ``dtype`` (the
    weights decoded straight to it, as the plugin does); parts may be switched off
    (a part the checkpoint does not enable is off anyway)."""
    from safetensors.torch import load_file
    from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    config = AutoConfig.from_pretrained(ckpt)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    meta_path = ckpt / "scalesweep.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    vectors = {}
    if meta.get("vectors_file"):
        vectors = load_file(str(ckpt / meta["vectors_file"]))
    sd = {}
    for f in sorted(os.listdir(ckpt)):
        if f.endswith(".safetensors") and f != meta.get("vectors_file"):
            sd.update(load_file(str(ckpt / f)))
    state, act = {}, {}
    for name, t in sd.items():
        if name.endswith(".weight_packed"):
            p = name[: -len(".weight_packed")]
            state[p + ".weight"] = kernels.dequantize(
                t, sd[p + ".weight_scale"], sd[p + ".weight_global_scale"], dtype
            )
            if p + ".input_global_scale" in sd:
                act[p] = sd[p + ".input_global_scale"]
        elif not name.endswith(("_scale", "_global_scale")):
            state[name] = t.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()

    method = (meta.get("activations") or {}).get("method") or "mse"
    summed: dict[str, torch.Tensor] = {}
    for p in act:
        if f"{p}.input_weight" in vectors:
            k = _fused_key(p)
            summed[k] = summed.get(k, 0) + vectors[f"{p}.input_weight"]
    if activations:
        for p, g in act.items():
            mod = model.get_submodule(p)
            w = summed.get(_fused_key(p)) if method == "wmse" else None

            def hook(_m, args, g=g, w=w):
                return (kernels.fake_quantize(args[0], g, method, w),)

            mod.register_forward_pre_hook(hook)

    kv = meta.get("kv_cache") or {}
    q = meta.get("query") or {}
    use_kv = kv_cache and kv.get("enabled")
    use_q = query and q.get("enabled")

    def part(prefix, c, x, method):
        e = meta["attention"][prefix]
        w = vectors.get(f"{prefix}.{c}_weight") if method == "wmse" else None
        if w is not None:
            w = w[:, None, :]  # [heads, 1, head_dim] against x [batch, heads, T, head_dim]
        return kernels.fake_quantize(x, e[f"{c}_global_scale"], method, w)

    def attention(module, query_, key, value, attention_mask, **kwargs):
        prefix = f"model.layers.{module.layer_idx}.self_attn"
        if use_q:
            query_ = part(prefix, "q", query_, q["method"])
        if use_kv:
            key = part(prefix, "k", key, kv["method"])
            value = part(prefix, "v", value, kv["method"])
        return sdpa_attention_forward(module, query_, key, value, attention_mask, **kwargs)

    AttentionInterface.register("scalesweep_reference", attention)
    model.set_attn_implementation("scalesweep_reference")
    return model


@torch.no_grad()
def teacher_forced(model, prompt_ids: list[int], gen_ids: list[int]):
    """Per generated position: (log-prob of the given token, the model's argmax)."""
    ids = torch.tensor([prompt_ids + gen_ids])
    logits = model(ids).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    pos = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(gen_ids) - 1)
    tok = torch.tensor(gen_ids)
    return lp[pos, tok], lp[pos].argmax(-1)


@contextlib.contextmanager
def cpu_engine(ckpt: Path, dtype: str):
    """One in-process vLLM CPU engine serving ``ckpt`` with ``quantization="scalesweep"``
    (eager, 64 MiB KV cache); the environment is restored afterwards."""
    import vllm

    keys = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_HOST_IP")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model reachable in-process
    os.environ["VLLM_HOST_IP"] = "127.0.0.1"
    try:
        yield vllm.LLM(
            str(ckpt),
            quantization="scalesweep",
            enforce_eager=True,
            dtype=dtype,
            max_model_len=256,
            kv_cache_memory_bytes=64 << 20,
            seed=0,
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
