"""Issue 25, part 3: a block-Hessian objective for Linear inputs at run time.

A Linear's output error from an input block's error ``e`` (16 input features) is
``||W e||^2 = e^T (W^T W)_b e``; today's runtime WMSE keeps its diagonal
``sum_j W_ji^2`` (the checkpoint's ``input_weight``). This study quantizes the
default model's W4A4 activations with the full 16x16 blocks of ``G = sum_P W_P^T
W_P`` over the fused partners P (the decoded NVFP4 weights, as served) through the
block-Hessian sweep (C++ kernel, exact), against the diagonal, on the same
checkpoint (the default ``--gptq`` recipe), and times both evaluations::

    python studies/activation_hessian.py --out studies/activation_hessian.json

Not shipped: the plugin's runtime methods stay absmax/mse/wmse (see the JSON and
benchmarks/RESULTS.md for why).
"""

from __future__ import annotations

import argparse
import json
import time
from unittest import mock

import torch

from scalesweep_vllm import hessian_sweep, kernels, sweep
from scalesweep_vllm.evaluate import model as eval_model
from scalesweep_vllm.evaluate.run import prepare, quantize_recipe, score_checkpoint
from scalesweep_vllm.quantize.objectives import block_hessians
from scalesweep_vllm.quantize.recipe import Recipe


class BlockHessianPart:
    """A runtime Linear-input quantizer with the block objective ``e^T G_b e``."""

    method = "hessian"

    def __init__(self, global_scale, factors):
        self.global_scale = torch.as_tensor(global_scale, dtype=torch.float32).reshape(())
        self.factors = factors

    def to(self, device):
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
        scales = kernels.hessian_sweep_scales(x2, self.global_scale, self.factors)
        y = sweep.quantize_dequantize(x2, self.global_scale, scales)
        return y.to(x.dtype).reshape(x.shape)


def _gram(ckpt, names):
    """``sum_P W_P^T W_P`` of the decoded weights of a fused group."""
    g = None
    for n in names:
        t = ckpt.tensors
        w = kernels.dequantize(
            t[f"{n}.weight_packed"], t[f"{n}.weight_scale"], t[f"{n}.weight_global_scale"],
            torch.float32,
        )  # fmt: skip
        g = w.T @ w if g is None else g + w.T @ w
    return g


def patched_parts(damp):
    real = eval_model._linear_parts

    def parts(model, ckpt, method, input_gs):
        out = real(model, ckpt, method, input_gs)
        groups: dict[int, list[str]] = {}
        for name, part in out.items():
            groups.setdefault(id(part), []).append(name)
        for names in groups.values():
            f = hessian_sweep.hessian_factors(block_hessians(_gram(ckpt, names)), damp=damp)
            hp = BlockHessianPart(out[names[0]].global_scale, f)
            for n in names:
                out[n] = hp
        return out

    return parts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--damp", type=float, default=hessian_sweep.DEFAULT_DAMP)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ctx = prepare(None, args.tokens, progress=False, dtype="float32")
    ck = quantize_recipe(ctx.model_dir, Recipe(gptq=True), progress=False)
    rows = {}
    for label in ("wmse (diagonal)", "block Hessian", "wmse (diagonal) again"):
        t0 = time.time()
        if label == "block Hessian":
            with mock.patch.object(eval_model, "_linear_parts", patched_parts(args.damp)):
                row = score_checkpoint(ctx, ck, "W4A4")
        else:
            row = score_checkpoint(ctx, ck, "W4A4")
        row["eval_s"] = time.time() - t0
        rows[label] = row
        h = row.get("halves") or [{}, {}]
        print(
            f"{label}: kld {row['kld_mean']:.4f} (halves {h[0].get('kld_mean', 0):.4f} / "
            f"{h[1].get('kld_mean', 0):.4f}), evaluated in {row['eval_s']:.0f} s",
            flush=True,
        )
    with open(args.out, "w") as f:
        json.dump({"damp": args.damp, "tokens": args.tokens, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
