"""The CPU backend: a C++ extension (``cpu/nvfp4_cpu.cpp``) for CPU tensors, bit-exact
with the torch reference (:mod:`scalesweep_vllm.sweep`).

Why C++: the sweep is about ten candidates of about a dozen fp32 operations per
element, and exactness needs control of every rounding: no fused multiply-add
(``-ffp-contract=off``), no fast-math, the reference's fixed summation tree.
Inductor's C++ backend decides contraction and reduction order itself; a small
extension with GCC vector types (16 fp32 lanes, one block per lane) does not.

Built once per machine with torch's ``cpp_extension`` (g++ and ninja, no network)
into ``$TORCH_EXTENSIONS_DIR/scalesweep`` (default ``~/.cache/torch_extensions``), under
a lock that a killed build never leaves held (:func:`.cpu_build.build`); one build per
instruction-set level (generic x86-64, AVX2, AVX-512; :mod:`.cpu_build`), the best
this CPU runs unless ``SCALESWEEP_CPU_ISA`` says otherwise. ``scripts/setup.sh``
builds it ahead (``python -m scalesweep_vllm.kernels.cpu_build``). Where it cannot
build or load, :func:`available` is False, the dispatch uses the reference, and one
warning says why; where it should have built (:func:`required`: CI, or g++ and ninja
present) the tests fail with :func:`build_log`. ``SCALESWEEP_CPU_BACKEND=0`` turns it
off.

Threads: ``at::parallel_for`` over tiles of 16 blocks, so it uses torch's intra-op
pool and follows ``torch.set_num_threads`` (vLLM's CPU worker sets it per worker).

Inputs the reference rejects (NaN/Inf, a global scale out of range, ``max|x| * G``
above 2^50, bad weights) are detected here, cheaply, and then handed to the
reference, which raises its own error; anything else this module does not handle
(weights that broadcast only through middle dims, empty tensors) also goes to the
reference. So the backend returns the reference's result or raises its error on
every input.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
import weakref

import torch

from .. import hessian_sweep, nvfp4, sweep

__all__ = [
    "DISABLE_ENV",
    "available",
    "build",
    "build_log",
    "dequantize",
    "fake_quantize",
    "fp8_table",
    "hessian_codes",
    "load",
    "isa",
    "quantize",
    "required",
    "use",
    "why",
]

logger = logging.getLogger(__name__)

DISABLE_ENV = "SCALESWEEP_CPU_BACKEND"
#: The dispatch's methods, plus "four_over_six" (unweighted) for the evaluation's
#: peer baseline (:class:`scalesweep_vllm.runtime.Part`).
_METHOD_IDS = {"absmax": 0, "mse": 1, "wmse": 2, "four_over_six": 3}
_MODULE = None
_FAILED: str | None = None
_LOG = ""
_ISA: str | None = None
_FP8_TABLE: torch.Tensor | None = None
#: Candidate evaluations (per 16-block tile, summed) of the last call, for the benchmark.
_LAST_TRIPS = [0]
#: Prepared WMSE weights, see :func:`_weight`.
_WEIGHTS: dict[tuple, tuple] = {}
_SCALES: dict[tuple, tuple] = {}
_CACHE_SIZE = 256
_NO_WEIGHT = torch.empty(0)


def _build_mod():
    # imported on use, so that ``python -m scalesweep_vllm.kernels.cpu_build`` does not
    # find its module already imported through this package
    from . import cpu_build

    return cpu_build


def isa() -> str:
    """The instruction-set level of the build in use (or that would be used)."""
    return _ISA or _build_mod().requested_isa()


def build(isa: str | None = None, verbose: bool = False):
    """Compile (or find in the cache) and import the extension (:func:`.cpu_build.build`)."""
    return _build_mod().build(isa, verbose=verbose)


def _checked(mod):
    consts = mod.constants()
    want = [
        sweep.LOWER_BOUND_MARGIN,
        sweep.FLUSH_SCALED,
        sweep.WEIGHT_FLUSH,
        float(sweep.UPPER_OFFSET),
        float(sweep.MSE_STAGE1_OFFSET),
        float(nvfp4.FP8_MAX_CODE),
        hessian_sweep.PRUNE_SLACK,
    ]
    if list(consts) != want:
        raise RuntimeError(f"compiled constants {list(consts)} differ from sweep.py's {want}")
    return mod


def load():
    """The extension module, or None (with one warning) when it cannot be had."""
    global _MODULE, _FAILED, _LOG, _ISA
    if _MODULE is not None or _FAILED is not None:
        return _MODULE
    if os.environ.get(DISABLE_ENV, "1") == "0":
        _FAILED = f"{DISABLE_ENV}=0"
        return None
    try:
        _ISA = _build_mod().requested_isa()
        _MODULE = _checked(build(_ISA))
    except Exception as err:  # noqa: BLE001 - no compiler, no ninja, a failed build...
        text = str(err).strip()
        _LOG = text
        first = text.splitlines()[0] if text else ""
        _FAILED = f"{type(err).__name__}: {first[:300]}"
        warnings.warn(
            f"scalesweep_vllm: the C++ CPU backend is unavailable ({_FAILED}); CPU tensors use "
            "the torch reference (same results, about 100x slower). Needs g++ and ninja; "
            "`python -m scalesweep_vllm.kernels.cpu_build` shows the build log",
            RuntimeWarning,
            stacklevel=3,
        )
    return _MODULE


def build_log(lines: int = 40) -> str:
    """The last lines of the failed build's output ('' when nothing failed)."""
    load()
    return "\n".join(_LOG.splitlines()[-lines:])


