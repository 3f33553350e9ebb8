"""``evaluate``: one base model, one quantized source (a recipe quantized in memory by
``quantize_model``, or a checkpoint folder), one or more settings; JSON-ready results.

Recipes (weights; the runtime parts use the same method unless ``runtime_method``):
``absmax``, ``four_over_six``, ``mse``, ``wmse``, each with a global-scale convention
(``paper``: 256*6/amax, ``compressed-tensors``: 448*6/amax). The recipe is quantized
once as W4A4KV4Q4 and evaluated per setting by switching parts off: the weights and
calibrated global scales of a W4A16 or W4A4 checkpoint of the same recipe are the same
tensors (``quantize_model`` does not let the scheme change the weight path).
"""

from __future__ import annotations

import datetime as _dt
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from ..quantize.recipe import DEFAULT_GLOBAL_SCALE, Recipe
from ..rope_bias import recorded as rope_bias_recorded
from . import metrics
from .model import Checkpoint, build_model, runtime_settings

__all__ = [
    "RECIPES",
    "SETTINGS",
    "Context",
    "evaluate",
    "prepare",
    "quantize_recipe",
    "score_base",
    "score_checkpoint",
    "compute_dtype",
]

RECIPES = ("bf16", "absmax", "four_over_six", "mse", "wmse", "hessian")
DTYPES = ("auto", "bfloat16", "float32")
SETTINGS = ("W4A16", "W4A4", "W4A4KV4", "W4A4KV4Q4")
DEFAULT_TOKENS = 65536
DEFAULT_SEQ_LEN = 512


def quantize_recipe(
    model_dir: Path,
    recipe: str | Recipe,
    convention: str = DEFAULT_GLOBAL_SCALE,
    device: str = "cpu",
    progress: bool = True,
    calib=None,
    num_samples: int | None = None,
    seq_len: int | None = None,
    gptq: bool | dict = False,
    rope_bias: str = "auto",
) -> Checkpoint:
    """A recipe quantized in memory by the offline quantizer as W4A4KV4Q4 (every
    setting is then this checkpoint with parts switched off). ``recipe``: a
    :class:`~scalesweep_vllm.quantize.recipe.Recipe` (the other arguments then
    unused), or an objective name with ``convention``, ``gptq`` (the quantizer's
    ``--gptq``: True or its settings), ``rope_bias`` and the calibration size."""
    from ..quantize import pipeline

    if isinstance(recipe, Recipe):
        rec = recipe.replace(scheme="W4A4KV4Q4")
    else:
        if recipe not in RECIPES or recipe == "bf16":
            raise ValueError(f"unknown recipe {recipe!r}; choose one of {RECIPES[1:]}")
        kw = {}
        if num_samples is not None:
            kw["num_samples"] = num_samples
        if seq_len is not None:
            kw["seq_len"] = seq_len
        rec = Recipe(
            scheme="W4A4KV4Q4",
            objective=recipe,
            global_scale_convention=convention,
            gptq=gptq,
            rope_bias=rope_bias,
            **kw,
        )
    rep = pipeline.quantize_model(
        str(model_dir), None, rec, calib=calib, device=device, progress=progress, in_memory=True
    )
    rb = "+rope_bias" if rep["header"]["rope_bias"] else ""
    return Checkpoint.from_contents(rep["checkpoint"], f"{rec.tag()}{rb} (in memory)")


def compute_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """``bfloat16``, ``float32``, or ``auto``: bfloat16 on a GPU or on a CPU with bf16
    units (AVX512_BF16 / AMX), float32 otherwise (there torch emulates bf16 GEMMs
    10-100x slower; the weights are the same bf16 values, computed in fp32)."""
    if name == "auto":
        from ..kernels import cpu_build

        if torch.device(device).type != "cpu" or cpu_build.bf16_units():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: choose one of {DTYPES}")
    return getattr(torch, name)


def _environment(device) -> dict:
    import transformers

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


@dataclass
class Context:
    """What every evaluation of one base model shares: the held-out tokens and the BF16
    reference (None when ``tokens=0``), the tasks and their BF16 results."""

    model_dir: Path
    ids: torch.Tensor | None
    ref: metrics.Reference | None
    device: torch.device
    batch_size: int = 2
    progress: bool = True
    dtype: torch.dtype = torch.bfloat16
    base: object = None  # the BF16 model (kept only until a quantized one is built)
    tokenizer: object = None
    tasks: tuple[str, ...] = ()
    tasks_limit: int | None = None
    task_base: dict | None = None  # BF16 results per task

    def header(self) -> dict:
        out = {
            "model": str(self.model_dir),
            "environment": {**_environment(self.device), "dtype": str(self.dtype)},
        }
        if self.ref is not None:
            out.update(
                tokens=int(self.ids.numel()),
                windows=int(self.ids.shape[0]),
                seq_len=int(self.ids.shape[1]),
                positions=int(self.ref.nll.numel()),
                bf16=metrics.summarize(self.ref.nll),
                bf16_seconds=self.ref.seconds,
            )
        if self.tasks:
            out["tasks"] = {"names": list(self.tasks), "limit": self.tasks_limit}
            out["bf16_tasks"] = self.task_base
        return out


