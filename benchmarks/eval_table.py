#!/usr/bin/env python
"""The accuracy table of issue 16: every recipe by every setting, plus peers' checkpoints,
on the same held-out tokens against the same cached BF16 reference.

    python benchmarks/eval_table.py --tokens 65536 --threads 1 \\
        --json benchmarks/accuracy_64k.json [--peers DIR ...]
    python benchmarks/eval_table.py --render --json benchmarks/accuracy_64k.json   # table + plot

Rows are run in priority order (paper global scale first, then the 448 one; per
recipe the settings W4A16, W4A4, W4A4KV4Q4, W4A4KV4) and appended to the JSON as
each finishes, so an interrupted run resumes where it stopped. Each recipe is
quantized once, in memory, by ``quantize_model`` (its defaults: 64 x 256 calibration
tokens from the first 8,000 Wikipedia intros) and kept while its settings run.
``--render`` prints the Markdown table (perplexity, KLD mean / p99, top-1, the
fraction of AbsMax's KLD removed, noise = half the spread between the two halves
of the text) and writes ``benchmarks/accuracy.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPE_ORDER = ("absmax", "four_over_six", "mse", "wmse")
SETTING_ORDER = ("W4A16", "W4A4", "W4A4KV4Q4", "W4A4KV4")
CONVENTIONS = ("paper", "compressed-tensors")
LABELS = {
    "absmax": "AbsMax",
    "four_over_six": "four-over-six",
    "mse": "ScaleSweep MSE",
    "wmse": "ScaleSweep WMSE",
}


def jobs(peers: list[str], conventions) -> list[dict]:
    """Priority order: the paper scale's W4A16, W4A4, W4A4KV4Q4 for every recipe; the
    peers; the AbsMax-runtime row; WMSE and AbsMax with the 448 scale (the default
    global scale is chosen from them); then W4A4KV4 and the rest."""
    first = [s for s in SETTING_ORDER if s != "W4A4KV4"]
    out = []

    def add(conv, settings, recipes):
        for setting in settings:
            for recipe in recipes:
                j = {"recipe": recipe, "global_scale": conv, "setting": setting}
                if j not in out:
                    out.append(j)

    add("paper", first, RECIPE_ORDER)
    for p in peers:
        for s in ("W4A16", "W4A4"):
            out.append({"checkpoint": p, "setting": s})
    out.append(
        {"recipe": "wmse", "global_scale": "paper", "setting": "W4A4", "runtime_method": "absmax"}
    )
    for conv in conventions:
        if conv != "paper":
            add(conv, first, ("wmse", "absmax"))
    for conv in conventions:
        add(conv, SETTING_ORDER, RECIPE_ORDER)
    return [j for j in out if j.get("global_scale", "paper") in conventions]


def job_key(j: dict) -> str:
    src = j.get("checkpoint") or f"{j['recipe']}/{j['global_scale']}"
    return f"{src}|{j['setting']}|{j.get('runtime_method') or ''}"


def run(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from scalesweep_vllm.evaluate.model import Checkpoint
    from scalesweep_vllm.evaluate.run import prepare, quantize_recipe, score_checkpoint

    path = Path(args.json)
    data = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    done = {r["key"] for r in data["rows"]}
    ctx = prepare(
        None, args.tokens, args.seq_len, args.batch_size, "cpu", not args.quiet, dtype=args.dtype
    )
    header = ctx.header()
    if data.get("header") and data["header"]["tokens"] != header["tokens"]:
        raise SystemExit(f"{path} holds a {data['header']['tokens']}-token table; use another")
    old_dtype = data.get("header", {}).get("environment", {}).get("dtype", "torch.bfloat16")
    if data.get("header") and old_dtype != header["environment"]["dtype"]:
        raise SystemExit(f"{path} was computed in {old_dtype}; use another file or --dtype")
    data["header"] = header
    data["command"] = "python benchmarks/eval_table.py " + " ".join(sys.argv[1:])
    path.write_text(json.dumps(data, indent=1) + "\n")
    todo = [j for j in jobs(args.peers, args.conventions) if job_key(j) not in done]
    if args.only:
        todo = [j for j in todo if any(o in job_key(j) for o in args.only)]
    sources: dict[str, object] = {}
    for j in todo:
        src = j.get("checkpoint") or f"{j['recipe']}/{j['global_scale']}"
        if "checkpoint" in j and not (Path(j["checkpoint"]) / "config.json").is_file():
            print(f"[{src}] not there yet: skipped (a later run picks it up)", flush=True)
            continue
        if src not in sources:
            t0 = time.perf_counter()
            saved = Path(args.recipe_cache) / f"{src.replace('/', '-')}.pt"
            if "checkpoint" in j:
                sources[src] = Checkpoint.from_dir(j["checkpoint"])
            elif saved.is_file():
                sources[src] = Checkpoint.from_contents(torch.load(saved, weights_only=False), src)
            else:
                sources[src] = quantize_recipe(
                    ctx.model_dir,
                    j["recipe"],
                    j["global_scale"],
                    "cpu",
                    not args.quiet,
                    num_samples=args.calib_samples,
                )
                saved.parent.mkdir(parents=True, exist_ok=True)
                c = sources[src]
                torch.save(
                    {
                        "config": c.config,
                        "tensors": c.tensors,
                        "meta": c.meta,
                        "vectors": c.vectors,
                    },
                    saved,
                )
            print(f"[{src}] ready in {time.perf_counter() - t0:.0f} s", flush=True)
        row = score_checkpoint(ctx, sources[src], j["setting"], j.get("runtime_method"))
        row.update({"key": job_key(j), "source": src, **j})
        data["rows"].append(row)
        path.write_text(json.dumps(data, indent=1) + "\n")
        print(
            f"{job_key(j)}: ppl {row['ppl']:.3f} kld {row['kld_mean']:.4f} "
            f"p99 {row['kld_p99']:.3f} top1 {row['top1']:.4f} ({row['seconds']:.0f} s)",
            flush=True,
        )


def _label(r: dict) -> str:
    if "checkpoint" in r:
        return Path(r["checkpoint"]).name
    lab = LABELS[r["recipe"]]
    if r.get("runtime_method"):
        lab += f" weights, {LABELS[r['runtime_method']]} runtime"
    return lab


def render(args) -> str:
    data = json.loads(Path(args.json).read_text())
    h = data["header"]
    rows = data["rows"]
    absmax = {
        (r["global_scale"], r["setting"]): r
        for r in rows
        if r.get("recipe") == "absmax" and not r.get("runtime_method")
    }
    lines = []
    b = h["bf16"]
    for conv in CONVENTIONS:
        sel = [r for r in rows if r.get("global_scale", "peer") in (conv,)]
        if conv == "paper":
            sel += [r for r in rows if "checkpoint" in r]
        if not sel:
            continue
        g = "256*6/amax (paper)" if conv == "paper" else "448*6/amax (compressed-tensors)"
        lines += [
            "",
            f"Global scale {g}. BF16 perplexity {b['ppl']:.3f} "
            f"(halves {b['halves'][0]['ppl']:.2f} / {b['halves'][1]['ppl']:.2f}).",
            "",
            "| setting | recipe | perplexity | KLD mean | KLD p99 | top-1 | AbsMax KLD removed |",
            "|---|---|---|---|---|---|---|",
        ]
        for setting in SETTING_ORDER:
            for r in sorted(
                (r for r in sel if r["setting"] == setting),
                key=lambda r: (
                    "checkpoint" in r,
                    RECIPE_ORDER.index(r["recipe"]) if "recipe" in r else 0,
                    bool(r.get("runtime_method")),
                    r.get("checkpoint", ""),
                ),
            ):
                ref = absmax.get((r.get("global_scale", "paper"), setting))
                if ref is None:  # peers: against our AbsMax with their convention
                    ref = absmax.get(("compressed-tensors", setting)) or absmax.get(
                        ("paper", setting)
                    )
                removed = (
                    f"{1 - r['kld_mean'] / ref['kld_mean']:+.1%}" if ref and ref is not r else ""
                )
                n = r["noise"]
                lines.append(
                    f"| {setting} | {_label(r)} | {r['ppl']:.3f} ± {n['ppl']:.3f} "
                    f"| {r['kld_mean']:.4f} ± {n['kld_mean']:.4f} | {r['kld_p99']:.3f} "
                    f"| {r['top1']:.2%} | {removed} |"
                )
    lines += paired(rows)
    text = "\n".join(lines) + "\n"
    if args.plot:
        plot(rows, args.plot)
    return text


def _verdict(d: list[float]) -> str:
    """ "better"/"worse" when both halves agree in sign and their mean exceeds half
    their spread, else "within noise"."""
    m, spread = (d[0] + d[1]) / 2, abs(d[0] - d[1]) / 2
    if d[0] * d[1] > 0 and abs(m) > spread:
        return "better" if m > 0 else "worse"
    return "within noise"


def paired(rows: list[dict]) -> list[str]:
    """Paired differences on each half of the text (the halves differ in difficulty;
    two recipes on the same half do not): ScaleSweep against four-over-six at each
    global scale and against each peer checkpoint (at 448, theirs), per setting."""

    def find(setting, pred):
        return next((r for r in rows if r["setting"] == setting and pred(r)), None)

    def ours(recipe, conv):
        return lambda r: (
            r.get("recipe") == recipe
            and r.get("global_scale") == conv
            and not r.get("runtime_method")
        )

    out = [
        "",
        "Paired differences, other minus ScaleSweep, on the two halves of the text "
        "(NLL in nats per token; positive: ScaleSweep better), each pair at one global "
        "scale; llm-compressor's checkpoints (448*6/amax) against ScaleSweep WMSE at 448:",
        "",
        "| setting | ScaleSweep | other | dNLL half 1 / half 2 | dKLD half 1 / half 2 | verdict |",
        "|---|---|---|---|---|---|",
    ]
    ct = "compressed-tensors"
    # (name, row predicate, our convention, peer checkpoint: compared with WMSE only)
    others = [
        ("four-over-six", ours("four_over_six", "paper"), "paper", False),
        ("four-over-six (448)", ours("four_over_six", ct), ct, False),
    ]
    for ck in sorted({r["checkpoint"] for r in rows if "checkpoint" in r}):
        others.append((Path(ck).name, lambda r, ck=ck: r.get("checkpoint") == ck, ct, True))
    for setting in SETTING_ORDER:
        for mine in ("wmse", "mse"):
            for name, pred, conv, peer in others:
                a, b = find(setting, ours(mine, conv)), find(setting, pred)
                if a is None or b is None or (peer and mine != "wmse"):
                    continue
                halves = list(zip(a["halves"], b["halves"], strict=True))
                dn = [hb["nll"] - ha["nll"] for ha, hb in halves]
                dk = [hb["kld_mean"] - ha["kld_mean"] for ha, hb in halves]
                label = LABELS[mine] + (" (448)" if conv == ct else "")
                out.append(
                    f"| {setting} | {label} | {name} | {dn[0]:+.4f} / {dn[1]:+.4f} "
                    f"| {dk[0]:+.4f} / {dk[1]:+.4f} | ppl {_verdict(dn)}, KLD {_verdict(dk)} |"
                )
    return out


def plot(rows: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = []
    for r in rows:
        lab = _label(r) + ("" if r.get("global_scale", "") != "compressed-tensors" else " (448)")
        if lab not in labels:
            labels.append(lab)
    settings = [s for s in SETTING_ORDER if any(r["setting"] == s for r in rows)]
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / max(len(labels), 1)
    for i, lab in enumerate(labels):
        ys = []
        for s in settings:
            r = next(
                (
                    r
                    for r in rows
                    if r["setting"] == s
                    and _label(r)
                    + ("" if r.get("global_scale", "") != "compressed-tensors" else " (448)")
                    == lab
                ),
                None,
            )
            ys.append(r["kld_mean"] if r else 0.0)
        ax.bar([k + i * width for k in range(len(settings))], ys, width, label=lab)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(settings))], settings)
    ax.set_ylabel("mean KL divergence to BF16 (nats/token)")
    ax.set_title("SmolLM2-135M-Instruct, NVFP4, held-out Wikipedia")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", default="benchmarks/accuracy_64k.json")
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="auto", help="auto: bf16 where the CPU has bf16 units")
    p.add_argument("--peers", nargs="*", default=[], help="peer checkpoint folders")
    p.add_argument("--conventions", nargs="*", default=list(CONVENTIONS))
    p.add_argument("--only", nargs="*", help="run only jobs whose key contains one of these")
    p.add_argument("--calib-samples", type=int, help="calibration samples (quantizer default)")
    p.add_argument(
        "--recipe-cache",
        default="/tmp/scalesweep-recipes",
        help="quantized recipes kept here between runs (default %(default)s)",
    )
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--render", action="store_true", help="print the table, write the plot")
    p.add_argument("--plot", default="benchmarks/accuracy.png")
    args = p.parse_args()
    if args.render:
        print(render(args), end="")
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
