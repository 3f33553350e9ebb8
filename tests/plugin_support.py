"""Shared pieces of the plugin tests: a tiny checkpoint from the real offline
quantizer and a transformers reference with the same quantize-dequantize.

The reference is the evaluation's quantized forward (no vLLM, no plugin code):
it decodes weights with the kernels' ``dequantize``, fake-quantizes every
quantized Linear's input with its ``input_global_scale`` and the fused partners'
summed ``input_weight``, and Q/K/V after the rotary embedding per 16 along
head_dim with the global scales and vectors of ``scalesweep.json``.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import torch

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


def _root(tmp_path_factory) -> Path:
    """A folder shared by all test modules of one pytest session."""
    root = tmp_path_factory.getbasetemp() / "plugin_ckpts"
    root.mkdir(exist_ok=True)
    return root


def _suffix(overrides: dict) -> str:
    """Folder-name suffix for config overrides of the tiny model."""
    return "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))


def tiny_model_dir(tmp_path_factory, **overrides) -> Path:
    """The tiny model (``TINY``, with ``overrides`` of its config, e.g. one KV head)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from scalesweep_vllm.quantize import assets

    out = _root(tmp_path_factory) / f"tiny-bf16{_suffix(overrides)}"
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).to(torch.bfloat16)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(assets.default_model_dir()).save_pretrained(out)
    return out


def tiny_checkpoint(
    tmp_path_factory, scheme: str, convention: str | None = None, **overrides
) -> Path:
    """The tiny model quantized by ``scalesweep_vllm.quantize.quantize_model`` (with
    ``convention`` as its global scale; None: the quantizer's default; ``overrides`` of
    the model's config as in :func:`tiny_model_dir`)."""

    kw, name = {}, f"tiny-{scheme}"
    if convention is not None:
        kw, name = {"global_scale_convention": convention}, f"{name}-{convention}"
    name += _suffix(overrides)
    out = _root(tmp_path_factory) / name
    if not (out / "config.json").is_file():
        _quantize_tiny(tiny_model_dir(tmp_path_factory, **overrides), out, scheme, **kw)
    return out


def _quantize_tiny(src: Path, out: Path, scheme: str, **kw) -> None:
    """The plugin tests' quantizer settings: WMSE, 16 x 64 Wikipedia tokens, on the CPU."""
    from scalesweep_vllm.quantize import assets, quantize_model

    quantize_model(
        str(src),
        str(out),
        scheme=scheme,
        objective="wmse",
        calib=assets.calibration_texts()[:32],
        num_samples=16,
        seq_len=64,
        device="cpu",
        progress=False,
        **kw,
    )


def rope_bias_checkpoint(tmp_path_factory, **overrides) -> Path:
    """A tiny Qwen2 (``TINY``, head_dim 64) whose q/k biases have Qwen2.5-like outliers
    in low-frequency dims (|b_k| 40, |b_q| 10 against |k| of a few units), quantized
    W4A4KV4Q4 with the default ``rope_bias`` (on: scalesweep_vllm/rope_bias.py)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from scalesweep_vllm.quantize import assets

    src = _root(tmp_path_factory) / f"tiny-qwen2-rope-bias{_suffix(overrides)}"
    if not (src / "config.json").is_file():
        torch.manual_seed(0)
        cfg = {k: v for k, v in {**TINY, **overrides}.items() if k != "head_dim"}
        model = Qwen2ForCausalLM(Qwen2Config(**cfg)).to(torch.bfloat16)  # head_dim 256/4
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in model.model.layers:
                for lin, big in ((layer.self_attn.k_proj, 40.0), (layer.self_attn.q_proj, 10.0)):
                    b = torch.randn(lin.out_features, generator=g) * 0.2
                    for h in range(lin.out_features // 64):
                        b[h * 64 + 31] = big * (1 if h % 2 else -1)
                        b[h * 64 + 62] = 0.5 * big
                    lin.bias.copy_(b.to(torch.bfloat16))
        model.save_pretrained(src)
        AutoTokenizer.from_pretrained(assets.default_model_dir()).save_pretrained(src)
    out = _root(tmp_path_factory) / f"tiny-qwen2-rope-bias-W4A4KV4Q4{_suffix(overrides)}"
    if not (out / "config.json").is_file():
        _quantize_tiny(src, out, "W4A4KV4Q4")
    return out


def compare_teacher_forced(model, rows) -> tuple[torch.Tensor, int]:
    """|served - reference| log-prob of every generated token, and the prompts whose
    greedy choices the reference repeats, for ``rows`` of (prompt, generated, served
    log-probs)."""
    diffs, agree = [], 0
    for prompt, gen, lp in rows:
        ref_lp, ref_arg = teacher_forced(model, prompt, gen)
        diffs.append((lp - ref_lp).abs())
        agree += bool((ref_arg == torch.tensor(gen)).all())
    return torch.cat(diffs), agree


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# The transformers reference
# ---------------------------------------------------------------------------


def reference_model(ckpt: Path, activations=True, kv_cache=True, query=True, dtype=torch.bfloat16):
    """A transformers model computing what the checkpoint asks for, in ``dtype`` (the
    weights decoded straight to it, as the plugin does); parts may be switched off
    (a part the checkpoint does not enable is off anyway). It is the evaluation's
    quantized forward (:func:`scalesweep_vllm.evaluate.build_model`), so the plugin
    tests check the evaluation and the plugin against each other."""
    import dataclasses

    from scalesweep_vllm.evaluate import Checkpoint, build_model, runtime_settings

    ck = Checkpoint.from_dir(ckpt)
    rs = runtime_settings(ck)
    off = {
        k: None
        for k, on in (("activations", activations), ("kv_cache", kv_cache), ("query", query))
        if not on
    }
    return build_model(ck, dataclasses.replace(rs, **off), dtype)


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
