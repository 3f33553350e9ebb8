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

from ..quantize.pipeline import DEFAULT_GLOBAL_SCALE
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
]

RECIPES = ("bf16", "absmax", "four_over_six", "mse", "wmse")
SETTINGS = ("W4A16", "W4A4", "W4A4KV4", "W4A4KV4Q4")
DEFAULT_TOKENS = 65536
DEFAULT_SEQ_LEN = 512


def quantize_recipe(
    model_dir: Path,
    recipe: str,
    convention: str = DEFAULT_GLOBAL_SCALE,
    device: str = "cpu",
    progress: bool = True,
    calib=None,
    num_samples: int | None = None,
    seq_len: int | None = None,
) -> Checkpoint:
    """The recipe quantized in memory by the offline quantizer (its defaults otherwise)."""
    from ..quantize import pipeline

    if recipe not in RECIPES or recipe == "bf16":
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {RECIPES[1:]}")
    kw = {}
    if num_samples is not None:
        kw["num_samples"] = num_samples
    if seq_len is not None:
        kw["seq_len"] = seq_len
    rep = pipeline.quantize_model(
        str(model_dir),
        None,
        scheme="W4A4KV4Q4",
        objective=recipe,
        calib=calib,
        device=device,
        global_scale_convention=convention,
        progress=progress,
        in_memory=True,
        **kw,
    )
    return Checkpoint.from_contents(rep["checkpoint"], f"{recipe}/{convention} (in memory)")


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
    """What every evaluation of one base model shares: tokens and the BF16 reference."""

    model_dir: Path
    ids: torch.Tensor
    ref: metrics.Reference
    device: torch.device
    batch_size: int = 2
    progress: bool = True
    dtype: torch.dtype = torch.bfloat16
    base: object = None  # the BF16 model (kept only until a quantized one is built)

    def header(self) -> dict:
        return {
            "model": str(self.model_dir),
            "tokens": int(self.ids.numel()),
            "windows": int(self.ids.shape[0]),
            "seq_len": int(self.ids.shape[1]),
            "positions": int(self.ref.nll.numel()),
            "environment": _environment(self.device),
            "bf16": metrics.summarize(self.ref.nll),
            "bf16_seconds": self.ref.seconds,
        }


def prepare(
    model: str | Path | None = None,
    tokens: int = DEFAULT_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 2,
    device: str = "cpu",
    progress: bool = True,
    cache: Path | None = None,
    texts: list[str] | None = None,
) -> Context:
    """Tokenize the held-out text and get the BF16 reference (cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..quantize.pipeline import resolve_model_dir

    dev = torch.device(device)
    model_dir = resolve_model_dir(model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = metrics.evaluation_tokens(tok, tokens, seq_len, texts)
    dtype = torch.bfloat16
    key = metrics.model_key(model_dir, ids, dtype)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval().to(dev)
    ref = metrics.reference(base, ids, key, cache, batch_size, progress, dev)
    return Context(model_dir, ids, ref, dev, batch_size, progress, dtype, base)


def score_base(ctx: Context) -> dict:
    """The BF16 model itself against its cached reference (KLD exactly 0)."""
    res = metrics.score(ctx.base, ctx.ref, ctx.batch_size, ctx.progress, ctx.device, "BF16")
    row = metrics.summarize(res["nll"], res["kld"], res["agree"])
    return {"setting": "BF16", "seconds": res["seconds"], **row}


def score_checkpoint(
    ctx: Context, ckpt: Checkpoint, setting: str | None, runtime_method: str | None = None
) -> dict:
    """One row: ``ckpt`` evaluated in ``setting`` (None: the checkpoint's own)."""
    rs = runtime_settings(ckpt, setting, runtime_method)
    ctx.base = None
    qmodel = build_model(ckpt, rs, ctx.dtype, ctx.device)
    res = metrics.score(qmodel, ctx.ref, ctx.batch_size, ctx.progress, ctx.device, rs.label())
    row = metrics.summarize(res["nll"], res["kld"], res["agree"])
    return {
        "setting": setting or rs.label(),
        "runtime": {"activations": rs.activations, "kv_cache": rs.kv_cache, "query": rs.query},
        "seconds": res["seconds"],
        **row,
    }


def evaluate(
    model: str | Path | None = None,
    recipe: str | None = None,
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
) -> dict:
    """Evaluate ``recipe`` (quantized in memory) or ``checkpoint`` against the BF16
    ``model`` (default: the default SmolLM2); see :mod:`.metrics` for the measures.
    ``recipe="bf16"`` (or neither given) scores the base model itself against the
    cached reference (KLD 0)."""
    ctx = prepare(model, tokens, seq_len, batch_size, device, progress, cache, texts)
    out = {**ctx.header(), "runs": []}
    if checkpoint is None and recipe in (None, "bf16"):
        out["source"] = {"recipe": "bf16"}
        out["runs"].append(score_base(ctx))
        return out
    if checkpoint is not None:
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.from_dir(checkpoint)
        out["source"] = {"checkpoint": ckpt.name, "scalesweep_json": ckpt.meta is not None}
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
        )
        out["source"] = {"recipe": recipe, "global_scale": global_scale}
    if ckpt.meta is not None:
        out["source"]["calibration"] = ckpt.meta.get("calibration")
    for setting in settings or [None]:
        out["runs"].append(score_checkpoint(ctx, ckpt, setting, runtime_method))
    return out
