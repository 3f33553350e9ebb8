"""GPTQ on ScaleSweep scales vs round-to-nearest (RTN) on the default model:
quantizer time and KL divergence to the BF16 model on held-out text.

    python benchmarks/bench_gptq.py --workdir /tmp/gptq-bench --out benchmarks/out

1. Quantizes the default model (SmolLM2-135M-Instruct, Wikipedia calibration) once per
   variant with ``quantize_model`` (scheme W4A4, objective wmse): ``rtn``, ``gptq``
   (the defaults: quantized inputs, block-level activation order) and the variants
   in ``VARIANTS``; each run's wall/CPU time comes from its report. The
   weights do not depend on the scheme (W4A4 only adds input global scales), so each
   checkpoint is evaluated as W4A16 and as W4A4.
2. KL divergence to the BF16 model, KL(p_bf16 || p_quant) per token averaged over
   all predicted tokens, and perplexity, on the first ``--eval-texts`` of the 2,000
   held-out Wikipedia intros (``assets.evaluation_texts()``, never used for
   calibration), each cut to ``--eval-tokens`` tokens, one text per forward.
   Weights are decoded from the checkpoint as stock loaders do (fp32 products cast
   to bf16), the forward runs in fp32. W4A4 adds, like the vLLM plugin, runtime
   ScaleSweep quantization of every quantized Linear's input (method recorded in
   scalesweep.json, WMSE weights from scalesweep_vectors.safetensors, summed over
   fused partners as the plugin does) through the
   torch reference: slow on a CPU, so it uses the first ``--w4a4-texts`` texts only.

This is a stand-in for the evaluation tool of issue 16 (not written yet).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scalesweep_vllm import kernels  # noqa: E402
from scalesweep_vllm.quantize import assets, quantize_model  # noqa: E402
from scalesweep_vllm.quantize.layers import FUSED_PARTNERS  # noqa: E402

VARIANTS = {
    "rtn": False,
    "gptq": True,  # the defaults: quantized inputs, block-level activation order
    "gptq-noactorder": {"sequential": True, "actorder": False},
    "gptq-orig-noactorder": {"sequential": False, "actorder": False},
    "gptq-orig": {"sequential": False},
}


def _env() -> dict:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def quantize_variants(names, workdir: Path, num_samples: int, seq_len: int, reuse: bool):
    out = {}
    for name in names:
        ck = workdir / name
        rep_file = ck / "quantization_report.json"
        if reuse and rep_file.is_file():
            rep = json.loads(rep_file.read_text())
        else:
            rep = quantize_model(
                None,
                ck,
                scheme="W4A4",
                objective="wmse",
                num_samples=num_samples,
                seq_len=seq_len,
                overwrite=True,
                progress=False,
                gptq=VARIANTS[name],
            )
        t, tot = rep["timing"], rep["totals"]
        out[name] = {
            "checkpoint": str(ck),
            "wall_s": t["wall_s"],
            "calibrate_quantize_s": t["calibrate_quantize_s"],
            "cpu_s": t["cpu_s"],
            "out_err_rtn": tot.get("out_err_rtn"),
            "out_err_gptq": tot.get("out_err_gptq"),
        }
        print(f"quantized {name}: {t['wall_s']:.1f} s wall, {t['cpu_s']:.1f} CPU s", flush=True)
    return out


def _group_id(name: str) -> str:
    parent, _, leaf = name.rpartition(".")
    for partners in FUSED_PARTNERS:
        if leaf in partners:
            return f"{parent}.{'+'.join(partners)}"
    return name


def _load_quantized(src_model, ckpt: Path):
    """A float32 copy of the source model with the checkpoint's decoded weights, and
    per quantized Linear (input global scale, input WMSE weight) for W4A4."""
    import copy

    from safetensors.torch import load_file

    model = copy.deepcopy(src_model)
    idx = ckpt / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(idx.read_text())["weight_map"].values()))
        if idx.is_file()
        else ["model.safetensors"]
    )
    tensors = {}
    for f in files:
        tensors.update(load_file(ckpt / f))
    ours = (ckpt / "scalesweep.json").is_file()
    # a peer's checkpoint (no scalesweep.json): AbsMax activations, as stock vLLM runs it
    vectors = load_file(ckpt / "scalesweep_vectors.safetensors") if ours else {}
    method = (
        json.loads((ckpt / "scalesweep.json").read_text())["activations"]["method"]
        if ours
        else "absmax"
    )
    acts, summed = {}, {}
    names = [k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed")]
    for name in names:  # fused partners share one input: the plugin sums their vectors
        g = _group_id(name)
        if ours:
            summed[g] = summed.get(g, 0) + vectors[f"{name}.input_weight"]
    for name in names:
        w = kernels.dequantize(
            tensors[f"{name}.weight_packed"],
            tensors[f"{name}.weight_scale"],
            tensors[f"{name}.weight_global_scale"],
            dtype=torch.bfloat16,
        )
        mod = model.get_submodule(name)
        mod.weight.data = w.to(torch.float32)
        if f"{name}.input_global_scale" in tensors:
            acts[mod] = (tensors[f"{name}.input_global_scale"], summed.get(_group_id(name)))
    return model, acts, method


def _act_hooks(acts: dict, method: str):
    handles = []
    for mod, (g, vec) in acts.items():

        def hook(_m, args, g=g, vec=vec):
            x = args[0]
            w = vec if method == "wmse" else None
            return (kernels.fake_quantize(x, g, method, w),)

        handles.append(mod.register_forward_pre_hook(hook))
    return handles


def evaluate(ckpts: dict, n_texts: int, n_tokens: int, w4a4_texts: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir = assets.default_model_dir()
    tok = AutoTokenizer.from_pretrained(src_dir)
    ref = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.bfloat16).float().eval()
    texts = assets.evaluation_texts()[:n_texts]
    ids = [tok(t, return_tensors="pt").input_ids[:, :n_tokens] for t in texts]
    ids = [x for x in ids if x.shape[1] >= 2]
    models = {name: _load_quantized(ref, Path(c["checkpoint"])) for name, c in ckpts.items()}
    res = {}
    for mode, count in (("W4A16", len(ids)), ("W4A4", min(w4a4_texts, len(ids)))):
        if count == 0:
            continue
        acc = {name: [0.0, 0.0] for name in models}  # kld sum, nll sum
        acc["bf16"] = [0.0, 0.0]
        ntok = 0
        t0 = time.perf_counter()
        with torch.no_grad():
            for x in ids[:count]:
                lp_ref = torch.log_softmax(ref(input_ids=x).logits[0, :-1].float(), -1)
                tgt = x[0, 1:]
                acc["bf16"][1] -= float(lp_ref.gather(1, tgt[:, None]).sum())
                ntok += tgt.numel()
                p_ref = lp_ref.exp()
                for name, (m, acts, method) in models.items():
                    hooks = _act_hooks(acts, method) if mode == "W4A4" else []
                    try:
                        lp = torch.log_softmax(m(input_ids=x).logits[0, :-1].float(), -1)
                    finally:
                        for h in hooks:
                            h.remove()
                    acc[name][0] += float((p_ref * (lp_ref - lp)).sum())
                    acc[name][1] -= float(lp.gather(1, tgt[:, None]).sum())
        res[mode] = {
            "texts": count,
            "tokens": ntok,
            "seconds": time.perf_counter() - t0,
            **{
                name: {"kld": k / ntok, "ppl": math.exp(nll / ntok)}
                for name, (k, nll) in acc.items()
            },
        }
        print(f"evaluated {mode} on {count} texts / {ntok} tokens", flush=True)
    return res


def table(result: dict) -> str:
    q, ev = result["quantize"], result["eval"]
    rtn = q.get("rtn")
    lines = [
        "| variant | quantize wall s | vs RTN | CPU s | output err (rel.) | "
        + " | ".join(f"{m} KLD | {m} ppl | {m} KLD removed" for m in ev)
        + " |",
        "|---" * (5 + 3 * len(ev)) + "|",
    ]
    ref = " | ".join(f"0 | {ev[m]['bf16']['ppl']:.3f} | -" for m in ev)
    lines.append(f"| bf16 | - | - | - | - | {ref} |")
    first = ev[next(iter(ev))]
    names = list(q) + [n for n, v in first.items() if isinstance(v, dict) and n not in q]
    names = [n for n in names if n != "bf16"]
    for name in names:
        r = q.get(name, {"wall_s": float("nan"), "cpu_s": float("nan"), "out_err_gptq": None})
        ratio = f"{r['wall_s'] / rtn['wall_s']:.2f}x" if rtn else "-"
        err = r["out_err_gptq"] if r["out_err_gptq"] is not None else None
        if name == "rtn" and "gptq" in q:
            err = q["gptq"]["out_err_rtn"]
        cells = []
        for m in ev:
            e = ev[m][name]
            removed = (
                f"{100 * (1 - e['kld'] / ev[m]['rtn']['kld']):.1f}%"
                if "rtn" in ev[m] and name != "rtn"
                else "-"
            )
            cells.append(f"{e['kld']:.4f} | {e['ppl']:.3f} | {removed}")
        err_s = "-" if err is None else f"{err:.3e}"
        lines.append(
            f"| {name} | {r['wall_s']:.1f} | {ratio} | {r['cpu_s']:.1f} | {err_s} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/scalesweep-gptq-bench"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    p.add_argument("--variants", default="rtn,gptq", help=",".join(VARIANTS))
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-texts", type=int, default=400)
    p.add_argument("--eval-tokens", type=int, default=128)
    p.add_argument("--w4a4-texts", type=int, default=40)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reuse", action="store_true", help="reuse checkpoints in --workdir")
    p.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also evaluate this checkpoint folder (e.g. a peer's; without scalesweep.json "
        "its W4A4 activations are quantized by AbsMax, as stock vLLM does)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [v for v in args.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}")
    result = {"env": _env(), "args": {k: str(v) for k, v in vars(args).items()}}
    print(json.dumps(result["env"]))
    result["quantize"] = quantize_variants(
        names, args.workdir, args.num_samples, args.seq_len, args.reuse
    )
    ckpts = dict(result["quantize"])
    for item in args.extra:
        name, _, path = item.partition("=")
        ckpts[name] = {"checkpoint": path}
    result["eval"] = evaluate(ckpts, args.eval_texts, args.eval_tokens, args.w4a4_texts)
    args.out.mkdir(parents=True, exist_ok=True)  # the numbers first, then the table
    (args.out / "bench_gptq.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
