"""Serving throughput and memory on the vLLM CPU engine: bf16 vs our W4A16 vs our
W4A4KV4Q4, each quantized checkpoint on both Linear backends (``packed``: our C++
NVFP4 GEMM, weights at 4.5 bits; ``dequant``: weights decoded to bf16 at load), same
model, same prompts.

Each configuration runs in its own child process (one engine at a time, memory
measured from a clean process): start the engine, warm up, then for each ``--batch``
size time

* prefill: ``batch`` prompts of ``--prompt-len`` tokens, ``max_tokens=1``;
* decode: the same prompts with ``max_tokens=--gen-len`` (ignore_eos); decode
  tokens/s = batch * (gen_len - 1) / (t_generate - t_prefill).

Memory: the bytes the engine's quantized Linear layers hold (their parameters and
buffers, read from the engine's model; with ``dequant`` and bf16 the weights live
inside vLLM's GEMM handles, not countable that way, so those rows show the bf16 size
of the same matrices), the child's resident set size grown by the engine minus the
fixed KV pool (``kv_cache_memory_bytes``), i.e. all weights plus runtime; and the KV
cache bytes per token the engine allocates. On CPU our K/V quantization is simulated
(quantize-dequantize into a bf16 cache), so KV bytes do not change.

    python benchmarks/bench_serve.py                       # default model, quantized once
    python benchmarks/bench_serve.py --bf16 DIR --w4a16 CKPT --w4a4kv4q4 CKPT --batch 1 8

Prints the environment first, then a table; writes JSON to ``${OUT:-benchmarks/out}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

KV_POOL = 64 << 20


def _linear_bytes(model):
    """(bytes held by the quantized Linear layers' parameters and buffers, bf16 bytes of
    the same matrices, their backends); runs inside the engine (``apply_model``)."""
    held = bf16 = 0
    backends = set()
    from vllm.model_executor.layers.linear import LinearBase

    for m in model.modules():
        backend = getattr(m, "scalesweep_backend", None)
        if backend is None:
            if isinstance(m, LinearBase):  # bf16 engine: the same layers, unquantized
                bf16 += 2 * m.input_size_per_partition * m.output_size_per_partition
            continue
        backends.add(backend)
        tensors = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        held += sum(t.numel() * t.element_size() for t in tensors)
        bf16 += 2 * m.input_size_per_partition * m.output_size_per_partition
    return held, bf16, backends


def _isa() -> str:
    """The C++ backend's build in use and the levels this CPU runs."""
    from scalesweep_vllm.kernels import cpu_backend, cpu_build

    return f"{cpu_backend.isa()} (CPU runs {', '.join(cpu_build.cpu_isas())})"