def required() -> str:
    """Why this machine must have the backend ('' when its absence is acceptable): CI
    is set, or g++ and ninja are here (so a failed build is a bug, not a missing tool).
    The tests fail instead of skipping then."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return ""
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        return "CI is set"
    return "" if _build_mod().toolchain() else "g++ and ninja are installed"


@contextlib.contextmanager
def use(isa_tag: str):
    """Run the dispatch on the build for ``isa_tag`` inside the block (tests, benchmarks):
    builds it if needed; raises where it cannot be had."""
    global _MODULE, _FAILED, _ISA
    mod = _checked(build(isa_tag))
    saved = (_MODULE, _FAILED, _ISA)
    _MODULE, _FAILED, _ISA = mod, None, isa_tag
    try:
        yield mod
    finally:
        _MODULE, _FAILED, _ISA = saved


def available() -> bool:
    return load() is not None


def why() -> str:
    """Why the backend is unavailable ("" when it is available)."""
    load()
    return _FAILED or ""


def _per_tensor(cache: dict, t: torch.Tensor, extra: tuple, compute):
    """``compute()`` cached per tensor ``t``: keyed by the tensor itself (a weak
    reference, so a freed tensor whose id is reused never hits), its in-place version
    counter (so a modified one never hits) and ``extra``. The plugin passes the same
    global scales and WMSE vectors on every call."""
    key = (id(t), t._version, extra)
    hit = cache.get(key)
    if hit is not None and hit[0]() is t:
        return hit[1]
    got = compute()
    if len(cache) >= _CACHE_SIZE:
        cache.pop(next(iter(cache)))
    cache[key] = (weakref.ref(t), got)
    return got


def _global_scale_ok(global_scale) -> tuple[bool, float]:
    """G as the fp32 number the reference uses, and whether it is in the accepted domain."""
    if isinstance(global_scale, torch.Tensor):
        return _per_tensor(_SCALES, global_scale, (), lambda: _global_scale_value(global_scale))
    return _global_scale_value(global_scale)


def _global_scale_value(global_scale) -> tuple[bool, float]:
    try:
        g = torch.as_tensor(global_scale, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        return False, 0.0
    if g.numel() != 1:
        return False, 0.0
    gf = float(g.reshape(()))
    ok = gf == gf and nvfp4.GLOBAL_SCALE_MIN <= gf <= nvfp4.GLOBAL_SCALE_MAX
    return ok, gf


def _weight(weight, x: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """WMSE weight as a contiguous fp32 [P, K] whose row r % P goes with row r of x
    (the Triton launcher's :func:`.launch._weight_rows`: a per-column [K] vector,
    per-head [H, K] for x [..., H, K], any weight that broadcasts to x's trailing
    dims), or None when the reference must handle it: bad values (it raises) or
    broadcasting through leading dims of x. Cached per weight tensor."""
    if not isinstance(weight, torch.Tensor):
        return None
    tail = tuple(x.shape[max(0, x.dim() - weight.dim()) :])  # all the result depends on
    return _per_tensor(_WEIGHTS, weight, (tail, x.device), lambda: _prepare_weight(weight, x))


def _prepare_weight(weight: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    from .launch import _weight_rows

    try:
        w = _weight_rows(weight, x.shape, x.device)
    except (ValueError, TypeError, RuntimeError):
        return None
    if w.numel() == 0 or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        return None
    k = x.shape[-1]
    return w.reshape(-1, k), w.numel() // k


def _run(x, global_scale, method, weight, fake):
    """(main, scale codes) from the extension, or None to use the reference."""
    mod = load()
    if mod is None or x.device.type != "cpu" or x.dim() == 0 or x.numel() == 0:
        return None
    if x.shape[-1] % nvfp4.BLOCK_SIZE:
        return None
    ok, g = _global_scale_ok(global_scale)
    if not ok:
        return None
    k = x.shape[-1]
    w, period = _NO_WEIGHT, 1
    if method == "wmse":
        got = _weight(weight, x)
        if got is None:
            return None
        w, period = got
    x2 = x.detach().reshape(-1, k).contiguous()
    main, codes, scaled_max, bad, trips = mod.nvfp4(x2, g, _METHOD_IDS[method], w, period, fake)
    _LAST_TRIPS[0] = trips
    if bad or not scaled_max <= sweep.SCALED_MAX:  # the reference raises: let it
        return None
    return main, codes


def quantize(x, global_scale, method, weight):
    """``(packed, scales)`` as :func:`scalesweep_vllm.kernels.quantize`, or None."""
    got = _run(x, global_scale, method, weight, fake=False)
    if got is None:
        return None
    packed, codes = got
    lead = tuple(x.shape[:-1])
    k = x.shape[-1]
    scales = codes.view(torch.float8_e4m3fn).reshape(lead + (k // nvfp4.BLOCK_SIZE,))
    return packed.reshape(lead + (k // 2,)), scales


def fake_quantize(x, global_scale, method, weight):
    """Quantize-dequantize as :func:`scalesweep_vllm.kernels.fake_quantize`, or None."""
    got = _run(x, global_scale, method, weight, fake=True)
    return None if got is None else got[0].reshape(x.shape)


def fp8_table() -> torch.Tensor:
    """fp32 value of every fp8 e4m3 byte, NaN included (the extension's decoding table;
    built once)."""
    global _FP8_TABLE
    if _FP8_TABLE is None:
        _FP8_TABLE = (
            torch.arange(256, dtype=torch.int32)
            .to(torch.uint8)
            .view(torch.float8_e4m3fn)
            .to(torch.float32)
        )
    return _FP8_TABLE


def dequantize(packed, scales, global_scale, dtype):
    """``(v / G) * q`` in ``dtype`` as :func:`scalesweep_vllm.kernels.dequantize`, or None."""
    mod = load()
    if (
        mod is None
        or packed.device.type != "cpu"
        or packed.dtype != torch.uint8
        or scales.dtype != torch.float8_e4m3fn
        or packed.dim() == 0
        or packed.numel() == 0
        or tuple(scales.shape[:-1]) != tuple(packed.shape[:-1])
        or scales.shape[-1] * nvfp4.BLOCK_SIZE != packed.shape[-1] * 2
        or dtype not in (torch.float32, torch.float16, torch.bfloat16)
    ):
        return None
    g = torch.as_tensor(global_scale, dtype=torch.float32)
    if g.numel() != 1:
        return None
    k2 = packed.shape[-1]
    p2 = packed.reshape(-1, k2).contiguous()
    s2 = scales.reshape(-1, scales.shape[-1]).contiguous().view(torch.uint8)
    out = mod.dequant(p2, s2, float(g.reshape(())), dtype, fp8_table())
    return out.reshape(tuple(packed.shape[:-1]) + (k2 * 2,))


#: (candidates, forms) of the last :func:`hessian_codes` call, for the benchmark.
LAST_HESSIAN_WORK = [0, 0]


def hessian_codes(x: torch.Tensor, global_scale, factors) -> torch.Tensor | None:
    """:func:`scalesweep_vllm.hessian_sweep.hessian_sweep_codes` (int64 ``[N, K/16]``)
    by the extension, or None to use the reference. Inputs outside the reference's
    domain raise its error (:func:`scalesweep_vllm.sweep.validate` first)."""
    mod = load()
    if mod is None or x.device.type != "cpu" or x.dim() != 2 or x.numel() == 0:
        return None
    if factors.L.device.type != "cpu" or x.shape[1] != factors.num_blocks * nvfp4.BLOCK_SIZE:
        return None  # the reference raises its error
    g, _ = sweep.validate(x, global_scale)
    codes, cands, forms = mod.hessian(
        x.detach().to(torch.float32).contiguous(),
        float(g.reshape(())),
        factors.L.contiguous(),
        factors.w.contiguous(),
        factors.lam.contiguous(),
    )
    LAST_HESSIAN_WORK[:] = [cands, forms]
    return codes.to(torch.int64)
