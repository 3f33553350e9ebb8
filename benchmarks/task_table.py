#!/usr/bin/env python
"""The accuracy table of issue 24, in the paper's layout: zero-shot task accuracy and its
recovery against BF16, plus KLD to BF16 on held-out text, for our recipes (round to
nearest and GPTQ) and the peers' checkpoints, per setting (W4A16, W4A4 = W+A,
W4A4KV4Q4 = W+A+KV+Q). Every row is one ``score_checkpoint`` of
:mod:`scalesweep_vllm.evaluate` (the forward the vLLM plugin serves).

    python benchmarks/task_table.py --json benchmarks/tasks_smollm2.json \\
        --tasks-limit 100 --tokens 16384 [--only wmse] [--peers DIR ...]
    python benchmarks/task_table.py --render --json benchmarks/tasks_smollm2.json [more.json]

Rows run in priority order and are appended to the JSON as each finishes (an
interrupted run resumes; ``--only`` splits the jobs over processes, each with its own
JSON, merged by ``--render``). Recipes are quantized once, in memory, with the
quantizer's defaults (64 x 256 calibration tokens, the 448*6/amax global scale) and
kept in ``--recipe-cache``. Peers' checkpoints (no scalesweep.json) run as stock vLLM
serves them: W4A16, and W4A4 with AbsMax activations at their stored input scale;
they have no KV4/Q4 recipe of this kind, so they have no W4A4KV4Q4 row.

Noise: per task, the standard error of the paired per-item difference (same items, so
the items' own difficulty cancels); the mean recovery's error combines the tasks'
(``sqrt(sum se_t^2) / T``, each ``se_t = se(q_i - b_i) / acc_bf16``). KLD: half the
difference between the two halves of the text, comparisons on paired per-half
differences (as the issue-16 table).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = ("W4A16", "W4A4", "W4A4KV4Q4")
# (recipe, gptq): ours in priority order
OURS = (("wmse", True), ("wmse", False), ("absmax", False), ("four_over_six", False))
LABELS = {
    "absmax": "AbsMax",
    "four_over_six": "four-over-six",
    "mse": "ScaleSweep MSE",
    "wmse": "ScaleSweep WMSE",
}


def jobs(peers: list[str], settings=SETTINGS, rope_bias: str = "auto") -> list[dict]:
    """Our recipes, then the checkpoints: a peer's (no scalesweep.json) in W4A16 and
    W4A4 only, one of ours (written by scalesweep-quantize) in every setting."""
    out = []
    for setting in settings:
        for recipe, gptq in OURS:
            j = {"recipe": recipe, "gptq": gptq, "setting": setting}
            if rope_bias != "auto":
                j["rope_bias"] = rope_bias
            out.append(j)
    for p in peers:
        ours = (Path(p) / "scalesweep.json").is_file()
        for s in settings:
            if ours or s in ("W4A16", "W4A4"):
                out.append({"checkpoint": p, "setting": s})
    return out


def source(j: dict) -> str:
    if j.get("checkpoint"):
        return j["checkpoint"]
    rb = {"on": "+rope_bias", "off": "-rope_bias"}.get(j.get("rope_bias", "auto"), "")
    return j["recipe"] + ("+gptq" if j["gptq"] else "") + rb


def job_key(j: dict) -> str:
    return f"{source(j)}|{j['setting']}"


def label(r: dict) -> str:
    rb = " + rope_bias" if r.get("rope_bias") else ""
    if "checkpoint" in r:
        if r.get("objective"):  # ours, written by scalesweep-quantize
            gptq = " + GPTQ" if r.get("ckpt_gptq") else ""
            return f"{LABELS[r['objective']]}{gptq}{rb} (checkpoint)"
        return Path(r["checkpoint"]).name
    return LABELS[r["recipe"]] + (" + GPTQ" if r.get("gptq") else "") + rb


def _recipe(ctx, j, args):
    import torch

    from scalesweep_vllm.evaluate.model import Checkpoint
    from scalesweep_vllm.evaluate.run import quantize_recipe

    name = source(j)
    saved = Path(args.recipe_cache) / f"{Path(str(ctx.model_dir)).name}-{name}.pt"
    if saved.is_file():
        return Checkpoint.from_contents(torch.load(saved, weights_only=False), name)
    c = quantize_recipe(
        ctx.model_dir,
        j["recipe"],
        progress=not args.quiet,
        gptq=j["gptq"],
        rope_bias=j.get("rope_bias", "auto"),
    )
    saved.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"config": c.config, "tensors": c.tensors, "meta": c.meta, "vectors": c.vectors}, saved
    )
    return c


def run(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from scalesweep_vllm.evaluate.model import Checkpoint
    from scalesweep_vllm.evaluate.run import prepare, score_checkpoint
    from scalesweep_vllm.rope_bias import recorded as rope_bias_recorded

    path = Path(args.json)
    data = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    done = {r["key"] for r in data["rows"]}
    todo = [j for j in jobs(args.peers, args.settings, args.rope_bias) if job_key(j) not in done]
    if args.only:
        todo = [j for j in todo if any(o == source(j) or o in job_key(j) for o in args.only)]
    ctx = prepare(
        args.model,
        args.tokens,
        args.seq_len,
        args.batch_size,
        "cpu",
        not args.quiet,
        dtype=args.dtype,
        tasks=args.tasks,
        tasks_limit=args.tasks_limit,
    )
    header = ctx.header()
    if data.get("header"):
        old = data["header"]
        for k in ("model", "tokens", "tasks"):
            if old.get(k) != header.get(k):
                raise SystemExit(f"{path}: made with another {k} ({old.get(k)}); use another")
    data["header"] = header
    data["command"] = "python benchmarks/task_table.py " + " ".join(sys.argv[1:])
    path.write_text(json.dumps(data, indent=1) + "\n")
    sources: dict[str, object] = {}
    for j in todo:
        name = source(j)
        if "checkpoint" in j and not (Path(j["checkpoint"]) / "config.json").is_file():
            print(f"[{name}] not there yet: skipped (a later run picks it up)", flush=True)
            continue
        t0 = time.perf_counter()
        if name not in sources:
            sources[name] = (
                Checkpoint.from_dir(j["checkpoint"]) if "checkpoint" in j else _recipe(ctx, j, args)
            )
            print(f"[{name}] ready in {time.perf_counter() - t0:.0f} s", flush=True)
        ck = sources[name]
        row = score_checkpoint(ctx, ck, j["setting"])
        row.update({"key": job_key(j), **j})
        if ck.meta is not None:
            row["rope_bias"] = rope_bias_recorded(ck.meta.get("attention"))
            if "checkpoint" in j:
                row["objective"] = ck.meta.get("objective")
                row["ckpt_gptq"] = bool((ck.meta.get("gptq") or {}).get("enabled"))
        data["rows"].append(row)
        path.write_text(json.dumps(data, indent=1) + "\n")
        rec = row.get("recovery", {}).get("mean_recovery", float("nan"))
        print(
            f"{job_key(j)}: kld {row.get('kld_mean', float('nan')):.4f} "
            f"recovery {rec:.2%} ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )


# ---------------------------------------------------------------- render


def _load(paths: list[str]) -> tuple[dict, list[dict]]:
    header, rows, seen = None, [], set()
    for p in paths:
        d = json.loads(Path(p).read_text())
        if header is None:
            header = d["header"]
        elif (d["header"]["model"], d["header"].get("tasks")) != (
            header["model"],
            header.get("tasks"),
        ):
            raise SystemExit(f"{p}: another model or task set than {paths[0]}")
        for r in d["rows"]:
            if r["key"] not in seen:
                seen.add(r["key"])
                rows.append(r)
    return header, rows


def _paired(q: str, b: str) -> tuple[float, float]:
    """Mean and standard error of the per-item difference of two bit strings."""
    d = [int(x) - int(y) for x, y in zip(q, b, strict=True)]
    n = len(d)
    m = sum(d) / n
    var = sum((x - m) ** 2 for x in d) / (n - 1) if n > 1 else float("nan")
    return m, math.sqrt(var / n)


def recovery_se(row: dict, base: dict) -> float:
    """Standard error of the mean recovery (module docstring)."""
    ses = []
    for task, q in row["tasks"].items():
        b = base[task]
        m = q["primary"]
        _, se = _paired(q[m + "_items"], b[m + "_items"])
        ses.append(se / b[m] if b[m] else float("nan"))
    return math.sqrt(sum(s * s for s in ses)) / len(ses)


def _order(r: dict) -> tuple:
    if "recipe" in r:
        return (1, [o for o in OURS].index((r["recipe"], r["gptq"])), int(bool(r.get("rope_bias"))))
    return (2 if r.get("objective") is None else 1.5, 0, 0)


def render(args) -> str:
    header, rows = _load(args.json)
    base = header["bf16_tasks"]
    tasks = header["tasks"]["names"]
    lim = header["tasks"]["limit"]
    n = {t: base[t]["n"] for t in tasks}
    prim = {t: base[t]["primary"].replace("acc_norm", "acc_n") for t in tasks}
    lines = [
        f"Model {Path(header['model']).name}, compute dtype {header['environment']['dtype']}; "
        f"tasks: first {lim or 'all'} items each ({', '.join(f'{t} {n[t]}' for t in tasks)}), "
        "primary metric per task (acc_n = acc_norm).",
        "",
    ]
    head = (
        "| recipe | " + " | ".join(f"{t} ({prim[t]})" for t in tasks) + " | mean acc | recovery |"
    )
    sep = "|---" * (len(tasks) + 3) + "|"

    def line(name, res, rec):
        accs = [res[t][res[t]["primary"]] for t in tasks]
        cells = " | ".join(f"{a:.1%}" for a in accs)
        return f"| {name} | {cells} | {sum(accs) / len(accs):.1%} | {rec} |"

    for setting in SETTINGS:
        sel = sorted((r for r in rows if r["setting"] == setting), key=_order)
        if not sel:
            continue
        lines += [f"**{setting}**", "", head, sep, line("BF16", base, "100%")]
        for r in sel:
            rec = f"{r['recovery']['mean_recovery']:.1%} ± {recovery_se(r, base):.1%}"
            lines.append(line(label(r), r["tasks"], rec))
        lines.append("")
    lines += _summary(rows, base)
    lines += _kld(header, rows)
    text = "\n".join(lines) + "\n"
    if args.plot:
        plot(header, rows, args.plot)
    return text


def _summary(rows, base) -> list[str]:
    names = []
    for r in sorted((r for r in rows if r["setting"] in SETTINGS), key=_order):
        if label(r) not in names:
            names.append(label(r))
    out = [
        "Mean task recovery (± paired standard error):",
        "",
        "| recipe | " + " | ".join(SETTINGS) + " |",
        "|---" * (len(SETTINGS) + 1) + "|",
    ]
    for name in names:
        cells = []
        for s in SETTINGS:
            r = next((r for r in rows if r["setting"] == s and label(r) == name), None)
            cells.append(
                f"{r['recovery']['mean_recovery']:.1%} ± {recovery_se(r, base):.1%}" if r else "-"
            )
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out + [""]


def _verdict(d: list[float]) -> str:
    m, spread = (d[0] + d[1]) / 2, abs(d[0] - d[1]) / 2
    if d[0] * d[1] > 0 and abs(m) > spread:
        return "ours better" if m > 0 else "ours worse"
    return "within noise"


def _kld(header, rows) -> list[str]:
    if "bf16" not in header:
        return []
    b = header["bf16"]
    out = [
        f"KLD to BF16 on {header['tokens']:,} held-out tokens ({header['positions']:,} scored; "
        f"BF16 perplexity {b['ppl']:.3f}, halves {b['halves'][0]['ppl']:.2f} / "
        f"{b['halves'][1]['ppl']:.2f}); ± = half the halves' spread:",
        "",
        "| setting | recipe | perplexity | KLD mean | KLD p99 | top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        for r in sorted((r for r in rows if r["setting"] == s and "kld_mean" in r), key=_order):
            nz = r["noise"]
            out.append(
                f"| {s} | {label(r)} | {r['ppl']:.3f} ± {nz['ppl']:.3f} | "
                f"{r['kld_mean']:.4f} ± {nz['kld_mean']:.4f} | {r['kld_p99']:.3f} | "
                f"{r['top1']:.2%} |"
            )
    out += [
        "",
        "Paired differences, other minus ours, per half of the text (KLD, nats/token; "
        "positive: ours lower) and per item of the tasks (mean recovery points; positive: "
        "ours higher):",
        "",
        "| setting | ours | other | dKLD half 1 / half 2 | KLD | d recovery ± s.e. |",
        "|---|---|---|---|---|---|",
    ]
    base = header.get("bf16_tasks")
    for s in SETTINGS:
        sel = [r for r in rows if r["setting"] == s and "kld_mean" in r]
        mine = [r for r in sel if "wmse" in (r.get("recipe"), r.get("objective"))]
        others = [r for r in sel if r not in mine]
        for a in sorted(mine, key=_order):
            for o in sorted(others, key=_order):
                dk = [
                    ho["kld_mean"] - ha["kld_mean"]
                    for ha, ho in zip(a["halves"], o["halves"], strict=True)
                ]
                rec = ""
                if base and "tasks" in a and "tasks" in o:
                    ds, ses = [], []
                    for t, qa in a["tasks"].items():
                        m = qa["primary"]
                        d, se = _paired(qa[m + "_items"], o["tasks"][t][m + "_items"])
                        ds.append(d / base[t][m])
                        ses.append(se / base[t][m])
                    rec = (
                        f"{sum(ds) / len(ds):+.1%} ± "
                        f"{math.sqrt(sum(x * x for x in ses)) / len(ses):.1%}"
                    )
                out.append(
                    f"| {s} | {label(a)} | {label(o)} | {dk[0]:+.4f} / {dk[1]:+.4f} | "
                    f"{_verdict(dk)} | {rec} |"
                )
    return out + [""]


def plot(header, rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for r in sorted((r for r in rows if r["setting"] in SETTINGS), key=_order):
        if label(r) not in names:
            names.append(label(r))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(len(names), 1)
    for ax, key in zip(axes, ("recovery", "kld_mean"), strict=True):
        for i, name in enumerate(names):
            ys = []
            for s in SETTINGS:
                r = next((r for r in rows if r["setting"] == s and label(r) == name), None)
                if r is None or (key == "kld_mean" and key not in r):
                    ys.append(0.0)
                else:
                    ys.append(r["recovery"]["mean_recovery"] if key == "recovery" else r[key])
            ax.bar([k + i * width for k in range(len(SETTINGS))], ys, width, label=name)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(SETTINGS))], SETTINGS)
    axes[0].set_ylabel("mean zero-shot task recovery vs BF16")
    recs = [r["recovery"]["mean_recovery"] for r in rows if "recovery" in r]
    axes[0].set_ylim(0.8, max([1.05, *recs]) + 0.02)
    axes[0].axhline(1.0, color="k", lw=0.5)
    axes[1].set_ylabel("mean KL divergence to BF16 (nats/token)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{Path(header['model']).name}, NVFP4")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", nargs="+", default=["benchmarks/tasks_smollm2.json"])
    p.add_argument("--model", help="base model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--tokens", type=int, default=16384, help="held-out tokens for KLD (0: none)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--tasks", default="all")
    p.add_argument("--tasks-limit", type=int, default=100)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--peers", nargs="*", default=[], help="peer checkpoint folders")
    p.add_argument("--only", nargs="*", help="only jobs of these sources (e.g. wmse+gptq absmax)")
    p.add_argument(
        "--settings",
        nargs="+",
        default=list(SETTINGS),
        choices=SETTINGS,
        help="settings to run, in this order (default: all three)",
    )
    p.add_argument(
        "--rope-bias",
        default="auto",
        choices=("auto", "on", "off"),
        help="our recipes' --rope-bias (auto: the quantizer's default)",
    )
    p.add_argument("--recipe-cache", default="/tmp/scalesweep-recipes")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--render", action="store_true", help="print the tables, write the plot")
    p.add_argument("--plot", help="plot file (with --render)")
    args = p.parse_args()
    if args.render:
        print(render(args), end="")
    else:
        if len(args.json) != 1:
            raise SystemExit("a run writes one --json")
        args.json = args.json[0]
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
