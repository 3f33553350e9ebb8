"""Time the offline quantizer's weight path (and optionally the whole pipeline) on a GPU.

    python benchmarks/bench_quantizer.py [--shape llama-3.2-1b] [--layers N]
        [--objectives absmax mse wmse] [--end-to-end] [--device cuda] [--out DIR]

Random weights of a real model's shapes, built in memory (nothing downloaded): for each
decoder layer the fused groups (q/k/v, gate/up) and the lone Linears go through
``scalesweep_vllm.quantize.weights.quantize_group``, exactly what ``quantize_model``
runs per layer (shared global scales, the dispatch ``kernels.quantize``: Triton on CUDA,
plus the AbsMax comparison for the report). ``--end-to-end`` also builds the whole
random model with transformers and runs ``quantize_model`` on it (calibration on random
tokens, writing to a temporary directory).

Prints the environment first, then seconds and seconds per billion quantized
parameters; writes ``bench_quantizer.json`` to ``--out`` (default ``${OUT:-benchmarks/out}``).
Without CUDA (and no explicit ``--device``) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

#: (hidden, intermediate, layers, heads, kv heads, head_dim, vocab) of real models.
SHAPES = {
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 64, 128256),
    "llama-3.2-3b": (3072, 8192, 28, 24, 8, 128, 128256),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128, 128256),
    "tiny": (64, 128, 2, 4, 2, 16, 320),  # CPU smoke test of this script
}


def environment(device: torch.device) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "device": str(device),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count)
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def layer_groups(shape: tuple) -> list[list[tuple[str, int, int]]]:
    """Fused groups of one decoder layer as (name, out_features, in_features)."""
    h, i, _, nh, nkv, d, _ = shape
    return [
        [("q_proj", nh * d, h), ("k_proj", nkv * d, h), ("v_proj", nkv * d, h)],
        [("o_proj", h, nh * d)],
        [("gate_proj", i, h), ("up_proj", i, h)],
        [("down_proj", h, i)],
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_weight_path(shape, layers: int, objective: str, device, seed: int = 0) -> dict:
    """Seconds to quantize ``layers`` decoder layers' Linears (weights already on device)."""
    from scalesweep_vllm.quantize.weights import GroupMember, quantize_group

    gen = torch.Generator(device=device).manual_seed(seed)
    params, total = 0, 0.0
    per_layer = []
    for li in range(layers + 1):  # layer 0 is a warm-up (Triton compilation), not counted
        members_all = []
        for group in layer_groups(shape):
            k = group[0][2]
            ex2 = torch.randn(k, device=device, generator=gen).square() + 1e-3
            members = [
                GroupMember(
                    name=f"model.layers.{li}.{n}",
                    weight=(torch.randn(o, kk, device=device, generator=gen) * 0.02).to(
                        torch.bfloat16
                    ),
                    wmse_weight=ex2,
                    input_amax=8.0,
                )
                for n, o, kk in group
            ]
            members_all.append(members)
        _sync(device)
        t0 = time.perf_counter()
        for members in members_all:
            quantize_group(members, objective, "paper", activations=True, metrics=True)
        _sync(device)
        dt = time.perf_counter() - t0
        if li > 0:
            total += dt
            per_layer.append(dt)
            params += sum(m.weight.numel() for g in members_all for m in g)
    return {
        "objective": objective,
        "layers": layers,
        "quantized_params": params,
        "seconds": total,
        "s_per_billion_params": total / (params / 1e9),
        "median_layer_s": sorted(per_layer)[len(per_layer) // 2],
    }


def time_end_to_end(shape, layers: int, device, num_samples: int, seq_len: int) -> dict:
    """``quantize_model`` on a random model of this shape (``layers`` decoder layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from scalesweep_vllm.quantize import quantize_model

    h, i, _, nh, nkv, d, vocab = shape
    cfg = LlamaConfig(
        hidden_size=h,
        intermediate_size=i,
        num_hidden_layers=layers,
        num_attention_heads=nh,
        num_key_value_heads=nkv,
        head_dim=d,
        vocab_size=vocab,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device(device):  # random init is fast there; the pipeline starts on the host
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model = model.to("cpu").eval()
    tokens = torch.randint(0, vocab, (num_samples, seq_len))
    with tempfile.TemporaryDirectory() as tmp:
        rep = quantize_model(
            model,
            os.path.join(tmp, "ckpt"),
            calib=tokens,
            num_samples=num_samples,
            seq_len=seq_len,
            device=device,
            progress=False,
        )
    return {
        "total_params": rep["total_params"],
        "timing": rep["timing"],
        "totals": rep["totals"],
        "num_samples": num_samples,
        "seq_len": seq_len,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: all)")
    p.add_argument("--objectives", nargs="+", default=["absmax", "mse", "wmse"])
    p.add_argument("--end-to-end", action="store_true", help="also time quantize_model")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--device", default=None, help="default: cuda (exits 0 without it)")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    args = p.parse_args(argv)
    if args.device is None and not torch.cuda.is_available():
        print("bench_quantizer: no CUDA device; nothing to time (pass --device cpu to force)")
        return 0
    device = torch.device(args.device or "cuda")
    shape = SHAPES[args.shape]
    layers = args.layers or shape[2]
    env = environment(device)
    print(json.dumps(env))
    result = {"environment": env, "shape": args.shape, "weight_path": []}
    print(
        f"weight path, {args.shape} shapes, {layers} decoder layers (+1 warm-up), "
        "metrics on (AbsMax comparison, as the pipeline runs it)"
    )
    print(
        f"{'objective':<10}{'params':>14}{'seconds':>10}{'s / 1e9 params':>16}{'layer (med)':>13}"
    )
    for obj in args.objectives:
        r = time_weight_path(shape, layers, obj, device)
        result["weight_path"].append(r)
        print(
            f"{obj:<10}{r['quantized_params']:>14,}{r['seconds']:>10.3f}"
            f"{r['s_per_billion_params']:>16.3f}{r['median_layer_s']:>13.4f}"
        )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_quantizer.json")
    with open(path, "w") as f:  # written now too, so a failing end-to-end run keeps these
        json.dump(result, f, indent=2)
    if args.end_to_end:
        try:
            r = time_end_to_end(shape, layers, device, args.num_samples, args.seq_len)
        except Exception as err:  # noqa: BLE001 - report, keep the weight-path numbers
            result["end_to_end_error"] = repr(err)
            with open(path, "w") as f:
                json.dump(result, f, indent=2)
            print(f"end to end failed: {err!r}")
            raise
        result["end_to_end"] = r
        t = r["timing"]
        print(
            f"end to end (quantize_model, {r['total_params'] / 1e9:.2f}B params, calibration "
            f"{args.num_samples}x{args.seq_len}): {t['wall_s']:.1f} s wall, "
            f"{t['s_per_billion_params']:.1f} s per billion parameters "
            f"(calibrate+quantize {t['calibrate_quantize_s']:.1f} s, write {t['write_s']:.1f} s)"
        )
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
