#!/usr/bin/env python
"""Served equals measured: the perplexity vLLM's CPU engine serves with
``--quantization scalesweep`` against the perplexity ``scalesweep-eval`` measures,
on the same held-out windows (the first of the evaluation text), in bf16.

    python benchmarks/served_vs_measured.py --checkpoint CKPT_W4A4KV4Q4 --windows 8

Two pairs: the BF16 base model (vLLM unquantized vs transformers: the floor set by
bf16 kernel differences alone) and the checkpoint (plugin vs the evaluation's
forward). Each engine runs in its own subprocess (in-process engine, eager, one
at a time). Prints and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _tokens(model_dir, windows, seq_len):
    from transformers import AutoTokenizer

    from scalesweep_vllm.evaluate.metrics import evaluation_tokens

    return evaluation_tokens(AutoTokenizer.from_pretrained(model_dir), windows * seq_len, seq_len)


def serve(args) -> None:
    """(subprocess) prompt NLLs from the vLLM engine, saved to ``args.serve_out``."""
    import torch

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    import vllm

    ids = _tokens(args.serve, args.windows, args.seq_len)
    kw = {"quantization": "scalesweep"} if args.quantized else {}
    llm = vllm.LLM(
        args.serve,
        enforce_eager=True,
        dtype="bfloat16",
        max_model_len=args.seq_len + 16,
        kv_cache_memory_bytes=256 << 20,
        seed=0,
        **kw,
    )
    sp = vllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": r.tolist()} for r in ids], sp)
    nll = torch.tensor(
        [
            [-d[t].logprob for d, t in zip(o.prompt_logprobs[1:], r[1:].tolist(), strict=True)]
            for o, r in zip(outs, ids, strict=True)
        ]
    )
    torch.save(nll, args.serve_out)


def _engine(folder, quantized, args):
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "nll.pt"
        cmd = [sys.executable, __file__, "--serve", str(folder), "--serve-out", str(out)]
        cmd += ["--windows", str(args.windows), "--seq-len", str(args.seq_len)]
        if quantized:
            cmd.append("--quantized")
        subprocess.run(cmd, check=True)
        return torch.load(out)


def _compare(name, served, measured) -> dict:
    d = served - measured
    row = {
        "name": name,
        "positions": int(d.numel()),
        "served_ppl": math.exp(float(served.double().mean())),
        "measured_ppl": math.exp(float(measured.double().mean())),
        "mean_dnll": float(d.double().mean()),
        "mean_abs_dnll": float(d.abs().double().mean()),
        "max_abs_dnll": float(d.abs().max()),
        # standard error of the mean difference: what pure per-token noise explains
        "se_dnll": float(d.double().std() / math.sqrt(d.numel())),
    }
    row["ppl_rel_diff"] = row["served_ppl"] / row["measured_ppl"] - 1
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", help="a W4A4KV4Q4 checkpoint written by scalesweep-quantize")
    p.add_argument("--model", help="its BF16 base (default: SmolLM2-135M-Instruct)")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="benchmarks/served_vs_measured.json")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--serve-out", help=argparse.SUPPRESS)
    p.add_argument("--quantized", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args)
        return 0
    import torch
    from transformers import AutoModelForCausalLM

    from scalesweep_vllm.evaluate import Checkpoint, build_model
    from scalesweep_vllm.evaluate.metrics import token_nll
    from scalesweep_vllm.quantize.pipeline import resolve_model_dir

    torch.set_num_threads(args.threads)
    base = resolve_model_dir(args.model)
    ids = _tokens(base, args.windows, args.seq_len)
    rows = []
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    rows.append(_compare("BF16 (unquantized)", _engine(base, False, args), token_nll(hf, ids)))
    print(rows[-1], flush=True)
    del hf
    ckpt = Checkpoint.from_dir(args.checkpoint)
    q = build_model(ckpt, None, torch.bfloat16)
    label = f"{ckpt.meta['scheme']} {ckpt.meta['objective']} (scalesweep plugin)"
    rows.append(_compare(label, _engine(args.checkpoint, True, args), token_nll(q, ids)))
    print(rows[-1], flush=True)
    res = {
        "checkpoint": args.checkpoint,
        "windows": args.windows,
        "seq_len": args.seq_len,
        "dtype": "bfloat16",
        "rows": rows,
        "command": "python benchmarks/served_vs_measured.py " + " ".join(sys.argv[1:]),
    }
    Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
