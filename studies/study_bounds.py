"""Study of the ScaleSweep reference on synthetic blocks (CPU, about a minute).

Prints four tables and writes them as JSON to ``${OUT:-benchmarks/out}/study_bounds.json``:

1. candidates per block under our bounds (MSE, WMSE) vs 126 and the paper's windows;
2. error reduction of ScaleSweep vs AbsMax and vs four-over-six;
3. the global-scale convention (block-scale ceiling T in G = T*6/amax);
4. where the exhaustive MSE optimum lies below c0-3 (the old, false floor): two-level
   blocks at mid-range codes, and unsaturated blocks at the top of the FP8 range
   (AbsMax codes 100..126, the other fifteen clustered at 0.6-0.9 of the maximum).

Usage: python studies/study_bounds.py [--blocks N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from scalesweep_vllm import nvfp4, sweep


def distributions(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "gaussian": torch.randn(n, 16, generator=gen),
        "laplace": torch.distributions.Laplace(0.0, 1.0).sample((n, 16)),
        "student-t(3)": torch.distributions.StudentT(3.0).sample((n, 16)),
    }


def weights_like(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-column importances like calibration E[x^2]: log-normal, a few near zero."""
    w = torch.exp(torch.randn(x.shape[-1], generator=gen) * 1.5)
    return torch.where(torch.rand(x.shape[-1], generator=gen) < 0.05, 0.0, w)


def mean_err(x, g, scales, w=None) -> float:
    return float(sweep.block_errors(x, g, scales, w).double().mean())


def table_candidates(n, gen):
    rows = []
    for name, x in distributions(n, gen).items():
        x = x.reshape(-1, 256)
        g = nvfp4.global_scale(x.abs().max())
        for obj, w in (("mse", None), ("wmse", weights_like(x, gen))):
            lo, hi = sweep.sweep_bounds(x, g, w)
            k = (hi - lo + 1).float()
            ex = sweep.sweep_codes(x, g, w, exhaustive=True)
            c0 = sweep.absmax_codes(x, g)
            # MSE: blocks whose window reaches below c0 - 3 (the sweep's second stage)
            stage2 = float((lo < c0 - 3).float().mean()) if w is None else 0.0
            rows.append(
                {
                    "data": name,
                    "objective": obj,
                    "mean_candidates": round(float(k.mean()), 2),
                    "max_candidates": int(k.max()),
                    "exhaustive": 126,
                    "paper_window": 11 if obj == "mse" else 16,
                    "bounded_equals_exhaustive": bool(torch.equal(ex, sweep.sweep_codes(x, g, w))),
                    "optimum_offset_min": int((ex - c0).min()),
                    "optimum_offset_max": int((ex - c0).max()),
                    "stage2_fraction": stage2,
                }
            )
    return rows


def table_reduction(n, gen):
    rows = []
    for name, x in distributions(n, gen).items():
        x = x.reshape(-1, 256)
        g = nvfp4.global_scale(x.abs().max())
        w = weights_like(x, gen)
        s_abs = sweep.absmax_scales(x, g)
        s_46 = sweep.four_over_six_scales(x, g)
        s_46w = sweep.four_over_six_scales(x, g, w)
        e_abs, e_46 = mean_err(x, g, s_abs), mean_err(x, g, s_46)
        e_sw = mean_err(x, g, sweep.sweep_scales(x, g))
        ew_abs, ew_46 = mean_err(x, g, s_abs, w), mean_err(x, g, s_46w, w)
        ew_sw = mean_err(x, g, sweep.sweep_scales(x, g, w), w)
        ew_mse_scales = mean_err(x, g, sweep.sweep_scales(x, g), w)
        rows.append(
            {
                "data": name,
                "mse_absmax": e_abs,
                "mse_4over6": e_46,
                "mse_sweep": e_sw,
                "mse_cut_vs_absmax": 1 - e_sw / e_abs,
                "mse_cut_vs_4over6": 1 - e_sw / e_46,
                "wmse_cut_vs_absmax": 1 - ew_sw / ew_abs,
                "wmse_cut_vs_4over6": 1 - ew_sw / ew_46,
                "wmse_cut_vs_mse_sweep": 1 - ew_sw / ew_mse_scales,
            }
        )
    return rows


