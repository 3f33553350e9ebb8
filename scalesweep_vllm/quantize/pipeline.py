"""``quantize_model``: a Hugging Face causal LM in, a compressed-tensors NVFP4
checkpoint out (docs/CHECKPOINT.md), with a report.

Steps: load the model on the host in bf16 (standard transformers, no hub access
needed for a local folder) -> plan which Linears to quantize (:mod:`.layers`) ->
tokenize calibration data (:mod:`.data`) -> per decoder layer, on the device:
collect statistics (:mod:`.calibration`) and quantize its fused groups
(:mod:`.weights`) -> write everything into a staging directory and rename it into
place (:mod:`.writer`) with the report (:mod:`.report`).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import kernels, nvfp4
from ..rope_bias import SERVED_ARCHITECTURES, HFRope, attention_biases
from . import calibration, data, hub, layers, preflight, report, writer
from .gptq import GPTQConfig
from .recipe import DEFAULT_GLOBAL_SCALE, DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN, Recipe
from .weights import GroupMember, QuantizedLinear, quantize_group

__all__ = [
    "DEFAULT_GLOBAL_SCALE",
    "DEFAULT_NUM_SAMPLES",
    "DEFAULT_SEQ_LEN",
    "Job",
    "LayerResults",
    "Recipe",
    "calibration_tokens",
    "load_config",
    "load_model",
    "prepare",
    "quantize_layers",
    "quantize_model",
    "resolve_model_dir",
    "write",
]

#: Tokens per calibration forward batch.
BATCH_TOKENS = 4096

_O_PROJ_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo")


def resolve_model_dir(model: str | Path | None) -> Path:
    """The model folder to load: ``model``, the default model (None), a GGUF file
    converted once into the cache, a registered name (:data:`assets.MODELS`, e.g.
    ``qwen2.5-coder-1.5b``; an existing path of the same name wins) or a Hugging Face
    hub id (its snapshot in the hub cache, downloaded when the hub is reachable,
    :mod:`.hub`); checked by
    :func:`preflight.check_model_folder`. FileNotFoundError for a missing path or a
    name not set up yet (it names ``bash scripts/setup-model.sh NAME``), ValueError for
    anything unloadable."""
    from . import assets

    if model is None:
        return assets.default_model_dir()
    path = Path(model).expanduser()
    if not path.exists() and str(model) in assets.MODELS:
        path = assets.model_dir(str(model))
    missing = (
        f"model directory {path} does not exist (nor is it a registered model name: "
        f"{', '.join(assets.MODELS)}"
    )
    if not path.exists() and hub.is_repo_id(str(model)):
        try:
            path = hub.snapshot(str(model), allow_patterns=hub.MODEL_FILES)
        except OSError as err:  # FileNotFoundError too: not cached, no such repository
            raise FileNotFoundError(f"{missing}); as a Hugging Face hub id: {err}") from err
    if not path.exists():
        raise FileNotFoundError(f"{missing}, or a Hugging Face hub id)")
    preflight.check_model_folder(path)
    if path.is_file():
        return assets.convert_gguf(path)
    return path


def load_config(path: Path, trust_remote_code: bool = False):
    """The model's config; ValueError unless it names a causal language model."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds here
        raise ValueError(f"{path}: cannot read config.json ({err})") from err
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not trust_remote_code and config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"{path} holds a {config.model_type!r} model, not a causal language model "
            "(AutoModelForCausalLM cannot load it)"
        )
    return config


