"""NVIDIA ModelOpt NVFP4 exports served by ``--quantization scalesweep``.

ModelOpt writes ``hf_quant_config.json`` (``{"producer": {"name": "modelopt"},
"quantization": {"quant_algo": "NVFP4", "exclude_modules": [...], ...}}``) and, from
0.31 on, the same in config.json's ``quantization_config`` with ``quant_method:
"modelopt"``. vLLM 0.32 reads either (``vllm/transformers_utils/config.py``: the file
only when config.json has none; ``model_arch_config_convertor.py`` then sets
``quant_method`` to ``modelopt_fp4``); both reach
:meth:`.config.ScaleSweepConfig.override_quantization_method` as a dict.

Per quantized Linear ``p`` the export holds ``p.weight`` (uint8 ``[out, in/2]``, the
even element in the low nibble, as compressed-tensors), ``p.weight_scale`` (fp8 E4M3
``[out, in/16]``), ``p.weight_scale_2`` (fp32 scalar: the DECODE factor
``amax / (6 * 448)``, i.e. ``1 / G_w``) and ``p.input_scale`` (fp32 scalar, ``1 / G_a``
likewise). The plugin loads them under these names (:mod:`.linear`) and:

* decodes each fused shard with its own ``weight_scale_2`` in ModelOpt's order,
  ``e2m1 * (fp8 * weight_scale_2)`` in fp32, cast once to the model dtype
  (``modelopt/torch/quantization/qtensor/nvfp4_tensor.py`` ``NVFP4QTensor.dequantize``):
  bit for bit ModelOpt's own dequantized weight (``dequant`` backend);
* quantizes a fused group's input with ``G_a = 1 / max(input_scale)`` as vLLM's
  ModelOpt path does (``input_global_scale_inv``), by ScaleSweep instead of AbsMax;
* on the packed CPU GEMM, W4A4 rows get vLLM's ``alpha = input_scale * weight_scale_2``;
  W4A16 rows get ``G_w = fl(1 / weight_scale_2)`` (the kernel divides by ``G_w``): one
  fp32 rounding from ModelOpt's decode factor, as the evaluation's reader notes
  (``scalesweep_vllm/evaluate/modelopt.py``).

No vLLM import here.
"""

from __future__ import annotations

from fnmatch import fnmatch
from typing import Any

from .metadata import CheckpointError, CompressedTensorsInfo, matches_ignore

__all__ = [
    "NVFP4_ALGOS",
    "expand_excludes",
    "is_modelopt_config",
    "matches_exclude",
    "parse_modelopt",
]

#: ``quant_algo`` values served: W4A4 (NVFP4) and weight-only (W4A16_NVFP4).
NVFP4_ALGOS = ("NVFP4", "W4A16_NVFP4")
GROUP_SIZE = 16


def _body(cfg: dict[str, Any]) -> dict[str, Any]:
    """The dict holding ``quant_algo``: hf_quant_config.json nests it in ``quantization``."""
    q = cfg.get("quantization")
    return q if isinstance(q, dict) else cfg


def is_modelopt_config(cfg: dict[str, Any] | None) -> bool:
    """A ModelOpt quantization config, as vLLM tells them apart: ``quant_method``
    starting with ``modelopt`` (``modelopt``, ``modelopt_fp4`` after vLLM's
    normalization), or hf_quant_config.json's ``producer.name == "modelopt"``."""
    if not cfg:
        return False
    method = str(cfg.get("quant_method") or "").lower()
    producer = cfg.get("producer")
    name = producer.get("name") if isinstance(producer, dict) else None
    return method.startswith("modelopt") or name == "modelopt"


def parse_modelopt(cfg: dict[str, Any]) -> CompressedTensorsInfo:
    """What the plugin needs of a ModelOpt NVFP4 config, in the compressed-tensors
    form the rest of the plugin reads (activations: W4A4?; ignore: exclude_modules,
    expanded by :func:`expand_excludes` when vLLM applies the model's name mapper, as
    it does for its own ModelOpt config). CheckpointError for anything else."""
    where = "ModelOpt quantization config (hf_quant_config.json / quantization_config)"
    body = _body(cfg)
    algo = str(body.get("quant_algo") or "").upper()
    if algo not in NVFP4_ALGOS:
        raise CheckpointError(
            f"{where}: quant_algo is {algo or None!r}; scalesweep serves ModelOpt "
            f"{' / '.join(NVFP4_ALGOS)} checkpoints only (stock vLLM serves the others)"
        )
    group = body.get("group_size", GROUP_SIZE)
    if group is not None and int(group) != GROUP_SIZE:
        raise CheckpointError(f"{where}: group_size is {group}; NVFP4 blocks are {GROUP_SIZE}")
    kv = body.get("kv_cache_quant_algo") or body.get("kv_cache_scheme")
    if kv:
        raise CheckpointError(
            f"{where}: kv_cache_quant_algo is {kv!r}; its k/v scales configure vLLM's own "
            "quantized KV cache, which the plugin does not mix with ScaleSweep's. Export "
            "without KV-cache quantization (scalesweep reads its KV settings from "
            "scalesweep.json) or serve with stock vLLM"
        )
    excludes = body.get("exclude_modules")
    if excludes is None:
        excludes = cfg.get("ignore") or []
    if not isinstance(excludes, list):
        raise CheckpointError(f"{where}: exclude_modules must be a list, got {excludes!r}")
    # vLLM's rule (modelopt.py ModelOptNvFp4Config._from_config): NVFP4 whose every
    # config group lacks input_activations is weight-only.
    groups = cfg.get("config_groups")
    no_inputs = (
        isinstance(groups, dict)
        and bool(groups)
        and all(isinstance(g, dict) and g.get("input_activations") is None for g in groups.values())
    )
    activations = algo == "NVFP4" and not no_inputs
    return CompressedTensorsInfo(
        activations=activations,
        ignore=tuple(str(e) for e in excludes),
        kv_cache_scheme=None,
    )


def expand_excludes(excludes: list[str]) -> list[str]:
    """vLLM's expansion (modelopt.py ``ModelOptQuantConfigBase.apply_vllm_mapper``):
    ``foo*`` also stands for ``foo`` and ``foo.*``, so a module mapper can rename it."""
    out = []
    for e in excludes:
        if e.endswith("*"):
            out += [e[:-1], e[:-1] + ".*"]
        else:
            out.append(e)
    return list(dict.fromkeys(out))


def matches_exclude(name: str, excludes: tuple[str, ...]) -> bool:
    """Whether ModelOpt's ``exclude_modules`` leaves module ``name`` unquantized, by
    the rules of vLLM 0.32's ``ModelOptQuantConfigBase.is_layer_excluded``: an exact
    (or trailing-component) name, a substring (kept by vLLM for exports older than
    ModelOpt 0.39), or an fnmatch wildcard."""
    if matches_ignore(name, tuple(e for e in excludes if not e.startswith("re:"))):
        return True
    for e in excludes:
        if not e:
            continue
        if e in name or (name.startswith("language_model.") and e in name[15:]):
            return True
        if fnmatch(name, e):
            return True
    return False
