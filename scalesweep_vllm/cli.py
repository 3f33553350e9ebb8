"""Console scripts. ``scalesweep-demo``: AbsMax vs ScaleSweep on random blocks.
``scalesweep-quantize``: the offline quantizer (``scalesweep_vllm.quantize``)."""

from __future__ import annotations

import argparse
import sys


def demo_main(argv: list[str] | None = None) -> int:
    """Quantize random tensors with AbsMax, four-over-six and ScaleSweep; print the MSE."""
    import torch

    from . import nvfp4, sweep

    p = argparse.ArgumentParser(
        prog="scalesweep-demo",
        description="Quantize random [rows, cols] tensors to NVFP4 with AbsMax, four-over-six "
        "and ScaleSweep (MSE and weighted MSE) and print each one's mean squared error.",
    )
    p.add_argument("--rows", type=int, default=512, help="rows of each tensor (default 512)")
    p.add_argument(
        "--cols", type=int, default=1024, help="columns, a multiple of 16 (default 1024)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--convention",
        choices=sorted(nvfp4.GLOBAL_SCALE_TARGETS),
        default="paper",
        help="global scale: paper = 256*6/amax (default), compressed-tensors = 448*6/amax",
    )
    args = p.parse_args(argv)
    if args.cols % nvfp4.BLOCK_SIZE:
        p.error(f"--cols must be a multiple of {nvfp4.BLOCK_SIZE}")
    gen = torch.Generator().manual_seed(args.seed)
    dists = {
        "gaussian": torch.randn(args.rows, args.cols, generator=gen),
        "laplace": torch.distributions.Laplace(0.0, 1.0).sample((args.rows, args.cols)),
        "student-t(3)": torch.distributions.StudentT(3.0).sample((args.rows, args.cols)),
    }
    weight = torch.rand(args.cols, generator=gen) ** 2  # an importance per column
    print(f"NVFP4 error, {args.rows}x{args.cols}, global scale convention '{args.convention}'")
    head = f"{'data':<14}{'AbsMax MSE':>12}{'4over6':>10}{'Sweep MSE':>11}{'vs AbsMax':>11}"
    head += f"{'WMSE abs':>11}{'Sweep WMSE':>12}{'vs AbsMax':>11}"
    print(head)
    for name, x in dists.items():
        g = nvfp4.global_scale(x.abs().max(), args.convention)
        s_abs = sweep.absmax_scales(x, g)
        s_46 = sweep.four_over_six_scales(x, g)
        s_mse = sweep.sweep_scales(x, g)
        s_w = sweep.sweep_scales(x, g, weight)
        e = {
            k: sweep.block_errors(x, g, s).mean().item()
            for k, s in (("abs", s_abs), ("46", s_46), ("mse", s_mse))
        }
        ew_abs = sweep.block_errors(x, g, s_abs, weight).mean().item()
        ew = sweep.block_errors(x, g, s_w, weight).mean().item()
        print(
            f"{name:<14}{e['abs']:>12.4e}{e['46']:>10.3e}{e['mse']:>11.4e}"
            f"{1 - e['mse'] / e['abs']:>10.1%} {ew_abs:>10.3e}{ew:>12.4e}{1 - ew / ew_abs:>10.1%}"
        )
    print("(errors are per 16-element block; 'vs AbsMax' is the reduction)")
    return 0


def quantize_main(argv: list[str] | None = None) -> int:
    """Entry point of ``scalesweep-quantize`` (implemented in scalesweep_vllm.quantize)."""
    from .quantize.cli import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(demo_main())
