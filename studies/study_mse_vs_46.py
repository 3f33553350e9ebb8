#!/usr/bin/env python
"""Where ScaleSweep MSE loses perplexity to four-over-six (issue 16): swap one
layer type at a time between the two recipes' weights, and the runtime method
between them, and measure perplexity and KLD on the same held-out tokens.

    python studies/study_mse_vs_46.py --tokens 16384 --json benchmarks/out/mse_vs_46.json

Both recipes are quantized once in memory by ``quantize_model`` (paper global
scale; reused from ``eval_table.py``'s recipe cache when there). They share every
global scale (a function of amax alone), so a mixed checkpoint, MSE weights with
type T's weights taken from four-over-six, is a valid checkpoint of its own.
Rows (W4A16 unless named): MSE; four-over-six; MSE with each type from four-over-six;
four-over-six with each type from MSE; and in W4A4 the four combinations of weight
method and runtime (activation) method. Per layer type it also prints what the
weights look like: the fraction of blocks whose MSE scale lies below AbsMax's
(clipping the block maximum), and the relative change of the weights' squared norm
(shrinkage) under each recipe.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _recipe(ctx, recipe: str, cache: Path):
    import torch

    from scalesweep_vllm.evaluate.model import Checkpoint
    from scalesweep_vllm.evaluate.run import quantize_recipe

    saved = cache / f"{recipe}-paper.pt"
    if saved.is_file():
        return Checkpoint.from_contents(torch.load(saved, weights_only=False), recipe)
    c = quantize_recipe(ctx.model_dir, recipe, "paper", "cpu", False)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"config": c.config, "tensors": c.tensors, "meta": c.meta, "vectors": c.vectors}, saved
    )
    return c


def mix(base, other, types: tuple[str, ...], name: str):
    """``base`` with the weights (codes and block scales) of ``types`` from ``other``."""
    import torch

    from scalesweep_vllm.evaluate.model import Checkpoint

    tensors = dict(base.tensors)
    for layer in base.quantized_linears():
        if layer.rsplit(".", 1)[-1] in types:
            g = f"{layer}.weight_global_scale"
            if not torch.equal(base.tensors[g], other.tensors[g]):
                raise ValueError(f"{layer}: the recipes' weight global scales differ")
            for k in ("weight_packed", "weight_scale"):
                tensors[f"{layer}.{k}"] = other.tensors[f"{layer}.{k}"]
    return Checkpoint(base.config, tensors, base.meta, base.vectors, name)


@functools.lru_cache(maxsize=1)
def _original_weights(model_dir) -> dict:
    """The BF16 model's tensors by name (read once per run: several rows need them)."""
    from safetensors.torch import load_file

    orig = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        orig.update(load_file(str(f)))
    return orig


FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}


def norm_restored(ckpt, model_dir, name: str):
    """``ckpt`` with each fused group's weight global scale divided by
    ``beta = sqrt(sum w^2 / sum w_hat^2)`` over the group: the decoded weights scaled
    back to the original squared norm (MSE-optimal rounding shrinks it by the error's
    own energy: E[w_hat^2] = E[w^2] - MSE where the error is orthogonal to w_hat).
    The codes stay; one factor per fused group, as vLLM's FP4 GEMM takes one scale."""
    import torch

    from scalesweep_vllm import kernels
    from scalesweep_vllm.evaluate.model import Checkpoint

    orig = _original_weights(model_dir)
    groups: dict[str, list[str]] = {}
    for layer in ckpt.quantized_linears():
        parent, t = layer.rsplit(".", 1)
        groups.setdefault(f"{parent}.{FUSED.get(t, t)}", []).append(layer)
    tensors = dict(ckpt.tensors)
    for members in groups.values():
        sq = sq_q = 0.0
        for layer in members:
            g = ckpt.tensors[f"{layer}.weight_global_scale"].float()
            deq = kernels.dequantize(
                ckpt.tensors[f"{layer}.weight_packed"],
                ckpt.tensors[f"{layer}.weight_scale"],
                g,
                torch.float32,
            )
            sq += float(orig[f"{layer}.weight"].double().square().sum())
            sq_q += float(deq.double().square().sum())
        beta = (sq / sq_q) ** 0.5 if sq_q > 0 else 1.0
        for layer in members:
            k = f"{layer}.weight_global_scale"
            tensors[k] = ckpt.tensors[k] / beta
    return Checkpoint(ckpt.config, tensors, ckpt.meta, ckpt.vectors, name)