def load_model(
    model: str | Path | nn.Module | None, trust_remote_code: bool = False, quiet: bool = False
):
    """``(model, tokenizer or None, source dir or None, source name)``.

    ``model``: a local HF folder, a GGUF file, None (the default SmolLM2-135M-Instruct,
    converted once into the cache) or an already loaded ``PreTrainedModel``. Raises
    FileNotFoundError for a missing folder, ValueError for one that does not hold a
    complete causal language model: a model whose weights do not cover every
    parameter (an encoder loaded through a causal-LM head it lacks, a partial
    checkpoint) would be quantized with freshly initialised layers, so it is refused.
    """
    if isinstance(model, nn.Module):
        src = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
        src_dir = Path(src) if src and Path(src).is_dir() else None
        return (
            model,
            _load_tokenizer(src_dir, trust_remote_code),
            src_dir,
            src or type(model).__name__,
        )
    path = resolve_model_dir(model)
    load_config(path, trust_remote_code)
    from transformers import AutoModelForCausalLM

    with _quiet_transformers(quiet):
        try:
            m, info = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=torch.bfloat16,
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
            )
        except Exception as err:  # noqa: BLE001 - safetensors, torch and OS errors alike
            raise ValueError(
                f"{path}: cannot load the model ({type(err).__name__}: {err})"
            ) from err
    missing = list(info.get("missing_keys") or ())
    if missing:
        head = [k for k in missing if k.split(".")[0] in ("lm_head", "cls", "score", "head")]
        what = (
            f"its causal-LM head ({', '.join(head[:3])}) is not in the checkpoint: this looks "
            "like an encoder or base model, not a causal language model"
            if head
            else f"{len(missing)} weights are not in the checkpoint ({', '.join(missing[:3])}...)"
        )
        raise ValueError(
            f"{path}: {what}; transformers would initialise them at random. "
            "Pass a complete causal-LM checkpoint"
        )
    m.eval()
    return m, _load_tokenizer(path, trust_remote_code), path, str(path)


@contextlib.contextmanager
def _quiet_transformers(quiet: bool):
    """Hide transformers' own progress bars (weight loading) while ``quiet``."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as tlog

    was = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tlog.enable_progress_bar()


def _load_tokenizer(path: Path | None, trust_remote_code: bool):
    if path is None:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - a folder without a tokenizer is fine with token calib
        return None


def _attention_entry(layer: nn.Module, rel: str, st: calibration.AttentionStats, convention: str):
    """scalesweep.json entry and runtime vectors of one attention module."""
    h, hkv, d = st.num_heads, st.num_kv_heads, st.head_dim
    rep = max(h // max(hkv, 1), 1)
    attn = layer.get_submodule(rel) if rel else layer
    o_w = None
    for name in _O_PROJ_NAMES:
        mod = getattr(attn, name, None)
        if isinstance(mod, nn.Linear) and mod.in_features == h * d:
            o_w = mod.weight.detach().to(torch.float32)
            break
    q_ms, k_ms = st.q_mean_sq(), st.k_mean_sq()
    biases = {c: b for c, b in attention_biases(attn).items() if c in st.residual_amax}
    vectors = {
        "q_weight": k_ms.repeat_interleave(rep, dim=0),  # query head h <- its KV head's E[k^2]
        "k_weight": q_ms.view(hkv, rep, d).sum(dim=1),  # KV head g <- sum of its heads' E[q^2]
        "v_weight": (
            o_w.square().sum(dim=0).view(hkv, rep, d).sum(dim=1)
            if o_w is not None
            else torch.ones(hkv, d)
        ),
    }
    entry = {"num_heads": h, "num_kv_heads": hkv, "head_dim": d}
    for k in ("q", "k", "v"):
        # quantized around the rotary bias: the residual is what the blocks see
        amax = st.residual_amax[k] if k in biases else getattr(st, f"{k}_amax")
        entry[f"{k}_global_scale"] = float(nvfp4.global_scale(amax, convention))
    for k in ("q", "k", "v"):
        entry[f"{k}_amax"] = getattr(st, f"{k}_amax")
    if biases:
        entry["rope_bias"] = sorted(biases)
        for k in sorted(biases):
            entry[f"{k}_residual_amax"] = st.residual_amax[k]
            vectors[f"{k}_bias"] = biases[k].reshape(-1, d)
    entry["calibration_tokens"] = st.count
    return entry, {k: v.cpu() for k, v in vectors.items()}


@dataclass
class Job:
    """A loaded model ready for the stages, and where its checkpoint goes."""

    model: nn.Module
    tokenizer: object | None
    src_dir: Path | None
    src_name: str
    plan: layers.LayerPlan
    out: Path | None
    device: torch.device
    compute_dtype: torch.dtype
    rope_bias: bool
    overwrite: bool = False
    #: the calibration source read (and checked) once by :func:`prepare`
    calib_docs: list[str] | torch.Tensor | None = None
    calib_source: str | None = None

    def header(self, recipe: Recipe) -> dict:
        """The report's header: what was quantized, how, where."""
        return {
            "model": self.src_name,
            "output": None if self.out is None else str(self.out),
            "scheme": recipe.scheme,
            "objective": recipe.objective,
            "global_scale_convention": recipe.global_scale_convention,
            "runtime_global_scale_convention": recipe.runtime_convention,
            "device": str(self.device),
            "gptq": None if recipe.gptq is None else recipe.gptq.to_json(),
            "rope_bias": self.rope_bias,
            "recipe": recipe.to_json(),
        }


