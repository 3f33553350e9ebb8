"""The W4A16 checkpoint served by the real CPU engine (one engine, in-process):
weights kept packed for the C++ GEMM (the CPU default), no runtime quantization."""

from __future__ import annotations

import pytest
import torch
from plugin_support import PROMPTS, cpu_engine, reference_model, teacher_forced, tiny_checkpoint

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

MAX_TOKENS = 8
#: Per-token |log-prob(vLLM) - log-prob(reference)| (nats). Weights are identical
#: (both decode the checkpoint in compressed-tensors' order); what remains is bf16
#: rounding in kernels that differ (oneDNN GEMM vs torch, fused RMSNorm, CPU
#: attention): one bf16 ulp of a logit near 8 is 1/32, and measured differences
#: are 0 or about 0.03. Twice that is the bound.
MAX_TOL = 0.07


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory, "W4A16")


@pytest.fixture(scope="module")
def engine(ckpt):
    with cpu_engine(ckpt, "bfloat16") as llm:
        yield llm


def test_weight_only_layers(engine):
    def probe(model):
        from scalesweep_vllm.plugin.linear import ScaleSweepLinearMethod

        out = {}
        for n, m in model.named_modules():
            if isinstance(getattr(m, "quant_method", None), ScaleSweepLinearMethod):
                out[n] = (m.quant_method.act_method, m.scalesweep_backend,
                          hasattr(m, "weight_packed"), hasattr(m, "scalesweep_codes"),
                          m.quant_method.has_input_scale)  # fmt: skip
        attn = [n for n, m in model.named_modules() if type(m).__name__ == "Attention"
                and getattr(m, "quant_method", None) is not None]  # fmt: skip
        return out, attn

    ((layers, attn),) = engine.apply_model(probe)
    assert len(layers) == 8
    # no activation method, the packed C++ GEMM, checkpoint tensors replaced by its layout
    assert set(layers.values()) == {(None, "packed", False, True, False)}
    assert attn == []  # W4A16: attention is stock


@torch.no_grad()
def test_greedy_and_logprobs_match_reference(ckpt, engine):
    """Log-probs within the bf16 noise bound everywhere; the greedy token the same
    wherever the reference's choice is decided beyond that noise (its top-1 log-prob
    exceeds its top-2 by more than 2 * MAX_TOL: a noise of MAX_TOL on each side cannot
    swap them). Random tiny weights leave near-tied positions; which ones depends on
    the checkpoint (e.g. its global-scale convention), so counting agreements is not a
    property; this is."""
    sp = vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0)
    ref = reference_model(ckpt)
    diffs, decided, agree = [], 0, 0
    for o in engine.generate(PROMPTS, sp):
        c = o.outputs[0]
        prompt, gen = list(o.prompt_token_ids), list(c.token_ids)
        lp = torch.tensor([d[t].logprob for d, t in zip(c.logprobs, gen, strict=True)])
        ref_lp, ref_arg = teacher_forced(ref, prompt, gen)
        diffs.append((lp - ref_lp).abs())
        logits = ref(torch.tensor([prompt + gen])).logits[0].float()
        pos = torch.arange(len(prompt) - 1, len(prompt) + len(gen) - 1)
        top2 = torch.log_softmax(logits[pos], -1).topk(2).values
        sure = (top2[:, 0] - top2[:, 1]) > 2 * MAX_TOL
        same = ref_arg == torch.tensor(gen)
        assert same[sure].all(), (c.text, same, top2)
        decided += int(sure.sum())
        agree += bool(same.all())
    d = torch.cat(diffs)
    print(
        f"W4A16 |dlogprob| mean {d.mean():.4f} max {d.max():.4f}; greedy agrees on "
        f"{agree}/{len(PROMPTS)} prompts; {decided}/{d.numel()} positions decided"
    )
    assert d.max() < MAX_TOL
    assert decided >= d.numel() // 2  # the check checked most positions