def no_clip_mse(ckpt, model_dir, name: str):
    """``ckpt`` with every weight re-quantized by MSE restricted to codes at or above
    the AbsMax code c0 (``[c0, hi]``, hi the sweep's proven upper bound): never clips
    a block's largest element, as four-over-six never does, and otherwise the MSE
    optimum (so its MSE is at most four-over-six's)."""
    import torch

    from scalesweep_vllm import nvfp4, sweep
    from scalesweep_vllm.evaluate.model import Checkpoint

    orig = _original_weights(model_dir)
    tensors = dict(ckpt.tensors)
    for layer in ckpt.quantized_linears():
        w = orig[f"{layer}.weight"].float()
        g = ckpt.tensors[f"{layer}.weight_global_scale"].float().reshape(())
        a, _ = sweep._objective(w, g, None)
        _, hi, c0 = sweep._stage1_blocks(a, g, None)
        codes = sweep._argmin_over_codes(a, g, None, c0, torch.maximum(hi, c0))[0]
        scales = sweep._codes_to_scales(codes.reshape(sweep._scale_shape(w)))
        tensors[f"{layer}.weight_scale"] = scales
        tensors[f"{layer}.weight_packed"] = nvfp4.pack_fp4(sweep.quantize_codes(w, g, scales))
    return Checkpoint(ckpt.config, tensors, ckpt.meta, ckpt.vectors, name)


def no_clip_wmse(ctx):
    """WMSE quantized by ``quantize_model`` with each weight's codes restricted to
    ``[c0, hi]`` (the reference's candidate errors, weighted as the quantizer weighs
    them): whether the default recipe gains from never clipping a block maximum."""
    from unittest import mock

    import torch

    from scalesweep_vllm import nvfp4, sweep
    from scalesweep_vllm.evaluate.run import quantize_recipe
    from scalesweep_vllm.quantize import objectives

    class NoClipWMSE(objectives.DiagonalWMSE):
        def quantize(self, w, g_w, diag, prepared):
            w32 = w.float()
            g, wt = sweep.validate(w32, g_w, diag)
            a, wn = sweep._objective(w32, g, wt)
            _, hi, c0 = sweep._stage1_blocks(a, g, wn)
            codes = sweep._argmin_over_codes(a, g, wn, c0, torch.maximum(hi, c0))[0]
            scales = sweep._codes_to_scales(codes.reshape(sweep._scale_shape(w32)))
            return nvfp4.pack_fp4(sweep.quantize_codes(w32, g, scales)).to(w.device), scales

    with mock.patch.dict(objectives.REGISTRY, {"wmse": NoClipWMSE}):
        return quantize_recipe(ctx.model_dir, "wmse", "paper", "cpu", False)


def weight_stats(ckpt, model_dir) -> dict:
    """Per type: fraction of blocks whose scale is below AbsMax's code, and the
    relative change of sum w^2 (decoded vs bf16)."""
    import torch

    from scalesweep_vllm import kernels, sweep

    orig = _original_weights(model_dir)
    out = {t: {"blocks": 0, "below": 0, "sq": 0.0, "sq_q": 0.0} for t in TYPES}
    for layer in ckpt.quantized_linears():
        t = layer.rsplit(".", 1)[-1]
        if t not in out:
            continue
        w = orig[f"{layer}.weight"].float()
        g = ckpt.tensors[f"{layer}.weight_global_scale"].float()
        codes = ckpt.tensors[f"{layer}.weight_scale"].view(torch.uint8).long()
        c0 = sweep.absmax_codes(w, g)
        deq = kernels.dequantize(
            ckpt.tensors[f"{layer}.weight_packed"],
            ckpt.tensors[f"{layer}.weight_scale"],
            g,
            torch.float32,
        )
        s = out[t]
        s["blocks"] += codes.numel()
        s["below"] += int((codes < c0).sum())
        s["sq"] += float(w.double().square().sum())
        s["sq_q"] += float(deq.double().square().sum())
    return {
        t: {"below_absmax": s["below"] / max(s["blocks"], 1), "sq_change": s["sq_q"] / s["sq"] - 1}
        for t, s in out.items()
    }


TEMPERATURES = (0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.3)


