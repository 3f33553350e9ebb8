#!/usr/bin/env python
"""llm-compressor's NVFP4 recipes on the default model, run by llm-compressor itself
(in its own venv: ``bash scripts/setup-peers.sh``), saved compressed for
``scalesweep-eval --checkpoint``.

    .venv/bin/python benchmarks/peers_llmcompressor.py --export-tokens peers/calib_tokens.pt
    .venv-peers/bin/python benchmarks/peers_llmcompressor.py --tokens peers/calib_tokens.pt \\
        --model ~/.cache/scalesweep_vllm/SmolLM2-135M-Instruct --out peers/

The first command (main venv) writes the exact calibration token ids our quantizer
uses (64 x 256 from the first 8,000 Wikipedia intros), so both tools see the same
tokens. Recipes: ``QuantizationModifier(targets="Linear", scheme="NVFP4",
ignore=["lm_head"])`` with its default observer, with ``weight_observer="mse"`` and
with ``weight_observer="imatrix_mse"`` (MSE weighted by each input channel's E[x^2]),
and ``GPTQModifier`` with the same scheme, with its default observer and with
``weight_observer="imatrix_mse"``. In 0.14 the ``imatrix_mse`` observer gathers
E[x^2] itself (a forward-pre hook that ``attach`` registers on its Linear), so a
recipe needs no extra modifier; the observer's own defaults are kept. One torch
thread (the busy 2-core machines stall with two). Versions and options go to
``<out>/peers.json``.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import sys
import time
from pathlib import Path

from peers_args import add_dtype  # benchmarks/ (the script's folder) is on sys.path

RECIPES = {
    "llmc-nvfp4-minmax": {"modifier": "QuantizationModifier", "kwargs": {}},
    "llmc-nvfp4-mse": {"modifier": "QuantizationModifier", "kwargs": {"weight_observer": "mse"}},
    "llmc-nvfp4-gptq": {"modifier": "GPTQModifier", "kwargs": {}},
    "llmc-nvfp4-imatrix": {
        "modifier": "QuantizationModifier",
        "kwargs": {"weight_observer": "imatrix_mse"},
    },
    "llmc-nvfp4-gptq-imatrix": {
        "modifier": "GPTQModifier",
        "kwargs": {"weight_observer": "imatrix_mse"},
    },
}


def export_tokens(path: str, model: str | None = None) -> None:
    """The quantizer's default calibration tokens, with ``model``'s tokenizer (a folder;
    default: the default model's)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch
    from transformers import AutoTokenizer

    from scalesweep_vllm.quantize import assets, data, pipeline

    tok = AutoTokenizer.from_pretrained(model or assets.default_model_dir())
    docs, src = data.load_calibration_source(None)
    ids, _ = data.calibration_tokens(
        docs, tok, pipeline.DEFAULT_NUM_SAMPLES, pipeline.DEFAULT_SEQ_LEN, source=src or ""
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ids, path)
    print(f"{path}: {tuple(ids.shape)} tokens")


def run(args) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    ids = torch.load(args.tokens)
    n, t = ids.shape
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * t] * n})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "versions": {
            p: md.version(p)
            for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")
        },
        "model": args.model,
        "calibration": {"samples": n, "seq_len": t, "tokens_file": args.tokens},
        "model_dtype": args.dtype,
        "recipes": {},
    }
    for name in args.recipes:
        spec = RECIPES[name]
        cls = {"QuantizationModifier": QuantizationModifier, "GPTQModifier": GPTQModifier}[
            spec["modifier"]
        ]
        kwargs = {"targets": "Linear", "scheme": "NVFP4", "ignore": ["lm_head"], **spec["kwargs"]}
        t0 = time.perf_counter()
        try:
            model = AutoModelForCausalLM.from_pretrained(
                args.model, dtype=getattr(torch, args.dtype)
            )
            oneshot(
                model=model,
                dataset=ds,
                recipe=cls(**kwargs),
                num_calibration_samples=n,
                max_seq_length=t,
            )
            model.save_pretrained(out / name, save_compressed=True)
            AutoTokenizer.from_pretrained(args.model).save_pretrained(out / name)
            status = "ok"
        except Exception as err:  # noqa: BLE001 - record exactly what failed
            status = f"failed: {type(err).__name__}: {err}"
        record["recipes"][name] = {
            "modifier": spec["modifier"],
            "kwargs": kwargs,
            "oneshot": {"num_calibration_samples": n, "max_seq_length": t},
            "model_dtype": args.dtype,
            "status": status,
            "seconds": time.perf_counter() - t0,
        }
        print(name, status, f"{time.perf_counter() - t0:.0f} s", flush=True)
        (out / "peers.json").write_text(json.dumps(record, indent=2) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--export-tokens", help="(main venv) write the calibration token ids here")
    p.add_argument("--tokens", help="calibration token ids (.pt, [samples, seq_len])")
    p.add_argument(
        "--model",
        help="the bf16 HF folder of the model (with --export-tokens: whose tokenizer;\n"
        "default the default model's)",
    )
    p.add_argument("--out", default="peers")
    p.add_argument("--recipes", nargs="*", default=list(RECIPES))
    p.add_argument("--threads", type=int, default=1)
    add_dtype(p)
    args = p.parse_args()
    if args.export_tokens:
        export_tokens(args.export_tokens, args.model)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
