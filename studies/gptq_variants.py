"""Weight-path variants of issue 25 on the default model, KLD to BF16 (W4A16 unless
``--settings``).

Each spec is quantized in memory by the offline quantizer (64 x 256 Wikipedia
calibration tokens unless ``_n``) and scored by the evaluation on the first 16,384
held-out tokens (float32, as ``benchmarks/task_table.py``'s KLD column), one JSON
line per spec appended to ``--out``::

    python studies/gptq_variants.py --out studies/gptq_variants_w4a16.jsonl \\
        'wmse:{"scales":"inloop","_conv":"paper"}' 'wmse:{"actorder":"column"}' hessian

A spec is ``recipe[:json]``: the recipe (absmax, mse, wmse, hessian, four_over_six);
without json, round to nearest; with it, GPTQ with those settings
(:class:`scalesweep_vllm.quantize.gptq.GPTQConfig`) plus ``_conv`` (global-scale
convention; ``_rconv``: the runtime parts' if different), ``_n`` (calibration
samples), ``_damp`` (the hessian objective's damping), ``_rtn`` (no GPTQ).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from scalesweep_vllm.evaluate.run import prepare, quantize_recipe, score_checkpoint
from scalesweep_vllm.quantize.recipe import Recipe

#: spec keys that are recipe fields, not GPTQ settings
_RECIPE_KEYS = {
    "_conv": "global_scale_convention",
    "_rconv": "runtime_global_scale_convention",
    "_n": "num_samples",
    "_damp": "hessian_damp",
}


def recipe_of(spec: str) -> Recipe:
    """The :class:`Recipe` of a spec (module docstring)."""
    objective, _, g = spec.partition(":")
    opts = json.loads(g) if g else None
    kw = {}
    if opts is not None:
        kw = {field: opts.pop(key) for key, field in _RECIPE_KEYS.items() if key in opts}
        if opts.pop("_rtn", False):
            opts = None
    return Recipe(objective=objective, gptq=opts if opts is not None else None, **kw)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("specs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--settings", nargs="+", default=["W4A16"], help="score each checkpoint in these"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ctx = prepare(None, args.tokens, progress=False, dtype="float32")
    for spec in args.specs:
        rec = recipe_of(spec)
        t0 = time.time()
        ck = quantize_recipe(ctx.model_dir, rec, progress=False)
        tq = time.time() - t0
        for setting in args.settings:
            row = score_checkpoint(ctx, ck, setting)
            row.update(spec=spec, quant_s=tq, recipe=rec.to_json())
            h = row.get("halves") or [{}, {}]
            print(
                f"{spec} {setting}: kld {row['kld_mean']:.4f} (halves "
                f"{h[0].get('kld_mean', 0):.4f} / {h[1].get('kld_mean', 0):.4f}), "
                f"ppl {row['ppl']:.3f}, quantized in {tq:.0f} s",
                flush=True,
            )
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