@dataclass
class LayerResults:
    """What the per-layer stages produce: the writer's input."""

    quantized: dict[str, QuantizedLinear] = field(default_factory=dict)
    attention: dict[str, dict] = field(default_factory=dict)
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)


def quantize_model(
    model: str | Path | nn.Module | None,
    output: str | Path | None,
    recipe: Recipe | None = None,
    *,
    calib: str | Path | list[str] | torch.Tensor | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    in_memory: bool = False,
    **options,
) -> dict:
    """Quantize a causal LM to an NVFP4 compressed-tensors checkpoint; return the report.

    ``model``: local HF folder, loaded model, or None for the default model.
    ``recipe``: a :class:`~.recipe.Recipe` (default: the defaults); ``options`` are
    its fields, applied on top (``scheme``, ``objective``, ``global_scale_convention``,
    ``gptq``, ``hessian_damp``, ``rope_bias``, ``num_samples``, ``seq_len``; see
    :class:`~.recipe.Recipe`). ``calib``: None (Wikipedia), a text/JSONL file, a list
    of texts or token ids ``[n, T]``. ``dry_run``: plan and report only, write
    nothing. ``in_memory``: write nothing (``output`` may be None); the report's
    ``"checkpoint"`` holds what would have been written
    (:func:`writer.checkpoint_contents`); the evaluation quantizes recipes this way.

    Stages (each a function below): :func:`prepare` (checks, then the model) ->
    :func:`calibration_tokens` -> :func:`quantize_layers` (per decoder layer:
    statistics -> scales -> rounding) -> :func:`write`.
    """
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    if recipe is not None and not isinstance(recipe, Recipe):
        raise TypeError(
            f"recipe must be a Recipe, got {type(recipe).__name__} (scheme, objective, ... "
            "are keyword arguments)"
        )
    rec = Recipe.build(recipe, **options)
    job = prepare(
        model,
        output,
        rec,
        calib,
        device,
        overwrite,
        trust_remote_code,
        dry_run,
        in_memory,
        progress,
    )
    t_loaded = time.perf_counter()
    if dry_run:
        return _dry_run_report(job, rec, progress)
    tokens, cal_info = calibration_tokens(job, rec)
    results = quantize_layers(job, rec, tokens, progress)
    t_quant = time.perf_counter()

    def timing(total_params: int) -> dict:
        t_end = time.perf_counter()
        wall, cpu = t_end - t_start, time.process_time() - cpu_start
        if in_memory:
            return {"wall_s": wall}
        return {
            "wall_s": wall,
            "load_s": t_loaded - t_start,
            "calibrate_quantize_s": t_quant - t_loaded,
            "write_s": t_end - t_quant,
            "s_per_billion_params": wall / (total_params / 1e9),
            "quantize_s_per_billion_params": (t_quant - t_loaded) / (total_params / 1e9),
            # process CPU time (all threads): on a shared machine wall time overstates
            "cpu_s": cpu,
            "cpu_s_per_billion_params": cpu / (total_params / 1e9),
        }

    rep = write(job, rec, results, cal_info, in_memory, timing)
    if progress and not in_memory:
        print(report.format_report(rep), end="")
    return rep