def _child(args) -> None:
    """Runs one configuration; prints one JSON line."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    import psutil
    import vllm

    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    kw = {"quantization": "scalesweep"} if args.quantized else {}
    t0 = time.perf_counter()
    llm = vllm.LLM(
        args.model,
        enforce_eager=True,
        dtype="bfloat16",
        max_model_len=args.prompt_len + args.gen_len + 8,
        kv_cache_memory_bytes=KV_POOL,
        seed=0,
        **kw,
    )
    startup = time.perf_counter() - t0
    rss1 = proc.memory_info().rss
    tok = llm.get_tokenizer()
    text = " ".join(["The history of the city began long before the river was bridged."] * 64)
    ids = tok(text)["input_ids"]
    prompts = [
        {"prompt_token_ids": [ids[(i * 7 + j) % len(ids)] for j in range(args.prompt_len)]}
        for i in range(max(args.batch))
    ]
    one = vllm.SamplingParams(temperature=0, max_tokens=1)
    gen = vllm.SamplingParams(temperature=0, max_tokens=args.gen_len, ignore_eos=True)
    llm.generate(prompts[:2], vllm.SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    per_batch = {}
    for batch in args.batch:
        t_pre, t_gen = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            llm.generate(prompts[:batch], one, use_tqdm=False)
            t_pre.append(time.perf_counter() - t)
            t = time.perf_counter()
            out = llm.generate(prompts[:batch], gen, use_tqdm=False)
            t_gen.append(time.perf_counter() - t)
            assert all(len(o.outputs[0].token_ids) == args.gen_len for o in out)
        t_pre.sort()
        t_gen.sort()
        pre, full = t_pre[len(t_pre) // 2], t_gen[len(t_gen) // 2]
        per_batch[str(batch)] = {
            "prefill_tok_s": batch * args.prompt_len / pre,
            "decode_tok_s": batch * (args.gen_len - 1) / max(full - pre, 1e-9),
            "prefill_s": pre,
            "generate_s": full,
        }
    cfg = llm.llm_engine.vllm_config.model_config.hf_config
    head_dim = getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2
    ((held, bf16_bytes, backends),) = llm.apply_model(_linear_bytes)
    res = {
        "startup_s": startup,
        "batches": per_batch,
        "linear_backends": sorted(backends),
        "quantized_linear_bytes": held,
        "same_linears_bf16_bytes": bf16_bytes,
        "rss_growth_minus_kv_mib": (rss1 - rss0 - KV_POOL) / 2**20,
        "kv_bytes_per_token": kv_per_token,
        "checkpoint_mib": sum(
            f.stat().st_size for f in Path(args.model).glob("*.safetensors")
            if not f.name.startswith("scalesweep_")
        ) / 2**20,
    }  # fmt: skip
    print("RESULT " + json.dumps(res), flush=True)


def _ensure_checkpoints(args) -> dict[str, str]:
    out = Path(os.environ.get("OUT", "benchmarks/out"))
    paths = {"bf16": args.bf16, "W4A16": args.w4a16, "W4A4KV4Q4": args.w4a4kv4q4}
    if paths["bf16"] is None:
        from scalesweep_vllm.quantize import assets

        paths["bf16"] = str(assets.default_model_dir())
    for scheme in ("W4A16", "W4A4KV4Q4"):
        if paths[scheme] is None:
            from scalesweep_vllm.quantize import assets, quantize_model

            target = out / f"ckpt-{Path(paths['bf16']).name}-{scheme}"
            if not (target / "config.json").is_file():
                quantize_model(
                    paths["bf16"], str(target), scheme=scheme, objective="wmse",
                    calib=assets.calibration_texts()[:64], num_samples=16, seq_len=128,
                    progress=False,
                )  # fmt: skip
            paths[scheme] = str(target)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bf16", help="bf16 HF folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--w4a16", help="W4A16 checkpoint of the same model")
    p.add_argument("--w4a4kv4q4", help="W4A4KV4Q4 checkpoint of the same model")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument(
        "--backends",
        nargs="+",
        choices=["packed", "dequant"],
        default=["packed", "dequant"],
        help="Linear backends to serve the quantized checkpoints with (SCALESWEEP_LINEAR)",
    )
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--quantized", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0

    import torch
    import vllm

    env = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "isa": _isa(),
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "batch": args.batch,
        "backends": args.backends,
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "repeats": args.repeats,
    }
    for k, v in env.items():
        print(f"{k}: {v}")
    paths = _ensure_checkpoints(args)
    configs = [("bf16", paths["bf16"], None)]
    for scheme in ("W4A16", "W4A4KV4Q4"):
        for backend in args.backends:
            configs.append((f"{scheme} {backend}", paths[scheme], backend))
    rows = {}
    for name, path, backend in configs:
        cmd = [sys.executable, __file__, "--child", "--model", path,
               "--batch", *map(str, args.batch), "--prompt-len", str(args.prompt_len),
               "--gen-len", str(args.gen_len), "--repeats", str(args.repeats)]  # fmt: skip
        child_env = dict(os.environ)
        if backend is not None:
            cmd.append("--quantized")
            child_env["SCALESWEEP_LINEAR"] = backend
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=child_env)
        lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if not lines:
            print(r.stdout[-2000:], r.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{name}: the engine run failed")
        rows[name] = {"path": path, **json.loads(lines[-1][7:])}
        print(f"  {name}: done", flush=True)
    base = rows["bf16"]
    head = ("| config | batch | prefill tok/s | decode tok/s | vs bf16 (prefill / decode) | "
            "quantized Linears MiB (x bf16) | weights+runtime MiB | KV bytes/token |")  # fmt: skip
    lines = [head, "|" + "---|" * 8]
    for name, r in rows.items():
        for b, t in r["batches"].items():
            bt = base["batches"][b]
            held = r["quantized_linear_bytes"]
            ref16 = base["same_linears_bf16_bytes"]
            mem = (
                f"{ref16 / 2**20:.0f} (bf16)" if name == "bf16"
                else f"{held / 2**20:.0f} ({held / ref16:.3f}x)" if held
                else "in vLLM's GEMM handles"
            )  # fmt: skip
            lines.append(
                f"| {name} | {b} | {t['prefill_tok_s']:.0f} | {t['decode_tok_s']:.2f} | "
                f"{t['prefill_tok_s'] / bt['prefill_tok_s']:.2f}x / "
                f"{t['decode_tok_s'] / bt['decode_tok_s']:.2f}x | {mem} | "
                f"{r['rss_growth_minus_kv_mib']:.0f} | "
                f"{r['kv_bytes_per_token']}{' (simulated KV4)' if 'KV4' in name else ''} |"
            )
    table = "\n".join(lines)
    print(table)
    out = Path(os.environ.get("OUT", "benchmarks/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_serve.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print(f"wrote {out / 'bench_serve.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
