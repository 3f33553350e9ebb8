"""The ``packed`` Linear backend inside the real CPU engine: weights stay at 4.5 bits,
each layer's output is the GEMM reference on the checkpoint's own tensors bit for bit,
the engine holds <= 0.3x the bf16 bytes, and ``SCALESWEEP_LINEAR`` picks the backend
(``dequant`` still serves, ``packed`` where it cannot run is an error)."""

from __future__ import annotations

import os

import pytest
import torch
from plugin_support import PROMPTS, cpu_engine, tiny_checkpoint

from scalesweep_vllm import gemm_reference as ref

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory, "W4A16")


@pytest.fixture(scope="module")
def engine(ckpt):
    with cpu_engine(ckpt, "float32") as llm:
        yield llm


def _checkpoint_tensors(ckpt):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(ckpt.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


def _fused(tensors: dict, prefix: str, shards: list[str]):
    """The checkpoint's packed weight, scales and per-row G_w of a fused layer, shards
    in vLLM's order."""
    packed, scales, rows = [], [], []
    for s in shards:
        p = tensors[f"{prefix}.{s}.weight_packed"]
        packed.append(p)
        scales.append(tensors[f"{prefix}.{s}.weight_scale"])
        rows.append(
            tensors[f"{prefix}.{s}.weight_global_scale"].float().reshape(1).expand(p.shape[0])
        )
    return torch.cat(packed), torch.cat(scales), torch.cat(rows)


FUSED = {
    "self_attn.qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "self_attn.o_proj": ["o_proj"],
    "mlp.gate_up_proj": ["gate_proj", "up_proj"],
    "mlp.down_proj": ["down_proj"],
}


def test_each_layer_is_the_reference_gemm_on_the_checkpoint(ckpt, engine):
    tensors = _checkpoint_tensors(ckpt)

    def probe(model):
        from scalesweep_vllm.plugin.linear import ScaleSweepLinearMethod

        out = {}
        gen = torch.Generator().manual_seed(0)
        for name, m in model.named_modules():
            if isinstance(getattr(m, "quant_method", None), ScaleSweepLinearMethod):
                x = torch.randn(3, m.input_size_per_partition, generator=gen)
                out[name] = (m.scalesweep_backend, x, m.quant_method.apply(m, x))
        return out

    (layers,) = engine.apply_model(probe)
    assert len(layers) == 8
    for name, (backend, x, y) in layers.items():
        assert backend == "packed"
        block, part, fused = name.rsplit(".", 2)
        shards = FUSED[f"{part}.{fused}"]
        packed, scales, rows = _fused(tensors, f"{block}.{part}", shards)
        assert torch.equal(y, ref.w4a16(x, packed, scales, rows)), name


def test_engine_holds_packed_weights(engine):
    """Bytes the engine's quantized Linears hold (their parameters and buffers), against
    bf16 copies of the same matrices: 4.5 bits plus one fp32 per output row."""

    def probe(model):
        from scalesweep_vllm.plugin.linear import ScaleSweepLinearMethod

        held = bf16 = 0
        for m in model.modules():
            if isinstance(getattr(m, "quant_method", None), ScaleSweepLinearMethod):
                held += sum(t.numel() * t.element_size() for t in m.parameters())
                held += sum(t.numel() * t.element_size() for t in m.buffers())
                bf16 += 2 * m.input_size_per_partition * m.output_size_per_partition
        return held, bf16

    ((held, bf16),) = engine.apply_model(probe)
    assert 0.28 * bf16 <= held <= 0.30 * bf16, (held, bf16)


def test_dequant_backend_still_serves(ckpt, engine, monkeypatch):
    """``SCALESWEEP_LINEAR=dequant``: weights decoded at load and vLLM's GEMM; the same
    tokens' log-probs as the packed engine to fp32 GEMM-order noise."""
    sp = vllm.SamplingParams(temperature=0.0, max_tokens=6, logprobs=0)
    packed = engine.generate(PROMPTS[:3], sp)
    monkeypatch.setenv("SCALESWEEP_LINEAR", "dequant")
    with cpu_engine(ckpt, "float32") as llm:
        backends = llm.apply_model(
            lambda model: {getattr(m, "scalesweep_backend", None) for m in model.modules()} - {None}
        )
        assert backends == [{"dequant"}]
        prompts = [
            {"prompt_token_ids": list(o.prompt_token_ids) + list(o.outputs[0].token_ids)}
            for o in packed
        ]
        sp1 = vllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        for o, d in zip(packed, llm.generate(prompts, sp1), strict=True):
            gen = o.outputs[0].token_ids
            lp = torch.tensor(
                [x[t].logprob for x, t in zip(o.outputs[0].logprobs, gen, strict=True)]
            )
            tail = d.prompt_logprobs[-len(gen) :]
            lpd = torch.tensor([x[t].logprob for x, t in zip(tail, gen, strict=True)])
            assert (lp - lpd).abs().max() < 1e-3, (lp, lpd)


def test_packed_requested_where_it_cannot_run_is_an_error(monkeypatch):
    from scalesweep_vllm.plugin import linear

    monkeypatch.setenv("SCALESWEEP_LINEAR", "packed")
    monkeypatch.setattr(linear.cpu_gemm, "available", lambda: "no g++ (pretended)")
    with pytest.raises(ValueError, match="no g\\+\\+ \\(pretended\\)"):
        linear.choose_backend(None, torch.device("cpu"), torch.bfloat16)
    monkeypatch.setenv("SCALESWEEP_LINEAR", "auto")
    b, why = linear.choose_backend(None, torch.device("cpu"), torch.bfloat16)
    assert b == "dequant" and "pretended" in why
    monkeypatch.setenv("SCALESWEEP_LINEAR", "fast")
    with pytest.raises(ValueError, match="SCALESWEEP_LINEAR"):
        linear.choose_backend(None, torch.device("cpu"), torch.bfloat16)
    assert os.environ["SCALESWEEP_LINEAR"] == "fast"
