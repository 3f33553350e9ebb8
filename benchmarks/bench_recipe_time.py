"""Quantization time of weight recipes, as ratios to round-to-nearest WMSE in one run.

    python benchmarks/bench_recipe_time.py --threads 2 --out benchmarks/out

Each recipe quantizes the default model (SmolLM2-135M-Instruct, 64 x 256 Wikipedia
calibration tokens, W4A16, in memory: load, calibration and the weight path, no disk
writes) with ``quantize_model``; ``--repeats`` runs per recipe, interleaved (recipe
order rotates each round), the median wall and CPU times kept. Prints a table and
writes ``bench_recipe_time.json``. Absolute times drift on a shared machine: compare
the ratios, measured together.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scalesweep_vllm.quantize import Recipe, quantize_model  # noqa: E402
from scalesweep_vllm.quantize.assets import default_model_dir  # noqa: E402

RECIPES = {
    "wmse (RTN, the baseline)": Recipe(scheme="W4A16"),
    "hessian (RTN)": Recipe(scheme="W4A16", objective="hessian"),
    "wmse + GPTQ (fixed scales)": Recipe(scheme="W4A16", gptq=True),
    "wmse + GPTQ (in-loop scales, paper)": Recipe(
        scheme="W4A16", gptq={"scales": "inloop"}, global_scale_convention="paper"
    ),
    "wmse + GPTQ (column order)": Recipe(scheme="W4A16", gptq={"actorder": "column"}),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--only", nargs="*", help="substrings of recipe names to run")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = default_model_dir()
    names = [n for n in RECIPES if not args.only or any(s in n for s in args.only)]
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            quantize_model(model, None, RECIPES[name], in_memory=True, progress=False)
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
            print(f"  {name}: {times[name][-1][0]:.1f} s wall", flush=True)
    base = names[0]
    med = {n: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
           for n, v in times.items()}  # fmt: skip
    rows = []
    print(f"\n| recipe | wall s | CPU s | wall / {base} | CPU / {base} |\n|---|---|---|---|---|")
    for n in names:
        w, c = med[n]
        rw, rc = w / med[base][0], c / med[base][1]
        rows.append({"recipe": n, "config": RECIPES[n].to_json(), "wall_s": w, "cpu_s": c,
                     "wall_ratio": rw, "cpu_ratio": rc, "runs": times[n]})  # fmt: skip
        print(f"| {n} | {w:.1f} | {c:.1f} | {rw:.2f} | {rc:.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "command": "python benchmarks/bench_recipe_time.py " + " ".join(sys.argv[1:]),
    }
    (out / "bench_recipe_time.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(f"wrote {out / 'bench_recipe_time.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
