"""Time GPTQ on ScaleSweep scales per billion parameters (a step of gpu_suite.sh).

    python benchmarks/bench_gptq_gpu.py [--shape llama-3.2-1b] [--layers 2] [--device cuda]

Random weights of a real model's shapes, a random positive definite H per fused
group (``A A^T / n`` of random correlated inputs, as calibration would give), on
the device: for each decoder layer, every fused group goes through
``quantize_group`` as ``quantize_model --gptq`` runs it (WMSE ScaleSweep scales from
diag H, then GPTQ with the defaults, plus the report's RTN/GPTQ output errors),
and also without GPTQ (RTN). The first layer is a warm-up (Triton compilation),
not counted. The H accumulation itself (one ``addmm`` per calibration batch) is
part of calibration and is not timed here (``bench_quantizer.py --end-to-end``
times calibration). Prints seconds per layer and per billion quantized
parameters; writes ``bench_gptq_gpu.json``. Without CUDA (and no ``--device``)
it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from bench_quantizer import SHAPES, environment, layer_groups  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _members(shape, li, device, gen):
    from scalesweep_vllm.quantize.weights import GroupMember

    groups = []
    for group in layer_groups(shape):
        k = group[0][2]
        x = torch.randn(512, k, device=device, generator=gen)
        x = x + 0.5 * x.roll(1, dims=1)  # neighbouring channels correlated
        h = x.T @ x / x.shape[0]
        members = [
            GroupMember(
                name=f"model.layers.{li}.{n}",
                weight=(torch.randn(o, kk, device=device, generator=gen) * 0.02).to(torch.bfloat16),
                wmse_weight=h.diagonal().clone(),
                input_amax=8.0,
            )
            for n, o, kk in group
        ]
        groups.append((members, h))
    return groups


def run(shape_name: str, layers: int, device: torch.device) -> dict:
    from scalesweep_vllm.quantize.gptq import GPTQConfig
    from scalesweep_vllm.quantize.weights import quantize_group

    shape = SHAPES[shape_name]
    gen = torch.Generator(device=device).manual_seed(0)
    cfg = GPTQConfig()
    out = {"rtn": [], "gptq": []}
    params = 0
    red = []
    for li in range(layers + 1):
        groups = _members(shape, li, device, gen)
        for mode in ("rtn", "gptq"):
            _sync(device)
            t0 = time.perf_counter()
            for members, h in groups:
                qs = quantize_group(
                    members,
                    "wmse",
                    "paper",
                    activations=True,
                    gptq=cfg if mode == "gptq" else None,
                    hessian=h,
                    hessian_tokens=512,
                )
                if mode == "gptq" and li > 0:
                    red += [1 - q.metrics["out_err_gptq"] / q.metrics["out_err_rtn"] for q in qs]
            _sync(device)
            if li > 0:
                out[mode].append(time.perf_counter() - t0)
        if li > 0:
            params += sum(m.weight.numel() for g, _ in groups for m in g)
    res = {"shape": shape_name, "layers": layers, "quantized_params": params}
    for mode, ts in out.items():
        res[f"{mode}_s"] = sum(ts)
        res[f"{mode}_s_per_billion_params"] = sum(ts) / (params / 1e9)
    res["gptq_over_rtn"] = res["gptq_s"] / res["rtn_s"]
    res["mean_output_error_reduction"] = sum(red) / len(red)
    # the whole model: per-layer time x layers, per billion of its quantized params
    res["full_model_gptq_s_estimate"] = res["gptq_s"] / layers * shape[2]
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    p.add_argument("--layers", type=int, default=2, help="timed decoder layers (+1 warm-up)")
    p.add_argument("--device", default=None, help="default: cuda (exits 0 without it)")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    args = p.parse_args(argv)
    if args.device is None and not torch.cuda.is_available():
        print("bench_gptq_gpu: no CUDA device; nothing to time (pass --device cpu to force)")
        return 0
    device = torch.device(args.device or "cuda")
    env = environment(device)
    print(json.dumps(env))
    r = run(args.shape, args.layers, device)
    r["environment"] = env
    print(
        f"GPTQ on ScaleSweep WMSE scales, {args.shape} shapes, {r['layers']} layers "
        f"({r['quantized_params'] / 1e6:.0f}M quantized params): RTN {r['rtn_s']:.2f} s "
        f"({r['rtn_s_per_billion_params']:.1f} s/1e9), GPTQ {r['gptq_s']:.2f} s "
        f"({r['gptq_s_per_billion_params']:.1f} s/1e9, {r['gptq_over_rtn']:.1f}x RTN); "
        f"whole model ~{r['full_model_gptq_s_estimate']:.0f} s; output error "
        f"{100 * r['mean_output_error_reduction']:.0f}% below RTN (random data)"
    )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_gptq_gpu.json")
    with open(path, "w") as f:
        json.dump(r, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
