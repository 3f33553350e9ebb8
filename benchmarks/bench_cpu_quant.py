"""Runtime NVFP4 fake-quantization on the CPU: the C++ backend, at every
instruction-set level this CPU runs (generic x86-64, AVX2, AVX-512), against the torch
reference, against AbsMax on the same backend, against a copy of the same tensor, and
against the GEMM that a CPU engine runs for the consuming Linear: bf16 where the CPU
has bf16 units (AVX512_BF16 or AMX), fp32 otherwise (on a CPU without them torch's
bf16 GEMM is emulated and ~30x slower than fp32: a ratio to it means nothing); the
activations are in that GEMM's dtype, as the engine would run. Times are the fastest
of repeated calls in one process (on a shared machine other jobs only add time);
ratios are what to compare.

Shapes are the default model's (SmolLM2-135M) runtime inputs: Linear inputs
[T, 576] (consumed by qkv_proj, 576 x 960) and [T, 1536] (down_proj, 1536 x 576),
per-head Q [T, 9, 64] and K/V [T, 3, 64] (per-head WMSE weights, as the plugin
passes them), for T = 1, 16, 512, 4096. The reference is timed up to 1M elements (it takes
seconds beyond).

Vector peak: a simple vectorised fp32 loop (``benchmarks/cpu/peak.cpp``, built with
the level's flags, one thread) gives the lane-operations per second one core sustains;
the sweep's work is its candidate evaluations (counted by the kernel) times 256
elements per 16-block tile times the operations per element and candidate of the
compiled inner loop (``OPS_PER_EVAL``, read off the disassembly).

    python benchmarks/bench_cpu_quant.py [--isa generic avx2 avx512] [--threads N]
        [--check] [--quick]

Prints the environment first, then the table; writes JSON to ``${OUT:-benchmarks/out}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from scalesweep_vllm import nvfp4
from scalesweep_vllm.kernels import cpu_backend, cpu_build, dispatch

#: Vector instructions per element and candidate in the compiled sweep loop (16 lanes
#: each): r = a * inv; M from r's exponent (and, max, add); (r + M) - M (2); min with
#: 6; d = r - q; d * d; the tree sum's 15/16 add; WMSE adds the weight multiply.
OPS_PER_EVAL = {"mse": 10.94, "wmse": 11.94}
SHAPES = (
    ("[T,576]", (576,), 960, None),
    ("[T,1536]", (1536,), 576, None),
    ("[T,9,64]", (9, 64), None, (9, 64)),
    ("[T,3,64]", (3, 64), None, (3, 64)),
)
REF_MAX_ELEMENTS = 1 << 20


def _best_time(fn, min_time: float = 0.2, max_reps: int = 200) -> float:
    """Fastest of repeated calls: on a shared machine the other jobs only ever add
    time, so the minimum is the least disturbed measurement (the median is printed in
    the JSON too)."""
    fn()  # warm up (allocator, thread pool)
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    _LAST_MEDIAN[0] = statistics.median(times)
    return min(times)


_LAST_MEDIAN = [0.0]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _bf16_units() -> bool:
    return cpu_build.bf16_units()


def peak_lane_ops_per_s(isa: str) -> float:
    """fp32 lane-operations per second of one thread on a simple vectorised loop."""
    from torch.utils import cpp_extension

    mod = cpp_extension.load(
        name=f"scalesweep_bench_peak_{isa}",
        sources=[str(Path(__file__).with_name("cpu") / "peak.cpp")],
        extra_cflags=cpu_build.flags(isa),
        extra_ldflags=["-fopenmp"],
    )
    steps = 2_000_000
    ops = mod.peak_loop(steps)
    best = min(_timed(lambda: mod.peak_loop(steps)) for _ in range(5))
    return ops / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _check(x, g, method, w) -> None:
    a = dispatch.fake_quantize(x, g, method, w, backend="cpu")
    b = dispatch.fake_quantize(x, g, method, w, backend="torch")
    if not torch.equal(a.view(torch.int16), b.view(torch.int16)):
        raise SystemExit(f"--check: C++ and reference differ ({method}, {tuple(x.shape)})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 512, 4096])
    p.add_argument(
        "--isa",
        nargs="+",
        choices=cpu_build.ISAS,
        default=None,
        help="backend builds to time (default: every level this CPU runs)",
    )
    p.add_argument("--check", action="store_true", help="verify bit-exactness before timing")
    p.add_argument("--quick", action="store_true", help="shorter timings (CI smoke)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpu_backend.available():
        raise SystemExit(f"the C++ CPU backend is unavailable: {cpu_backend.why()}")
    isas = args.isa or cpu_build.cpu_isas()
    for tag in isas:
        if tag not in cpu_build.cpu_isas():
            raise SystemExit(f"this CPU cannot run the {tag} build ({cpu_build.cpu_isas()})")
    min_time = 0.02 if args.quick else 0.25
    bf16_units = _bf16_units()
    gemm_dtype = torch.bfloat16 if bf16_units else torch.float32
    env = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_name(),
        "cpu_levels": cpu_build.cpu_isas(),
        "isas_timed": isas,
        "bf16_units": bf16_units,
        "gemm_dtype": str(gemm_dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    print("environment:", json.dumps(env))
    print(
        f"GEMM and activations in {env['gemm_dtype']} "
        f"({'the CPU has bf16 units' if bf16_units else 'no bf16 units on this CPU'})"
    )
    rows = []
    peaks = {}
    for tag in isas:
        with cpu_backend.use(tag):
            peaks[tag] = peak_lane_ops_per_s(tag)
            print(
                f"\n[{tag}] vector peak (simple loop, 1 thread): "
                f"{peaks[tag] / 1e9:.1f} G fp32 lane-ops/s"
            )
            rows += _table(tag, args, min_time, peaks[tag], gemm_dtype)
    out = Path(os.environ.get("OUT", "benchmarks/out"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench_cpu_quant.json"
    path.write_text(
        json.dumps({"environment": env, "peak_lane_ops_per_s": peaks, "rows": rows}, indent=2)
        + "\n"
    )
    print(f"wrote {path}")


def _table(isa, args, min_time, peak, gemm_dtype) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    hdr = (
        f"{'shape':<10}{'T':>6}{'method':>8}{'ms':>10}{'Melem/s':>10}{'x ref':>9}"
        f"{'/absmax':>9}{'/matmul':>9}{'%copy':>7}{'%peak':>7}"
    )
    print(hdr)
    for name, tail, n_out, whead in SHAPES:
        for t in args.tokens:
            shape = (t, *tail)
            x = (torch.randn(shape, generator=gen) * (1 + torch.rand(shape[:-1] + (1,)) * 3)).to(
                gemm_dtype
            )
            g = nvfp4.global_scale(x.float().abs().max())
            k = shape[-1]
            w_col = torch.rand(whead if whead else (k,), generator=gen) + 0.01
            mm = None
            if n_out is not None:
                a2 = x.reshape(-1, k)
                b2 = torch.randn(k, n_out, generator=gen).to(gemm_dtype)
                mm = _best_time(lambda a2=a2, b2=b2: torch.matmul(a2, b2), min_time)
            # fake-quantize reads and writes x once, as a copy does
            copy = _best_time(lambda x=x: x.clone(), min_time)
            base = None
            for method in ("absmax", "mse", "wmse"):
                w = w_col if method == "wmse" else None
                if args.check and x.numel() <= REF_MAX_ELEMENTS:
                    _check(x, g, method, w)
                ours = _best_time(
                    lambda m=method, w=w, x=x, g=g: dispatch.fake_quantize(
                        x, g, m, w, backend="cpu"
                    ),
                    min_time,
                )
                ours_median = _LAST_MEDIAN[0]
                trips = cpu_backend._LAST_TRIPS[0]
                ref = None
                if x.numel() <= REF_MAX_ELEMENTS:
                    ref = _best_time(
                        lambda m=method, w=w, x=x, g=g: dispatch.fake_quantize(
                            x, g, m, w, backend="torch"
                        ),
                        min_time / 4,
                        max_reps=5,
                    )
                base = ours if method == "absmax" else base
                pct = None
                if method in OPS_PER_EVAL:
                    lane_ops = trips * 256 * OPS_PER_EVAL[method]
                    pct = 100 * lane_ops / (ours * peak * torch.get_num_threads())
                row = {
                    "isa": isa,
                    "shape": name,
                    "T": t,
                    "method": method,
                    "elements": x.numel(),
                    "ms": ours * 1e3,
                    "median_ms": ours_median * 1e3,
                    "melem_per_s": x.numel() / ours / 1e6,
                    "ref_ms": None if ref is None else ref * 1e3,
                    "speedup_vs_ref": None if ref is None else ref / ours,
                    "vs_absmax": ours / base,
                    "matmul_ms": None if mm is None else mm * 1e3,
                    "vs_matmul": None if mm is None else ours / mm,
                    "copy_ms": copy * 1e3,
                    "pct_of_copy_bandwidth": 100 * copy / ours,
                    "evals_per_tile": trips / max(1, -(-x.numel() // 256)),
                    "pct_of_vector_peak": pct,
                }
                rows.append(row)

                def f(v, fmt):
                    return "-" if v is None else format(v, fmt)

                print(
                    f"{name:<10}{t:>6}{method:>8}{row['ms']:>10.3f}{row['melem_per_s']:>10.1f}"
                    f"{f(row['speedup_vs_ref'], '.0f'):>9}{row['vs_absmax']:>9.2f}"
                    f"{f(row['vs_matmul'], '.2f'):>9}{row['pct_of_copy_bandwidth']:>7.0f}"
                    f"{f(pct, '.0f'):>7}"
                )
    return rows


if __name__ == "__main__":
    main()