def table_global_scale(n, gen):
    """Rows of a weight-like tensor with log-normal row scales (so blocks span many
    octaves), quantized with G = T * 6 / amax for several ceilings T."""
    x = torch.randn(n // 16, 256, generator=gen) * torch.exp(torch.randn(n // 16, 1, generator=gen))
    amax = x.abs().reshape(-1, 16).amax(-1).reshape(x.shape[0], -1)
    top = amax >= 0.5 * amax.max()  # the largest blocks, where saturation at 448 bites
    rows = []
    for target in (8, 32, 128, 256, 384, 448):
        g = torch.tensor([target * 6 / float(x.abs().max())])
        r = {"ceiling_T": target}
        for k, s in (
            ("absmax", sweep.absmax_scales(x, g)),
            ("4over6", sweep.four_over_six_scales(x, g)),
            ("sweep_mse", sweep.sweep_scales(x, g)),
        ):
            e = sweep.block_errors(x, g, s).double()
            r[k], r[k + "_top"] = float(e.mean()), float(e[top].mean())
        rows.append(r)
    base = rows[[r["ceiling_T"] for r in rows].index(448)]
    for r in rows:
        for k in ("absmax", "4over6", "sweep_mse"):
            r[k + "_vs_absmax_448"] = r[k] / base["absmax"]
            r[k + "_top_vs_absmax_448"] = r[k + "_top"] / base["absmax_top"]
    return rows


def top_of_range_blocks(c0: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Unsaturated blocks (for G = 1) with AbsMax code c0 (m/6 rounds to it; at c0 =
    126 up to 448 * 1.01), the other fifteen clustered at 0.6-0.9 m (tests/test_sweep.py
    has the same class)."""
    fp8 = nvfp4.fp8_values()
    v = fp8[c0]
    lo = (fp8[c0 - 1] + v) / 2
    hi = (fp8[c0 + 1] + v) / 2 if c0 < 126 else 448 * 1.01
    m = 6 * (lo + (hi - lo) * torch.rand(n, 1, generator=gen))
    centre = 0.6 + 0.3 * torch.rand(n, 1, generator=gen)
    width = 0.15 * torch.rand(n, 1, generator=gen)
    return torch.cat([m, m * (centre + width * (torch.rand(n, 15, generator=gen) - 0.5))], 1)


def top_of_range(n, gen):
    """Per AbsMax code 100..126: the lowest optimum offset and how many blocks have
    their exhaustive MSE optimum below c0 - 3; bounded == exhaustive on all of them."""
    rows = []
    for c0 in range(100, 127):
        x = top_of_range_blocks(c0, n, gen)
        ex = sweep.sweep_codes(x, 1.0, exhaustive=True).flatten()
        lo, _ = sweep.sweep_bounds(x, 1.0)
        rows.append(
            {
                "c0": c0,
                "blocks": n,
                "min_offset": int((ex - c0).min()),
                "below_c0_minus_3": int((ex < c0 - 3).sum()),
                "stage2_blocks": int((lo.flatten() < c0 - 3).sum()),
                "bounded_equals_exhaustive": bool(
                    torch.equal(sweep.sweep_codes(x, 1.0).flatten(), ex)
                ),
            }
        )
    return rows


def adversarial_lower_offset(n, gen):
    """Structured blocks (one max element, the rest on one or two levels chosen to
    fit a smaller scale) where a scale below c0 is most tempting. Counts blocks
    whose exhaustive MSE optimum lies below c0 - 3."""
    m = torch.ones(n, 1)
    lvl1 = torch.rand(n, 1, generator=gen) * 1.0
    lvl2 = torch.rand(n, 1, generator=gen) * 1.0
    k = torch.randint(1, 16, (n, 1), generator=gen)
    idx = torch.arange(15)[None, :]
    rest = torch.where(idx < k, lvl1, lvl2) + torch.randn(n, 15, generator=gen) * 1e-3
    x = torch.cat([m, rest], dim=1)
    g = torch.tensor([6.0 * torch.exp2(torch.randint(-3, 4, (1,), generator=gen).float()).item()])
    c0 = sweep.absmax_codes(x, g).flatten()
    ex = sweep.sweep_codes(x, g, exhaustive=True).flatten()
    off = ex - c0
    return {
        "blocks": n,
        "min_offset": int(off.min()),
        "below_c0_minus_3": int((off < -3).sum()),
        "at_c0_minus_3": int((off == -3).sum()),
    }


def fmt_table(rows, cols, fmts):
    head = "".join(f"{c:>{max(len(c), 10) + 2}}" for c in cols)
    lines = [head]
    for r in rows:
        lines.append(
            "".join(
                f"{format(r[c], f):>{max(len(c), 10) + 2}}" for c, f in zip(cols, fmts, strict=True)
            )
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--blocks", type=int, default=65536, help="blocks per distribution")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }
    print("environment:", env)
    res = {"env": env, "blocks_per_distribution": args.blocks}
    res["candidates"] = table_candidates(args.blocks, gen)
    print("\n1. candidates per block (paper global scale 256*6/amax)")
    print(
        fmt_table(
            res["candidates"],
            [
                "data",
                "objective",
                "mean_candidates",
                "max_candidates",
                "paper_window",
                "exhaustive",
                "bounded_equals_exhaustive",
                "stage2_fraction",
            ],
            ["", "", ".2f", "d", "d", "d", "", ".5f"],
        )
    )
    res["reduction"] = table_reduction(args.blocks, gen)
    print("\n2. mean block error: reduction by ScaleSweep")
    print(
        fmt_table(
            res["reduction"],
            [
                "data",
                "mse_cut_vs_absmax",
                "mse_cut_vs_4over6",
                "wmse_cut_vs_absmax",
                "wmse_cut_vs_4over6",
                "wmse_cut_vs_mse_sweep",
            ],
            ["", ".1%", ".1%", ".1%", ".1%", ".1%"],
        )
    )
    res["global_scale"] = table_global_scale(args.blocks, gen)
    print("\n3. global scale G = T*6/amax (error relative to AbsMax at T=448, log-normal rows)")
    print(
        fmt_table(
            res["global_scale"],
            [
                "ceiling_T",
                "absmax_vs_absmax_448",
                "4over6_vs_absmax_448",
                "sweep_mse_vs_absmax_448",
            ],
            ["d", ".3f", ".3f", ".3f"],
        )
    )
    print("   the same on the largest blocks only (amax >= half the tensor's amax)")
    print(
        fmt_table(
            res["global_scale"],
            [
                "ceiling_T",
                "absmax_top_vs_absmax_448",
                "4over6_top_vs_absmax_448",
                "sweep_mse_top_vs_absmax_448",
            ],
            ["d", ".3f", ".3f", ".3f"],
        )
    )
    res["adversarial"] = adversarial_lower_offset(args.blocks * 2, gen)
    print("\n4. adversarial two-level blocks, exhaustive MSE optimum vs c0:", res["adversarial"])
    res["top_of_range"] = top_of_range(max(args.blocks // 32, 256), gen)
    print("   unsaturated blocks at the top of the FP8 range (G = 1):")
    print(
        fmt_table(
            res["top_of_range"],
            [
                "c0",
                "blocks",
                "min_offset",
                "below_c0_minus_3",
                "stage2_blocks",
                "bounded_equals_exhaustive",
            ],
            ["d", "d", "d", "d", "d", ""],
        )
    )
    out = os.environ.get("OUT", "benchmarks/out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "study_bounds.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(f"\nwrote {out}/study_bounds.json in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
