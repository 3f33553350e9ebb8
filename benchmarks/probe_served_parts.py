#!/usr/bin/env python
"""Served vs measured per runtime part: the tiny test model quantized W4A4KV4Q4 at a
global-scale convention, scalesweep.json edited to leave only PARTS on (a = Linear
inputs, kv, q), served by the vLLM CPU engine in float32, prompt NLL on 2 evaluation
windows against the evaluation's forward (tests/plugin_support.reference_model).

    python benchmarks/probe_served_parts.py compressed-tensors akvq

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
from transformers import AutoTokenizer

from scalesweep_vllm.evaluate.metrics import evaluation_tokens, token_nll

root = Path("/tmp/probe")
root.mkdir(parents=True, exist_ok=True)
conv = sys.argv[1]
parts = sys.argv[2]  # which parts stay on: e.g. "a", "akv", "akvq"
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
ids = evaluation_tokens(AutoTokenizer.from_pretrained(ck), 128, 64)
with cpu_engine(ck, "float32") as eng:
    sp = vllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outs = eng.generate([{"prompt_token_ids": r.tolist()} for r in ids], sp)
served = torch.tensor(
    [
        [-lp[t].logprob for lp, t in zip(o.prompt_logprobs[1:], r[1:].tolist(), strict=True)]
        for o, r in zip(outs, ids, strict=True)
    ]
)
on = {"activations": "a" in parts, "kv_cache": "kv" in parts, "query": "q" in parts}
meas = token_nll(reference_model(ck, dtype=torch.float32, **on), ids)
d = (served - meas).abs()
print(
    f"RESULT {conv} {parts}: ppl served {math.exp(served.mean()):.4f} "
    f"measured {math.exp(meas.mean()):.4f} |d| mean {d.mean():.2e} max {d.max():.2e}",
    flush=True,
)
