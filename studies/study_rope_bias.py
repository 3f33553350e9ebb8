#!/usr/bin/env python
"""Why 4-bit K collapses Qwen2.5, and what quantizing around the rotary bias buys.

For each decoder layer, on the first ``--tokens`` tokens of the held-out Wikipedia
text, this script takes the post-rotary q and k that attention sees (float32,
transformers' forward). It then measures the attention-probability KL
``KL(softmax(q k^T) || softmax(q k_hat^T))`` (causal, averaged over heads and
queries) for:

* ``k_hat = Q(k)``: the per-tensor global scale from max|k|;
* ``k_hat = Q(k - R_p b_k) + R_p b_k`` (scalesweep_vllm/rope_bias.py): the global
  scale from the residual's max;

and the same two for q (``q_hat`` against the exact k). Q is the runtime MSE sweep,
or AbsMax with ``--method absmax``, per 16 along head_dim at 448*6/amax. Here the
global scales come from the measured tensor itself, not from calibration, so that
only the bias handling differs.

    python studies/study_rope_bias.py --model qwen2.5-coder-1.5b \\
        --json studies/study_rope_bias.json

It prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def capture(model, ids):
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    got, sdpa = {}, ALL_ATTENTION_FUNCTIONS["sdpa"]

    def grab(module, q, k, v, mask, *a, **kw):
        got[module.layer_idx] = (q.detach().float(), k.detach().float())
        return sdpa(module, q, k, v, mask, *a, **kw)

    AttentionInterface.register("study_rope_bias", grab)
    model.config._attn_implementation = "study_rope_bias"
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    return got


def attention_kl(q, k, q_hat, k_hat) -> float:
    rep = q.shape[1] // k.shape[1]
    k, k_hat = k.repeat_interleave(rep, 1), k_hat.repeat_interleave(rep, 1)
    t = q.shape[2]
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
    scale = 1 / math.sqrt(q.shape[-1])
    p = ((q @ k.transpose(-1, -2)) * scale).masked_fill(mask, -1e30).log_softmax(-1)
    p_hat = ((q_hat @ k_hat.transpose(-1, -2)) * scale).masked_fill(mask, -1e30).log_softmax(-1)
    return float((p.exp() * (p - p_hat)).sum(-1).mean())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--method", default="mse", choices=("absmax", "mse"))
    p.add_argument("--json", default="studies/study_rope_bias.json")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scalesweep_vllm import nvfp4
    from scalesweep_vllm.quantize import assets
    from scalesweep_vllm.quantize.pipeline import resolve_model_dir
    from scalesweep_vllm.rope_bias import HFRope, attention_biases, quantize_around
    from scalesweep_vllm.runtime import Part

    t0 = time.perf_counter()
    d = resolve_model_dir(args.model)
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    text = "\n\n".join(assets.evaluation_texts()[:60])
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    caps = capture(model, ids)
    rope = HFRope(model)
    pos = torch.arange(ids.shape[1])[None]

    def fq(x, off):  # x [1, H, T, D] -> quantized in the [T, H, D] layout
        xt = x.transpose(1, 2)
        amax = (xt - off).abs().max() if off is not None else xt.abs().max()
        part = Part(args.method, float(nvfp4.global_scale(amax, "compressed-tensors")))
        return quantize_around(part, xt.contiguous(), off).transpose(1, 2)

    rows = []
    for i, layer in enumerate(model.model.layers):
        q, k = caps[i]
        biases = attention_biases(layer.self_attn)
        offs = rope.offsets(biases, pos, q.shape[-1]) if biases else {}
        ok, oq = offs.get("k"), offs.get("q")
        row = {
            "layer": i,
            "k_amax": float(k.abs().max()),
            "k_residual_amax": float((k.transpose(1, 2) - ok).abs().max())
            if ok is not None
            else None,
            "b_k_amax": float(biases["k"].abs().max()) if "k" in biases else None,
            "kl_k": attention_kl(q, k, q, fq(k, None)),
            "kl_k_rope_bias": attention_kl(q, k, q, fq(k, ok)) if ok is not None else None,
            "kl_q": attention_kl(q, k, fq(q, None), k),
            "kl_q_rope_bias": attention_kl(q, k, fq(q, oq), k) if oq is not None else None,
        }
        rows.append(row)
        print(
            f"{i:3d} |k| {row['k_amax']:7.1f} |k-R b| {row['k_residual_amax'] or 0:6.1f} "
            f"|b_k| {row['b_k_amax'] or 0:6.1f}  KL K {row['kl_k']:.4f} -> "
            f"{row['kl_k_rope_bias'] or 0:.4f}   KL Q {row['kl_q']:.4f} -> "
            f"{row['kl_q_rope_bias'] or 0:.4f}",
            flush=True,
        )
    tot = {
        k: sum(r[k] for r in rows if r[k] is not None)
        for k in ("kl_k", "kl_k_rope_bias", "kl_q", "kl_q_rope_bias")
    }
    print(
        f"sum over layers: KL K {tot['kl_k']:.3f} -> {tot['kl_k_rope_bias']:.3f} "
        f"({tot['kl_k'] / max(tot['kl_k_rope_bias'], 1e-12):.1f}x), KL Q {tot['kl_q']:.3f} -> "
        f"{tot['kl_q_rope_bias']:.3f} ({tot['kl_q'] / max(tot['kl_q_rope_bias'], 1e-12):.1f}x)"
    )
    out = {
        "model": str(d),
        "tokens": int(ids.shape[1]),
        "method": args.method,
        "global_scale": "448*6/amax of the measured tensor (or its residual)",
        "rows": rows,
        "sums": tot,
        "seconds": time.perf_counter() - t0,
        "command": "python studies/study_rope_bias.py " + " ".join(sys.argv[1:]),
    }
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