def prepare(
    model,
    output,
    recipe: Recipe,
    calib,
    device,
    overwrite,
    trust_remote_code,
    dry_run,
    in_memory,
    progress,
) -> Job:
    """Cheap checks first (:mod:`.preflight`: device, model folder and config, the
    calibration source, the output folder and its free space), then the model."""
    if not dry_run and not in_memory and output is None:
        raise ValueError("an output directory is required (or use dry_run)")
    dev = preflight.resolve_device(device)
    compute_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if isinstance(model, nn.Module):
        src_dir, config = None, model.config
    else:
        with _quiet_transformers(not progress):  # a GGUF conversion loads a model too
            src_dir = resolve_model_dir(model)
        config = load_config(src_dir, trust_remote_code)
    cal_docs, cal_source = data.load_calibration_source(calib)
    sch = recipe.scheme_spec
    preflight.check_config(
        config, _calib_width(cal_docs, recipe), sch.kv_cache or sch.query, sch.name
    )
    out = None
    if not dry_run and not in_memory:
        where = getattr(calib, "path", calib)  # a DatasetSource's folder or hub id
        calib_file = (
            Path(where).expanduser()
            if isinstance(where, (str, Path)) and Path(where).expanduser().exists()
            else None
        )
        out = preflight.check_output(output, overwrite, src_dir, calib_file)
        preflight.check_writable(out)
        if src_dir is not None:
            preflight.check_free_space(out, preflight.estimate_checkpoint_bytes(src_dir))
    mdl, tokenizer, src_dir2, src_name = load_model(
        model if isinstance(model, nn.Module) else src_dir, trust_remote_code, quiet=not progress
    )
    plan = layers.plan_model(mdl)
    return Job(
        model=mdl,
        tokenizer=tokenizer,
        src_dir=src_dir or src_dir2,
        src_name=src_name,
        plan=plan,
        out=out,
        device=dev,
        compute_dtype=compute_dtype,
        rope_bias=_resolve_rope_bias(recipe.rope_bias, mdl, sch),
        overwrite=overwrite,
        calib_docs=cal_docs,
        calib_source=cal_source,
    )


def _calib_width(cal_docs, recipe: Recipe) -> int:
    """Tokens per calibration sample: a token tensor's own width, else the recipe's."""
    return cal_docs.shape[1] if isinstance(cal_docs, torch.Tensor) else recipe.seq_len


def _dry_run_report(job: Job, recipe: Recipe, progress: bool) -> dict:
    targets = job.plan.all_targets()
    rows = [
        {
            "name": t.name,
            "shape": [t.module.out_features, t.module.in_features],
            "fused_group": [u.name for u in targets if u.group == t.group],
        }
        for t in targets
    ]
    rep = {
        "dry_run": True,
        "header": job.header(recipe),
        "layers": rows,
        "ignored": job.plan.ignored,
        "total_params": sum(p.numel() for p in job.model.parameters()),
        "totals": report.totals(rows),
    }
    if progress:
        print(report.format_report(rep), end="")
    _check_something_quantized(job.plan)
    return rep


