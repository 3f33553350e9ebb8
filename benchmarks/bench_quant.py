"""Benchmark the NVFP4 quantize kernels on a CUDA GPU.

    python benchmarks/bench_quant.py [--check] [--shapes 8192x8192 16384x4096] [--out DIR]

Times with ``triton.testing.do_bench`` (median), inputs rotated over several copies so
that each call reads from HBM, not L2. Rows: AbsMax kernel, ScaleSweep MSE and WMSE
kernels, the torch reference (timed on a slice of rows and scaled up: it says so), and a
device-to-device copy of the input as the bandwidth ceiling.

Bytes per element: quantize reads 2 B (bf16) and writes 0.5 B + 1/16 B (codes, scales);
the copy reads and writes 2 B each. ``bw_vs_copy`` = (kernel GB/s) / (copy GB/s).
Prints the environment first, then a table; writes JSON to ``${OUT:-benchmarks/out}``.
Without CUDA it prints a message and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

L2_BYTES = 50 << 20  # H100: 50 MiB


def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(
            device=p.name,
            capability=f"{p.major}.{p.minor}",
            sms=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1),
        )
    return env


def _parse_shape(s: str) -> tuple[int, int]:
    m, k = s.lower().split("x")
    return int(m), int(k)


def _rotating(fn_of_input, inputs):
    """A thunk calling fn on the next input each time (defeats L2 reuse)."""
    state = {"i": 0}

    def call():
        x = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        return fn_of_input(x)

    return call


def check(x, g, w) -> dict:
    """Kernel vs the torch reference (same device) on the first and last 512 rows."""
    from scalesweep_vllm import nvfp4, sweep
    from scalesweep_vllm.kernels import launch

    res = {}
    n = min(512, x.shape[0])
    rows = torch.cat([torch.arange(n), torch.arange(x.shape[0] - n, x.shape[0])]).unique()
    xs = x[rows.to(x.device)]
    for method in ("absmax", "mse", "wmse"):
        wm = w if method == "wmse" else None
        p, s = launch.quantize_impl(xs, g, method, wm)
        if method == "absmax":
            s_ref = sweep.absmax_scales(xs, g)
        else:
            s_ref = sweep.sweep_scales(xs, g, wm)
        p_ref = nvfp4.pack_fp4(sweep.quantize_codes(xs, g, s_ref))
        ok = torch.equal(s.view(torch.uint8), s_ref.view(torch.uint8)) and torch.equal(p, p_ref)
        res[method] = ok
        if not ok:
            raise SystemExit(f"--check: {method} kernel differs from the reference")
    return res


def _cpu_bench(fn, rep=None):
    """--smoke stand-in for do_bench: median wall time of 3 calls, ms."""
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[1]


def bench_shape(m, k, dtype, args) -> list[dict]:
    from scalesweep_vllm import nvfp4
    from scalesweep_vllm.kernels import dispatch, launch

    elem_bytes = torch.finfo(dtype).bits // 8
    in_bytes = m * k * elem_bytes
    n_copies = max(2, min(8, -(-4 * L2_BYTES // in_bytes)))
    dev = args.device
    if dev == "cuda":
        import triton.testing

        do_bench = triton.testing.do_bench
    else:
        do_bench = _cpu_bench
    gen = torch.Generator(device=dev).manual_seed(0)
    xs = [torch.randn(m, k, device=dev, generator=gen).to(dtype) for _ in range(n_copies)]
    g = nvfp4.global_scale(max(float(x.float().abs().max()) for x in xs)).to(dev)
    w = torch.rand(k, device=dev, generator=gen).exp()  # per-column importance
    checked = check(xs[0], g, w) if args.check else None

    q_bytes = m * k * (elem_bytes + 0.5 + 1 / 16)
    rows = []

    def add(name, ms, nbytes, note=""):
        rows.append(
            {
                "shape": f"{m}x{k}",
                "dtype": str(dtype).replace("torch.", ""),
                "name": name,
                "ms": ms,
                "gbps": nbytes / ms / 1e6,
                "note": note,
            }
        )

    dst = torch.empty_like(xs[0])
    ms = do_bench(_rotating(lambda x: dst.copy_(x), xs), rep=args.rep)
    add("copy (d2d, ceiling)", ms, 2 * in_bytes, "reads + writes the input once")

    out = torch.empty(m, k // 2, dtype=torch.uint8, device=dev)
    sc = torch.empty(m, k // 16, dtype=torch.uint8, device=dev)
    for method in ("absmax", "mse", "wmse"):
        wm = w if method == "wmse" else None
        configs = [tuple(c) for c in args.configs] if method != "absmax" else [None]
        best = None
        for cfg in configs:

            def fn(x, method=method, wm=wm, cfg=cfg):
                return launch.quantize_impl(x, g, method, wm, config=cfg, out=out, scales=sc)

            t = do_bench(_rotating(fn, xs), rep=args.rep)
            label = cfg or launch.DEFAULT_CONFIG[method]
            if best is None or t < best[0]:
                best = (t, label)
            if cfg is not None:
                add(f"  {method} BM={label[0]} warps={label[1]}", t, q_bytes, "config sweep")
        add(
            {"absmax": "AbsMax kernel", "mse": "ScaleSweep MSE", "wmse": "ScaleSweep WMSE"}[method],
            best[0],
            q_bytes,
            f"best of BM,warps: {best[1]}",
        )

    # torch reference (MSE) on a slice of rows, scaled to the full shape
    ref_rows = min(m, args.ref_rows)
    xr = [x[:ref_rows] for x in xs]
    t = do_bench(
        _rotating(lambda x: dispatch.quantize(x, g, "mse", backend="torch"), xr), rep=args.rep
    )
    add(
        "torch reference MSE",
        t * m / ref_rows,
        q_bytes,
        f"timed on {ref_rows} rows, scaled x{m / ref_rows:g}",
    )

    copy = rows[0]
    absmax = next(r for r in rows if r["name"] == "AbsMax kernel")
    ref = next(r for r in rows if r["name"].startswith("torch reference"))
    for r in rows:
        r["x_absmax_time"] = r["ms"] / absmax["ms"]
        r["bw_vs_copy"] = r["gbps"] / copy["gbps"]
        r["speedup_vs_reference"] = ref["ms"] / r["ms"]
    if checked is not None:
        for r in rows:
            r["checked_vs_reference"] = checked
    del xs
    if dev == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="NVFP4 quantize kernel benchmark (CUDA)")
    ap.add_argument("--shapes", nargs="*", default=["8192x8192", "16384x4096"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--check", action="store_true", help="verify against the reference first")
    ap.add_argument("--rep", type=int, default=200, help="do_bench time budget per row, ms")
    ap.add_argument("--ref-rows", type=int, default=256, help="rows for the torch reference")
    ap.add_argument(
        "--configs",
        nargs="*",
        type=lambda s: tuple(int(v) for v in s.split(",")),
        default=[(32, 1), (64, 2), (128, 4), (256, 8)],
        help="(blocks per program, warps) tried for the sweep kernels, e.g. 64,2",
    )
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="CPU dry run of this script in Triton's interpreter (tiny shapes; times mean nothing)",
    )
    args = ap.parse_args(argv)
    args.device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"

    env = environment()
    print("environment:", json.dumps(env))
    if not args.smoke and not torch.cuda.is_available():
        print("bench_quant: no CUDA device; nothing to time (the kernels need a GPU).")
        return 0
    dtype = getattr(torch, args.dtype)
    rows = []
    for s in args.shapes:
        rows += bench_shape(*_parse_shape(s), dtype, args)

    hdr = (
        f"{'shape':>11} {'kernel':32} {'ms':>8} {'GB/s':>7} {'xAbsMax':>8} {'bw/copy':>8} "
        f"{'vs ref':>8}  note"
    )
    print(hdr)
    for r in rows:
        print(
            f"{r['shape']:>11} {r['name']:32} {r['ms']:8.4f} {r['gbps']:7.0f} "
            f"{r['x_absmax_time']:8.3f} {r['bw_vs_copy']:8.3f} {r['speedup_vs_reference']:8.1f}"
            f"  {r['note']}"
        )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_quant.json")
    with open(path, "w") as f:
        json.dump({"environment": env, "command": " ".join(sys.argv), "rows": rows}, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
