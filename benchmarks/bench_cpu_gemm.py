"""The packed NVFP4 GEMMs on the CPU against bf16 GEMMs, per Linear shape of a model:
time per call and the ratio to bf16, measured in one run.

Rows per shape (N x K) and batch M:

* ``vllm bf16``: vLLM's own CPU GEMM for an unquantized bf16 weight
  (``dispatch_cpu_unquantized_gemm``: oneDNN here, sgl-kernel on AMX machines); also
  what our ``dequant`` backend runs after decoding at load. Skipped without vLLM.
* ``torch bf16`` / ``torch fp32``: ``F.linear``.
* ``packed W4A16``: :func:`scalesweep_vllm.kernels.cpu_gemm.w4a16` (bf16 input).
* ``packed W4A4``: ScaleSweep (MSE) quantization of the input plus
  :func:`~scalesweep_vllm.kernels.cpu_gemm.w4a4`, as the plugin calls them.

    python benchmarks/bench_cpu_gemm.py                    # Qwen2.5-1.5B's shapes
    python benchmarks/bench_cpu_gemm.py --shapes smollm2 --m 1 8 128

Prints the environment and a table; writes JSON to ``${OUT:-benchmarks/out}``. Median
of ``--repeats`` timed calls after a warm-up.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # (name, N, K): the Linear layers of one decoder block, fused as vLLM fuses them
    "qwen1.5b": [("qkv", 2048, 1536), ("o", 1536, 1536), ("gate_up", 17920, 1536),
                 ("down", 1536, 8960)],
    "smollm2": [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536)],
}  # fmt: skip


def _median(f, repeats: int) -> float:
    f()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]


def _vllm_gemm(w: torch.Tensor):
    """vLLM's CPU GEMM for this bf16 weight, or None without vLLM."""
    try:
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    except Exception:  # noqa: BLE001 - no vLLM (the GPU machine): skip the row
        return None
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    return lambda x: layer.cpu_linear(x, layer.weight, None)


def _time_all(x, w, pw16, pw4, ga, vgemm, reps: int) -> dict[str, float]:
    """Seconds per call of each GEMM for input x (fp32; bf16 copy for the bf16 rows)."""
    from scalesweep_vllm import kernels
    from scalesweep_vllm.kernels import cpu_gemm

    xb, wb = x.bfloat16(), w.bfloat16()
    t = {
        "torch bf16": _median(lambda: torch.nn.functional.linear(xb, wb), reps),
        "torch fp32": _median(lambda: torch.nn.functional.linear(x, w), reps),
        "packed W4A16": _median(lambda: cpu_gemm.w4a16(xb, pw16).bfloat16(), reps),
        "packed W4A4": _median(
            lambda: cpu_gemm.w4a4(*kernels.quantize(xb, ga, "mse"), pw4).bfloat16(), reps
        ),
    }
    if vgemm is not None:
        t["vllm bf16"] = _median(lambda: vgemm(xb), reps)
    return t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", choices=sorted(SHAPES), default="qwen1.5b")
    p.add_argument("--m", type=int, nargs="+", default=[1, 8, 128], help="batch rows")
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)

    from scalesweep_vllm import kernels
    from scalesweep_vllm.kernels import cpu_backend, cpu_build, cpu_gemm

    why = cpu_gemm.available()
    if why:
        raise SystemExit(f"packed GEMM unavailable: {why}")
    env = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "isa": cpu_backend.isa(),
        "cpu_levels": cpu_build.cpu_isas(),
        "bf16_units": cpu_build.bf16_units(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
    }
    for k, v in env.items():
        print(f"{k}: {v}")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, n, k in SHAPES[args.shapes]:
        w = torch.randn(n, k, generator=gen) * 0.02
        gw = 448 * 6 / float(w.abs().max())
        packed, scales = kernels.quantize(w, gw, "mse")
        pw16 = cpu_gemm.pack(packed, scales, torch.full((n,), gw))
        wb, wf = w.bfloat16(), w
        vgemm = _vllm_gemm(wb)
        for m in args.m:
            x = torch.randn(m, k, generator=gen)
            ga = 448 * 6 / float(x.abs().max())
            pw4 = cpu_gemm.pack(packed, scales, torch.full((n,), 1.0 / (ga * gw)), "w4a4")
            reps = max(3, args.repeats // (1 if m < 64 else 3))
            t = _time_all(x, wf, pw16, pw4, ga, vgemm, reps)
            base = t.get("vllm bf16", t["torch bf16"])
            row = {"layer": name, "n": n, "k": k, "m": m, "seconds": t,
                   "speedup_vs_bf16": {c: base / s for c, s in t.items()}}  # fmt: skip
            rows.append(row)
            print(
                f"  {name} {n}x{k} M={m}: "
                + ", ".join(f"{c} {s * 1e3:.3f} ms" for c, s in t.items())
            )
    cols = ["vllm bf16", "torch bf16", "torch fp32", "packed W4A16", "packed W4A4"]
    cols = [c for c in cols if c in rows[0]["seconds"]]
    lines = ["| layer | N x K | M | " + " | ".join(f"{c} ms" for c in cols)
             + " | W4A16 vs bf16 | W4A4 vs bf16 |", "|" + "---|" * (len(cols) + 5)]  # fmt: skip
    for r in rows:
        s = r["seconds"]
        lines.append(
            f"| {r['layer']} | {r['n']}x{r['k']} | {r['m']} | "
            + " | ".join(f"{s[c] * 1e3:.3f}" for c in cols)
            + f" | {r['speedup_vs_bf16']['packed W4A16']:.2f}x"
            + f" | {r['speedup_vs_bf16']['packed W4A4']:.2f}x |"
        )
    print("bf16 = " + ("vLLM's CPU GEMM" if "vllm bf16" in cols else "torch's F.linear"))
    table = "\n".join(lines)
    print(table)
    out = Path(os.environ.get("OUT", "benchmarks/out"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_cpu_gemm_{args.shapes}.json"
    path.write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