def prepare(
    model: str | Path | None = None,
    tokens: int = DEFAULT_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 2,
    device: str = "cpu",
    progress: bool = True,
    cache: Path | None = None,
    texts: list[str] | None = None,
    dtype: str = "auto",
    tasks: list[str] | None = None,
    tasks_limit: int | None = None,
) -> Context:
    """Tokenize the held-out text and get the BF16 reference (cached); with ``tasks``,
    the BF16 model's task results (cached too). ``tokens=0``: tasks only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..quantize import assets
    from ..quantize.pipeline import resolve_model_dir
    from . import zeroshot
    from .tasks import parse_tasks

    names = tuple(parse_tasks(tasks))
    if tokens <= 0 and not names:
        raise ValueError("nothing to evaluate: tokens is 0 and no tasks were given")
    dev = torch.device(device)
    dt = compute_dtype(dtype, dev)
    model_dir = resolve_model_dir(model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt).eval().to(dev)
    root = Path(cache) if cache is not None else assets.cache_dir() / "eval"
    ids = ref = None
    if tokens > 0:
        ids = metrics.evaluation_tokens(tok, tokens, seq_len, texts)
        key = metrics.model_key(model_dir, ids, dt)
        ref = metrics.reference(base, ids, key, root, batch_size, progress, dev)
    ctx = Context(model_dir, ids, ref, dev, batch_size, progress, dt, base, tok, names)
    if names:
        ctx.tasks_limit = tasks_limit
        ctx.task_base = zeroshot.run_tasks(
            base, tok, list(names), tasks_limit, dev, progress, "BF16", root / "tasks", model_dir
        )
    return ctx


def _score(ctx: Context, model, label: str) -> dict:
    """KLD measures (when the context has text) and task results (when it has tasks)."""
    from . import zeroshot

    row: dict = {}
    seconds = 0.0
    if ctx.ref is not None:
        res = metrics.score(model, ctx.ref, ctx.batch_size, ctx.progress, ctx.device, label)
        row.update(metrics.summarize(res["nll"], res["kld"], res["agree"]))
        seconds += res["seconds"]
    if ctx.tasks:
        tr = zeroshot.run_tasks(
            model, ctx.tokenizer, list(ctx.tasks), ctx.tasks_limit, ctx.device, ctx.progress, label
        )
        seconds += sum(r["seconds"] for r in tr.values())
        row["tasks"] = tr
        row["recovery"] = zeroshot.compare(tr, ctx.task_base)
    return {"seconds": seconds, **row}


def score_base(ctx: Context) -> dict:
    """The BF16 model itself against its cached reference (KLD exactly 0)."""
    return {"setting": "BF16", **_score(ctx, ctx.base, "BF16")}


def score_checkpoint(
    ctx: Context, ckpt: Checkpoint, setting: str | None, runtime_method: str | None = None
) -> dict:
    """One row: ``ckpt`` evaluated in ``setting`` (None: the checkpoint's own)."""
    rs = runtime_settings(ckpt, setting, runtime_method)
    ctx.base = None
    qmodel = build_model(ckpt, rs, ctx.dtype, ctx.device)
    return {
        "setting": setting or rs.label(),
        "runtime": {"activations": rs.activations, "kv_cache": rs.kv_cache, "query": rs.query},
        **_score(ctx, qmodel, rs.label()),
    }


def evaluate(
    model: str | Path | None = None,
    recipe: str | Recipe | None = None,
    checkpoint: str | Path | Checkpoint | None = None,
    global_scale: str = DEFAULT_GLOBAL_SCALE,
    settings: list[str] | None = None,
    runtime_method: str | None = None,
    tokens: int = DEFAULT_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 2,
    device: str = "cpu",
    progress: bool = True,
    cache: Path | None = None,
    calib=None,
    num_samples: int | None = None,
    calib_seq_len: int | None = None,
    texts: list[str] | None = None,
    gptq: bool = False,
    dtype: str = "auto",
    tasks: list[str] | None = None,
    tasks_limit: int | None = None,
    rope_bias: str = "auto",
) -> dict:
    """Evaluate ``recipe`` (quantized in memory: an objective name, with GPTQ when
    ``gptq``, or a whole :class:`~scalesweep_vllm.quantize.recipe.Recipe`) or
    ``checkpoint`` against the BF16 ``model`` (default: the default SmolLM2); see
    :mod:`.metrics` for the text measures and :mod:`.zeroshot` for the tasks.
    ``recipe="bf16"`` (or neither given) scores the base model itself."""
    if gptq and recipe in (None, "bf16"):
        raise ValueError("gptq needs a recipe (absmax, four_over_six, mse or wmse)")
    ctx = prepare(
        model,
        tokens,
        seq_len,
        batch_size,
        device,
        progress,
        cache,
        texts,
        dtype,
        tasks,
        tasks_limit,
    )
    out = {**ctx.header(), "runs": []}
    if checkpoint is None and recipe in (None, "bf16"):
        out["source"] = {"recipe": "bf16"}
        out["runs"].append(score_base(ctx))
        return out
    if checkpoint is not None:
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.from_dir(checkpoint)
        out["source"] = {"checkpoint": ckpt.name, "scalesweep_json": ckpt.meta is not None}
    elif isinstance(recipe, Recipe):
        ckpt = quantize_recipe(ctx.model_dir, recipe, device=device, progress=progress, calib=calib)
        out["source"] = {"recipe": recipe.to_json()}
    else:
        ckpt = quantize_recipe(
            ctx.model_dir,
            recipe,
            global_scale,
            device,
            progress,
            calib,
            num_samples,
            calib_seq_len,
            gptq,
            rope_bias,
        )
        out["source"] = {"recipe": recipe, "global_scale": global_scale, "gptq": gptq}
    if ckpt.meta is not None:
        out["source"]["calibration"] = ckpt.meta.get("calibration")
        out["source"]["rope_bias"] = rope_bias_recorded(ckpt.meta.get("attention"))
    for setting in settings or [None]:
        out["runs"].append(score_checkpoint(ctx, ckpt, setting, runtime_method))
    return out