def temperature_nll(model, tokens, temps=TEMPERATURES):
    """Mean NLL of the true next token under softmax(logits / T), per T and per half
    of the windows: [2, len(temps)] (float64)."""
    import torch

    w = tokens.shape[0]
    tot = torch.zeros(2, len(temps), dtype=torch.float64)
    with torch.no_grad():
        for s in range(w):
            ids = tokens[s : s + 1]
            z = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            y = ids[0, 1:]
            for i, t in enumerate(temps):
                lp = torch.log_softmax(z / t, dim=-1).gather(-1, y[:, None])
                tot[int(s >= w // 2), i] -= lp.double().sum()
    return tot / (tokens.shape[1] - 1) / (w // 2)


def temperature_rows(ctx, sources) -> list[dict]:
    """Perplexity at the temperature that is best on one half, measured on the other:
    how much of a recipe's perplexity is confidence (a flatter or sharper distribution)
    rather than information lost."""
    import math

    from scalesweep_vllm.evaluate.model import build_model, runtime_settings

    rows = []
    for label, ck in sources:
        if ck is None:
            from transformers import AutoModelForCausalLM

            m = AutoModelForCausalLM.from_pretrained(ctx.model_dir, dtype=ctx.dtype).eval()
        else:
            m = build_model(ck, runtime_settings(ck, "W4A16"), ctx.dtype, ctx.device)
        nll = temperature_nll(m, ctx.ids)
        best = [int(nll[h].argmin()) for h in (0, 1)]
        cross = [float(nll[1 - h, best[h]]) for h in (0, 1)]  # fitted on h, scored on 1-h
        rows.append(
            {
                "label": label,
                "temperatures": list(TEMPERATURES),
                "nll_halves": nll.tolist(),
                "best_t_halves": [TEMPERATURES[b] for b in best],
                "ppl_t1": math.exp(float(nll[:, TEMPERATURES.index(1.0)].mean())),
                "ppl_cross_fitted": math.exp(sum(cross) / 2),
            }
        )
        print(
            f"| {label} | {rows[-1]['ppl_t1']:.3f} | {rows[-1]['best_t_halves']} "
            f"| {rows[-1]['ppl_cross_fitted']:.3f} |",
            flush=True,
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="benchmarks/out/mse_vs_46.json")
    p.add_argument("--recipe-cache", default="/tmp/scalesweep-recipes")
    p.add_argument("--no-clip", action="store_true", help="only the no-clip MSE rows")
    p.add_argument("--no-clip-wmse", action="store_true", help="only the no-clip WMSE rows")
    p.add_argument(
        "--norm-restore", action="store_true", help="only the norm-restored rows (a second run)"
    )
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from scalesweep_vllm.evaluate.run import prepare, score_checkpoint

    ctx = prepare(None, args.tokens, progress=False)
    cache = Path(args.recipe_cache)
    mse, fos = _recipe(ctx, "mse", cache), _recipe(ctx, "four_over_six", cache)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"header": ctx.header(), "weights": {}, "rows": []}
    data["weights"] = {
        "mse": weight_stats(mse, ctx.model_dir),
        "four_over_six": weight_stats(fos, ctx.model_dir),
    }
    print("| type | MSE blocks below AbsMax | MSE sum w^2 change | 4/6 sum w^2 change |")
    print("|---|---|---|---|")
    for t in TYPES:
        a, b = data["weights"]["mse"][t], data["weights"]["four_over_six"][t]
        print(f"| {t} | {a['below_absmax']:.1%} | {a['sq_change']:+.3%} | {b['sq_change']:+.3%} |")
    if args.no_clip_wmse:
        out = out.with_name(out.stem + "_noclip_wmse.json")
        wm, nc = _recipe(ctx, "wmse", cache), no_clip_wmse(ctx)
        runs = [
            (f"WMSE{x}", ck, s, None)
            for s in ("W4A16", "W4A4")
            for x, ck in (("", wm), (", codes >= c0", nc))
        ]
    elif args.no_clip:
        out = out.with_name(out.stem + "_noclip.json")
        nc = no_clip_mse(mse, ctx.model_dir, "MSE without clipping")
        runs = [("MSE, codes >= c0 (no clipping)", nc, "W4A16", None)]
        runs += [("MSE, codes >= c0 (no clipping)", nc, "W4A4", None)]
    elif args.norm_restore:
        out = out.with_name(out.stem + "_norm.json")
        mse_n = norm_restored(mse, ctx.model_dir, "MSE norm-restored")
        fos_n = norm_restored(fos, ctx.model_dir, "4/6 norm-restored")
        runs = [
            ("MSE, norm-restored", mse_n, "W4A16", None),
            ("4/6, norm-restored", fos_n, "W4A16", None),
            ("MSE, norm-restored", mse_n, "W4A4", None),
            ("4/6, norm-restored", fos_n, "W4A4", None),
        ]
    else:
        runs = [("MSE", mse, "W4A16", None), ("four-over-six", fos, "W4A16", None)]
    for t in TYPES if not args.norm_restore else ():
        runs.append((f"MSE, {t} from 4/6", mix(mse, fos, (t,), t), "W4A16", None))
    for t in TYPES if not args.norm_restore else ():
        runs.append((f"4/6, {t} from MSE", mix(fos, mse, (t,), t), "W4A16", None))
    runs += (
        []
        if args.norm_restore
        else [
            ("MSE weights, MSE acts", mse, "W4A4", None),
            ("MSE weights, 4/6 acts", mse, "W4A4", "four_over_six"),
            ("4/6 weights, MSE acts", fos, "W4A4", "mse"),
            ("4/6 weights, 4/6 acts", fos, "W4A4", None),
        ]
    )
    print("\n| run | setting | perplexity | KLD | top-1 | s |")
    print("|---|---|---|---|---|---|")
    for label, ck, setting, rt in runs:
        t0 = time.perf_counter()
        row = score_checkpoint(ctx, ck, setting, rt)
        row["label"] = label
        data["rows"].append(row)
        out.write_text(json.dumps(data, indent=1) + "\n")
        print(
            f"| {label} | {setting} | {row['ppl']:.3f} | {row['kld_mean']:.4f} "
            f"| {row['top1']:.2%} | {time.perf_counter() - t0:.0f} |",
            flush=True,
        )
    print("\n| model (W4A16) | perplexity | best T (half 1, half 2) | ppl at the other half's T |")
    print("|---|---|---|---|")
    data["temperature"] = temperature_rows(
        ctx, [("BF16", None), ("MSE", mse), ("four-over-six", fos)]
    )
    out.write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
