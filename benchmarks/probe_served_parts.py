#!/usr/bin/env python
"""Served vs measured per runtime part: the tiny test model quantized W4A4KV4Q4 at a
global-scale convention, scalesweep.json edited to leave only PARTS on (a = Linear
inputs, kv, q), served by the vLLM CPU engine in float32, prompt NLL on WINDOWS evaluation
windows of 64 tokens (default 2) against the evaluation's forward
(tests/plugin_support.reference_model): as measured, and aligned at near-ties (an FP4
rounding midpoint or block-scale tie that vLLM's and transformers' fp32 arithmetic
round apart; tests/quantizer_alignment.py), which must then agree to ~1e-6 nats.

    python benchmarks/probe_served_parts.py compressed-tensors akvq [WINDOWS]

Valid part sets are the schemes': a, akv, akvq (kv or q without a are not schemes).
Work folder: /tmp/probe.
"""

import json
import math
import shutil
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import torch
import vllm
from plugin_support import cpu_engine, reference_model, tiny_checkpoint
from quantizer_alignment import aligned_nll, recording
from transformers import AutoTokenizer

from scalesweep_vllm.evaluate.metrics import evaluation_tokens, token_nll

root = Path("/tmp/probe")
root.mkdir(parents=True, exist_ok=True)
conv = sys.argv[1]
parts = sys.argv[2]  # which parts stay on: e.g. "a", "akv", "akvq"
windows = int(sys.argv[3]) if len(sys.argv) > 3 else 2
# the plugin tests' tiny model and checkpoint, kept under root/plugin_ckpts
base = tiny_checkpoint(types.SimpleNamespace(getbasetemp=lambda: root), "W4A4KV4Q4", conv)
ck = root / f"ck-{conv}-{parts}"
shutil.rmtree(ck, ignore_errors=True)
shutil.copytree(base, ck)
meta = json.loads((ck / "scalesweep.json").read_text())
meta["activations"]["enabled"] = "a" in parts
meta["kv_cache"]["enabled"] = "kv" in parts
meta["query"]["enabled"] = "q" in parts
(ck / "scalesweep.json").write_text(json.dumps(meta))
ids = evaluation_tokens(AutoTokenizer.from_pretrained(ck), 64 * windows, 64)
with cpu_engine(ck, "float32") as eng:
    sp = vllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    with recording() as calls:  # after the engine's start-up runs
        outs = eng.generate([{"prompt_token_ids": r.tolist()} for r in ids], sp)
served = torch.tensor(
    [
        [-lp[t].logprob for lp, t in zip(o.prompt_logprobs[1:], r[1:].tolist(), strict=True)]
        for o, r in zip(outs, ids, strict=True)
    ]
)
on = {"activations": "a" in parts, "kv_cache": "kv" in parts, "query": "q" in parts}
model = reference_model(ck, dtype=torch.float32, **on)
meas = token_nll(model, ids)
aligned, ties = aligned_nll(model, ids, calls)
for tie in ties:
    print("near-tie aligned:", tie)
for name, m in (("measured", meas), ("aligned", aligned)):
    d = (served - m).abs()
    print(
        f"RESULT {conv} {parts} {name}: ppl served {math.exp(served.mean()):.4f} "
        f"{name} {math.exp(m.mean()):.4f} |d| mean {d.mean():.2e} max {d.max():.2e}",
        flush=True,
    )
