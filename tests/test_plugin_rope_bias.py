"""A biased Qwen2 checkpoint whose Q/K are quantized around their rotary bias,
served by the real vLLM CPU engine (float32, in-process) against the evaluation's
transformers forward (scalesweep_vllm/rope_bias.py, plugin/attention.py).

The plugin rebuilds ``R_p b`` from vLLM's own ``get_rope`` and the positions in the
attention metadata; the evaluation from transformers' rotary module and
``position_ids``. Generation covers prefill and decode steps (positions from
``seq_lens``). A plugin that dropped the correction, or used wrong positions, would
match the reference without it instead (test_correction_is_not_a_noop).
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from plugin_support import (
    PROMPTS,
    compare_teacher_forced,
    cpu_engine,
    reference_model,
    rope_bias_checkpoint,
)

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

MAX_TOKENS = 8
MEAN_TOL, MAX_TOL = 2e-3, 0.05  # as test_plugin_w4a4kv4q4.py (float32 engine)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = rope_bias_checkpoint(tmp_path_factory)
    meta = json.loads((out / "scalesweep.json").read_text())
    assert all(e.get("rope_bias") == ["k", "q"] for e in meta["attention"].values())
    return out


@pytest.fixture(scope="module")
def without_correction(ckpt, tmp_path_factory):
    """The same checkpoint with ``rope_bias`` struck from scalesweep.json."""
    out = tmp_path_factory.mktemp("no_rope_bias") / "ckpt"
    shutil.copytree(ckpt, out)
    meta = json.loads((out / "scalesweep.json").read_text())
    for e in meta["attention"].values():
        e.pop("rope_bias")
    meta["format_version"] = 1
    (out / "scalesweep.json").write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module")
def generated(ckpt):
    with cpu_engine(ckpt, "float32") as llm:
        sp = vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0)
        outs = llm.generate(PROMPTS, sp)
        (has,) = llm.apply_model(
            lambda m: sorted(
                n for n, mod in m.named_modules() if getattr(mod, "scalesweep_rope_offsets", None)
            )
        )
    assert len(has) == 2, has  # both layers quantize around their bias
    rows = []
    for o in outs:
        c = o.outputs[0]
        lps = [d[t].logprob for d, t in zip(c.logprobs, c.token_ids, strict=True)]
        rows.append((list(o.prompt_token_ids), list(c.token_ids), torch.tensor(lps)))
    return rows


def test_served_matches_the_evaluation(ckpt, generated):
    d, agree = compare_teacher_forced(reference_model(ckpt, dtype=torch.float32), generated)
    print(
        f"|dlogprob| mean {d.mean():.5f} max {d.max():.5f}; greedy agree {agree}/{len(generated)}"
    )
    assert agree >= len(generated) - 1
    assert d.mean() < MEAN_TOL and d.max() < MAX_TOL


def test_correction_is_not_a_noop(ckpt, without_correction, generated):
    rows = generated[:4]
    with_c, _ = compare_teacher_forced(reference_model(ckpt, dtype=torch.float32), rows)
    without, _ = compare_teacher_forced(
        reference_model(without_correction, dtype=torch.float32), rows
    )
    print(f"mean |dlogprob|: with the correction {with_c.mean():.5f}, without {without.mean():.5f}")
    assert without.mean() > 10 * max(with_c.mean(), 1e-4)


def test_token_positions_from_metadata():
    """Decode rows first, then a prefill chunk after cached tokens, then padding."""
    from scalesweep_vllm.plugin.attention import token_positions

    md = SimpleNamespace(
        query_start_loc=torch.tensor([0, 1, 2, 5], dtype=torch.int32),
        seq_lens=torch.tensor([10, 4, 8], dtype=torch.int32),  # 9 cached +1; 3; 5 cached +3
    )
    got = token_positions(md, 7)
    assert got.tolist() == [9, 3, 5, 6, 7, 0, 0]