def calibration_tokens(job: Job, recipe: Recipe) -> tuple[torch.Tensor, dict]:
    """The calibration token ids ``[n, T]`` (from the source :func:`prepare` read) and
    the report's ``calibration`` entry; :class:`~.data.CalibrationWarning` s are
    recorded there and handed on."""
    _check_something_quantized(job.plan)
    layers.check_finite(job.model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", data.CalibrationWarning)
        tokens, source = data.calibration_tokens(
            job.calib_docs,
            job.tokenizer,
            recipe.num_samples,
            recipe.seq_len,
            source=job.calib_source or "",
        )
    notes = [str(w.message) for w in caught if issubclass(w.category, data.CalibrationWarning)]
    for w in caught:  # hand every warning on to the caller
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    info = {
        "source": source,
        "num_samples": int(tokens.shape[0]),
        "seq_len": int(tokens.shape[1]),
        "tokens": int(tokens.numel()),
        "requested_tokens": int(recipe.num_samples * _calib_width(job.calib_docs, recipe)),
    }
    if notes:
        info["warnings"] = notes
    return tokens, info


def quantize_layers(job: Job, recipe: Recipe, tokens: torch.Tensor, progress: bool) -> LayerResults:
    """Per decoder layer: statistics (:func:`calibration.calibrate_layers`), then per
    fused group the scales (the recipe's objective) and the rounding (nearest or
    GPTQ) (:func:`.weights.quantize_group`), and the attention entries."""
    plan, gcfg, sch = job.plan, recipe.gptq, recipe.scheme_spec
    objective = recipe.weight_objective()
    res = LayerResults()
    # sequential GPTQ: the calibration pass takes the layer's quantized weights from
    # here to compute the next layer's inputs
    replacements = {} if gcfg is not None and gcfg.sequential else None
    for i, layer, st in calibration.calibrate_layers(
        job.model,
        plan,
        tokens,
        job.device,
        job.compute_dtype,
        batch_size=max(1, BATCH_TOKENS // tokens.shape[1]),
        progress=progress,
        hessians=recipe.needs_hessian,
        replacements=replacements,
        rope=HFRope(job.model) if job.rope_bias else None,
        paired=gcfg is not None and gcfg.paired,
    ):
        groups: dict[str, list[layers.Target]] = {}
        for t in plan.targets[i]:
            groups.setdefault(t.group, []).append(t)
        for members in groups.values():
            gm = [
                GroupMember(
                    name=t.name,
                    weight=t.module.weight,
                    wmse_weight=calibration.wmse_weight(st.linears[t.name]),
                    input_amax=st.linears[t.name].amax,
                    bias=t.module.bias,
                )
                for t in members
            ]
            first = st.linears[members[0].name]
            for q in quantize_group(
                gm,
                objective,
                recipe.global_scale_convention,
                sch.activations,
                gptq=gcfg,
                hessian=_per_token(first.hessian, first),
                cross=_per_token(first.cross, first),
                hessian_tokens=first.count,
                input_convention=recipe.runtime_convention,
            ):
                res.quantized[q.name] = q
                res.vectors[f"{q.name}.input_weight"] = q.input_weight
                if replacements is not None:
                    replacements[q.name] = kernels.dequantize(
                        q.weight_packed, q.weight_scale, q.weight_global_scale, torch.float32
                    )
        layer_prefix = f"{plan.layers_prefix}.{i}"
        for prefix, ast in st.attention.items():
            rel = prefix[len(layer_prefix) + 1 :] if prefix != layer_prefix else ""
            entry, vec = _attention_entry(layer, rel, ast, recipe.runtime_convention)
            res.attention[prefix] = entry
            for k, v in vec.items():
                res.vectors[f"{prefix}.{k}"] = v
    return res


def write(
    job: Job,
    recipe: Recipe,
    results: LayerResults,
    cal_info: dict,
    in_memory: bool,
    timing=lambda total_params: {},
) -> dict:
    """The report, and the checkpoint: in the report (``in_memory``) or written into a
    staging folder renamed into place (:func:`writer.staging_dir`: nothing partial is
    left behind on failure) with the report (``timing(total_params)`` its timings,
    taken once the weights are written)."""
    plan = job.plan
    shapes = {t.name: (t.module.out_features, t.module.in_features) for t in plan.all_targets()}
    rows = report.layer_rows(list(results.quantized.values()), shapes)
    ignore = _ignore_list(plan)
    rep = {
        "dry_run": False,
        "header": job.header(recipe),
        "calibration": cal_info,
        "layers": rows,
        "attention": results.attention,
        "ignored": plan.ignored,
        "total_params": sum(p.numel() for p in job.model.parameters()),
        "totals": report.totals(rows),
    }
    contents = writer.checkpoint_contents(
        job.model,
        results.quantized,
        ignore,
        recipe,
        results.attention,
        results.vectors,
        job.src_name,
        cal_info,
        gptq=_gptq_meta(recipe.gptq, rows),
    )
    if in_memory:
        rep["checkpoint"] = contents
        rep["timing"] = timing(rep["total_params"])
        return rep
    with writer.staging_dir(job.out, job.overwrite) as tmp:
        writer.write_checkpoint(
            tmp, contents, job.src_dir, getattr(job.model, "generation_config", None)
        )
        del contents
        rep["timing"] = timing(rep["total_params"])
        report.write_report(rep, tmp)
    return rep


def _resolve_rope_bias(mode: str, model: nn.Module, sch) -> bool:
    """Whether Q/K are quantized around their rotary bias (the recipe's ``rope_bias``,
    already validated): refuses ``on`` where the plugin could not serve it."""
    if mode == "off" or not (sch.kv_cache or sch.query):
        return False
    biased = any(attention_biases(m) for m in model.modules())
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    served = arch in SERVED_ARCHITECTURES
    if mode == "on" and not (biased and served):
        why = "has no q_proj/k_proj bias" if not biased else "is not one the plugin serves so"
        raise ValueError(f"rope_bias on: {arch} {why} (served: {', '.join(SERVED_ARCHITECTURES)})")
    if biased and not served:
        warnings.warn(
            f"{arch} has q/k projection biases but the plugin cannot serve Q/K quantized "
            "around their rotary image for it: rope_bias off (4-bit K may suffer)",
            stacklevel=3,
        )
    return biased and served


def _per_token(total: torch.Tensor | None, st: calibration.LinearStats):
    """A group's summed statistic (``hessian`` or ``cross``) divided in place by its
    token count (no second K x K copy on the device; the group's stats are not used
    afterwards); None stays None."""
    return None if total is None else total.div_(max(st.count, 1))


def _gptq_meta(cfg: GPTQConfig | None, rows: list[dict]) -> dict:
    """scalesweep.json's ``gptq`` entry: the settings and any RTN fallbacks."""
    if cfg is None:
        return {"enabled": False}
    fallbacks = {r["name"]: r["gptq"] for r in rows if str(r.get("gptq", "ok")).startswith("rtn")}
    return {"enabled": True, **cfg.to_json(), "rtn_fallbacks": fallbacks}


def _check_something_quantized(plan: layers.LayerPlan) -> None:
    """A checkpoint that claims NVFP4 but quantizes nothing is an error, not a success."""
    if plan.all_targets():
        return
    why = "; ".join(f"{n}: {r}" for n, r in list(plan.ignored.items())[:6])
    more = f" (and {len(plan.ignored) - 6} more)" if len(plan.ignored) > 6 else ""
    raise ValueError(
        "nothing to quantize: no decoder Linear layer can be NVFP4 "
        f"({why or 'no Linear layers found'}{more})"
    )


def _ignore_list(plan: layers.LayerPlan) -> list[str]:
    """lm_head first (vLLM and llm-compressor convention), then the rest in model order."""
    names = list(plan.ignored)
    head = [n for n in names if n == "lm_head" or n.endswith(".lm_head")]
    return head + [n for n in names if n not in head]
