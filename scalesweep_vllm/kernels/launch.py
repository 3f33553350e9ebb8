"""Launchers for the Triton NVFP4 kernels (:mod:`.nvfp4_triton`): check, allocate, launch.

Imports without Triton and without a GPU; a launch raises RuntimeError ("... need
triton") when Triton is missing. CUDA tensors run the compiled kernels; CPU tensors run them in
Triton's interpreter, which must be asked for with ``TRITON_INTERPRET=1`` (the CPU
tests do). The interpreter needs kernels created while that variable is set, so
CPU launches use a private copy of the kernel module loaded in interpreter mode;
other modules that import Triton normally are not affected.

The forward-path operations are also registered as ``torch.library`` custom ops
(``scalesweep::nvfp4_quantize``, ``scalesweep::nvfp4_fake_quantize``,
``scalesweep::nvfp4_dequantize``) with fake implementations, so that vLLM's
torch.compile and CUDA graphs see through them.

Data-dependent checks (NaN/Inf in x, ``max|x| * G <= 2^50``) are done by the torch
reference only: the kernels never synchronize with the host. Input outside the
sweep's domain (:mod:`scalesweep_vllm.sweep` docstring) gives unspecified codes
here. The global scale's own range is checked where its value is on the host.
"""

import importlib
import importlib.util
import os
import pathlib
from typing import Optional

import torch

from ..nvfp4 import BLOCK_SIZE
from ..sweep import check_global_scale

__all__ = [
    "DEFAULT_CONFIG",
    "METHOD_IDS",
    "dequantize",
    "dequantize_impl",
    "fake_quantize",
    "fake_quantize_impl",
    "fp8_codes",
    "have_triton",
    "quantize",
    "quantize_impl",
    "quantize_swizzled",
    "use_hw_e2m1",
]

METHOD_IDS = {"absmax": 0, "mse": 1, "wmse": 2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Blocks per program and warps, by method (the benchmark can override them).
# Smaller tiles for the sweeps: the loop runs max(window) over the tile's blocks
# (Gaussian data, mean trip count at BM=64/128: MSE 10.1/10.2, WMSE 14.0/15.0).
DEFAULT_CONFIG = {"absmax": (128, 4), "mse": (64, 2), "wmse": (64, 2)}
#: Sweeps over at least this many blocks read G / v and v^2 from a 256-entry table made
#: by one extra tiny launch, instead of an IEEE division per block and candidate.
TABLE_MIN_BLOCKS = 4096
#: In the interpreter, bigger tiles mean fewer Python-level programs.
INTERPRET_BLOCKS = 256

_MODULES: dict[tuple[str, bool], object] = {}
_HAVE_TRITON: bool | None = None


def have_triton() -> bool:
    """Whether triton imports (tried once, only when a Triton route is considered)."""
    global _HAVE_TRITON
    if _HAVE_TRITON is None:
        try:
            import triton  # noqa: F401

            _HAVE_TRITON = True
        except ImportError:
            _HAVE_TRITON = False
    return _HAVE_TRITON


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels(device: torch.device, module: str = "nvfp4_triton"):
    """A Triton kernel module of this package (``nvfp4_triton``, ``swizzle_triton``):
    compiled for CUDA tensors, an interpreted copy for CPU ones."""
    if not have_triton():
        raise RuntimeError("scalesweep_vllm Triton kernels need triton (pip install triton)")
    interp = device.type != "cuda"
    if interp and not _interpreting():
        raise RuntimeError(
            f"backend='triton' on a {device.type} tensor runs Triton's interpreter: set "
            "TRITON_INTERPRET=1 (or use backend='torch' / a CUDA tensor)"
        )
    key = (module, interp)
    if key not in _MODULES:
        if interp:
            path = pathlib.Path(__file__).with_name(f"{module}.py")
            name = f"{__package__}._{module}_interpreted"
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(f".{module}", __package__)
        _MODULES[key] = mod
    return _MODULES[key]


def use_hw_e2m1(device: torch.device) -> bool:
    """Blackwell path: hardware E2M1 rounding on compute capability >= 10, unless
    ``SCALESWEEP_HW_E2M1=0``."""
    if device.type != "cuda" or os.environ.get("SCALESWEEP_HW_E2M1", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 10


def _check_x(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in DTYPES:
        raise TypeError(
            f"x must be a float32/float16/bfloat16 tensor, got {getattr(x, 'dtype', x)}"
        )
    if x.dim() == 0 or x.shape[-1] % BLOCK_SIZE:
        raise ValueError(
            f"x: last dimension must be a multiple of {BLOCK_SIZE} (NVFP4 blocks), "
            f"got shape {tuple(x.shape)}"
        )


def _global_scale(global_scale, device, check: bool = True) -> torch.Tensor:
    """G as a contiguous fp32 [1] tensor on ``device``. Where its value is on the host
    (a Python number, or a CPU tensor for a CPU launch) it is checked against the
    sweep's domain (:func:`scalesweep_vllm.sweep.check_global_scale`): a normal fp32
    number in [2^-117, 2^115] (``check``: quantizing; decoding needs no such range).
    A CUDA global scale is not read (no host sync)."""
    on_host = not isinstance(global_scale, torch.Tensor) or (
        global_scale.device.type == "cpu" and torch.device(device).type == "cpu"
    )
    g = torch.as_tensor(global_scale, dtype=torch.float32, device=device)
    if g.numel() != 1:
        raise ValueError(f"global_scale must hold one number, got shape {tuple(g.shape)}")
    if check and on_host:
        check_global_scale(float(g.reshape(())))
    return g.reshape(1).contiguous()


def _weight_rows(weight, x_shape, device) -> torch.Tensor:
    """The WMSE weight as the contiguous fp32 tensor of shape ``x.shape[-n:]`` it
    broadcasts to (n = its number of dims, leading 1s dropped): a per-column vector
    [K], per-head [H, D] for x [T, H, D], or a full weight. The kernel reads row
    ``r % P`` of it as a [P, K] matrix for the flattened row r of x."""
    if weight is None:
        raise ValueError("method 'wmse' needs a weight (per-column importance, >= 0)")
    w = torch.as_tensor(weight).detach()
    while w.dim() > 1 and w.shape[0] == 1:
        w = w[0]
    if w.dim() == 0:
        w = w.reshape(1)
    n = w.dim()
    suffix = tuple(x_shape[-n:])
    ok = n <= len(x_shape)
    if ok:
        try:
            ok = tuple(torch.broadcast_shapes(tuple(w.shape), suffix)) == suffix
        except RuntimeError:
            ok = False
    if not ok:
        raise ValueError(
            f"weight of shape {tuple(torch.as_tensor(weight).shape)} does not broadcast to "
            f"x of shape {tuple(x_shape)} along its trailing dims (the Triton WMSE kernel "
            "takes a per-column [K] weight, a per-head [H, K] one, or any weight that "
            "broadcasts to x's trailing dims)"
        )
    return w.to(device=device, dtype=torch.float32).expand(suffix).contiguous()


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x as [M, K] (a view when possible) and whether its rows are contiguous and packed."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    contig = x2.stride(-1) == 1 and (x2.shape[0] <= 1 or x2.stride(0) == k)
    return x2, contig


def _launch_quant(
    x, global_scale, method, weight, fake, config, out=None, scales=None, swizzle_kb=None
):
    """``swizzle_kb``: write the scales swizzled into a zeroed ``[round_up(M, 128),
    round_up(swizzle_kb, 4)]`` buffer (the layout of vLLM's ``swizzle_blockscale``;
    swizzle_kb >= K/16 counts blocks of K padded for the GEMM, whose scales stay 0)."""
    if method not in METHOD_IDS:
        raise ValueError(f"unknown method {method!r}; choose one of {tuple(METHOD_IDS)}")
    _check_x(x)
    if method != "wmse" and weight is not None:
        raise ValueError(f"method {method!r} takes no weight; use method='wmse'")
    k = x.shape[-1]
    mod = _kernels(x.device)
    g = _global_scale(global_scale, x.device)
    w = _weight_rows(weight, x.shape, x.device) if method == "wmse" else g
    n_wblocks = w.numel() // BLOCK_SIZE if method == "wmse" else 1  # w is [P, K]
    x2, contig = _rows(x.detach())
    m = x2.shape[0]
    n_blocks = m * (k // BLOCK_SIZE)
    # out / scales may be given (tests poison them; benchmarks reuse them): contiguous,
    # right shape and dtype, else a new allocation
    if fake:
        out = _out(out, (m, k), x.dtype, x.device)
        scales = out  # unused by the kernel
    elif swizzle_kb is not None:
        out = _out(out, (m, k // 2), torch.uint8, x.device)
        mp, kp = -(-m // 128) * 128, -(-swizzle_kb // 4) * 4
        scales = torch.zeros((mp, kp), dtype=torch.uint8, device=x.device)
    else:
        out = _out(out, (m, k // 2), torch.uint8, x.device)
        scales = _out(scales, (m, k // BLOCK_SIZE), torch.uint8, x.device)
    if n_blocks:
        bm, warps = config or DEFAULT_CONFIG[method]
        if x.device.type != "cuda":
            bm = min(INTERPRET_BLOCKS, triton_next_pow2(n_blocks))
        grid = ((n_blocks + bm - 1) // bm,)
        use_table = method != "absmax" and n_blocks >= TABLE_MIN_BLOCKS
        tab = g
        if use_table:
            tab = torch.empty(256, dtype=torch.float32, device=x.device)
            mod.table_kernel[(1,)](g, tab, num_warps=4, enable_fp_fusion=False)
        mod.quant_kernel[grid](
            x2,
            w,
            g,
            tab,
            out,
            scales,
            n_blocks,
            k // BLOCK_SIZE,
            n_wblocks,
            x2.stride(0),
            x2.stride(1),
            0 if swizzle_kb is None else scales.shape[1] // 4,
            METHOD=METHOD_IDS[method],
            FAKE=fake,
            ROW_CONTIG=contig,
            HW_E2M1=use_hw_e2m1(x.device),
            USE_TABLE=use_table,
            BM=bm,
            SWIZZLE=swizzle_kb is not None,
            num_warps=warps,
            enable_fp_fusion=False,
        )
    lead = tuple(x.shape[:-1])
    if fake:
        return out.reshape(x.shape)
    if swizzle_kb is not None:
        return out, scales.view(torch.float8_e4m3fn)
    return (
        out.reshape(lead + (k // 2,)),
        scales.view(torch.float8_e4m3fn).reshape(lead + (k // BLOCK_SIZE,)),
    )


def _out(buf, shape, dtype, device):
    if buf is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if buf.dtype == torch.float8_e4m3fn:
        buf = buf.view(torch.uint8)
    if buf.dtype != dtype or buf.device != device or not buf.is_contiguous():
        raise ValueError(f"output buffer must be a contiguous {dtype} tensor on {device}")
    if buf.data_ptr() % 16:
        raise ValueError("output buffer must be 16-byte aligned")
    if buf.numel() != int(torch.Size(shape).numel()):
        raise ValueError(f"output buffer has {buf.numel()} elements, expected shape {shape}")
    return buf.view(shape)


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def quantize_impl(x, global_scale, method="mse", weight=None, config=None, out=None, scales=None):
    """Packed E2M1 codes ``[..., K/2]`` uint8 and FP8 scales ``[..., K/16]`` float8_e4m3fn.
    ``config=(blocks per program, num_warps)`` overrides the default tile."""
    return _launch_quant(x, global_scale, method, weight, False, config, out, scales)


def fake_quantize_impl(x, global_scale, method="mse", weight=None, config=None, out=None):
    """Quantize-dequantize, same shape and dtype as x: ``(v / G) * q`` in fp32, then cast."""
    return _launch_quant(x, global_scale, method, weight, True, config, out)


def dequantize_impl(packed, scales, global_scale, dtype=torch.bfloat16, config=None):
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if scales.dtype not in (torch.float8_e4m3fn, torch.uint8):
        raise TypeError(f"scales must be float8_e4m3fn, got {scales.dtype}")
    if dtype not in DTYPES:
        raise TypeError(f"dtype must be float32/float16/bfloat16, got {dtype}")
    if (
        packed.dim() == 0
        or tuple(scales.shape[:-1]) != tuple(packed.shape[:-1])
        or (scales.shape[-1] * BLOCK_SIZE != packed.shape[-1] * 2)
    ):
        raise ValueError(
            f"scales {tuple(scales.shape)} do not match packed {tuple(packed.shape)} "
            f"(expected [..., K/16] for packed [..., K/2])"
        )
    if scales.device != packed.device:
        raise ValueError(f"scales on {scales.device}, packed on {packed.device}")
    mod = _kernels(packed.device)
    k = packed.shape[-1] * 2
    p2 = packed.reshape(-1, k // 2).contiguous()
    s2 = scales.view(torch.uint8).reshape(-1, k // BLOCK_SIZE).contiguous()
    g = _global_scale(global_scale, packed.device, check=False)
    m = p2.shape[0]
    out = torch.empty((m, k), dtype=dtype, device=packed.device)
    n_blocks = m * (k // BLOCK_SIZE)
    if n_blocks:
        bm, warps = config or (128, 4)
        if packed.device.type != "cuda":
            bm = min(INTERPRET_BLOCKS, triton_next_pow2(n_blocks))
        grid = ((n_blocks + bm - 1) // bm,)
        mod.dequant_kernel[grid](
            p2, s2, g, out, n_blocks, BM=bm, num_warps=warps, enable_fp_fusion=False
        )
    return out.reshape(tuple(packed.shape[:-1]) + (k,))


def fp8_codes(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Test hook: the kernels' FP8 helpers on fp32 ``t >= 0``: (rne code, ceil code,
    value of the rne code)."""
    mod = _kernels(t.device)
    t = t.to(torch.float32).reshape(-1).contiguous()
    rne = torch.empty(t.shape, dtype=torch.int32, device=t.device)
    ceil = torch.empty_like(rne)
    val = torch.empty_like(t)
    block = 1024 if t.device.type == "cuda" else max(16, min(1 << 14, triton_next_pow2(t.numel())))
    if t.numel():
        grid = ((t.numel() + block - 1) // block,)
        mod.fp8_codes_kernel[grid](
            t, rne, ceil, val, t.numel(), BLOCK=block, enable_fp_fusion=False
        )
    return rne, ceil, val


# ---------------------------------------------------------------------------
# torch.library custom ops (the forward path in vLLM)
# ---------------------------------------------------------------------------


# Optional[...] rather than "X | None": torch.library's schema inference matches
# typing.Optional on every torch version the package supports.
@torch.library.custom_op("scalesweep::nvfp4_quantize", mutates_args=())
def nvfp4_quantize(
    x: torch.Tensor,
    global_scale: torch.Tensor,
    method: str,
    weight: Optional[torch.Tensor],  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_impl(x, global_scale, method, weight)


@nvfp4_quantize.register_fake
def _(x, global_scale, method, weight):
    lead = tuple(x.shape[:-1])
    k = x.shape[-1]
    return (
        x.new_empty(lead + (k // 2,), dtype=torch.uint8),
        x.new_empty(lead + (k // BLOCK_SIZE,), dtype=torch.float8_e4m3fn),
    )


@torch.library.custom_op("scalesweep::nvfp4_quantize_swizzled", mutates_args=())
def nvfp4_quantize_swizzled(
    x: torch.Tensor,
    global_scale: torch.Tensor,
    method: str,
    weight: Optional[torch.Tensor],  # noqa: UP045
    scale_blocks: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> packed [M, K/2] and scales swizzled for cutlass_scaled_fp4_mm,
    ``[round_up(M, 128), round_up(scale_blocks, 4)]``, written by the quantize kernel."""
    return _launch_quant(x, global_scale, method, weight, False, None, swizzle_kb=scale_blocks)


@nvfp4_quantize_swizzled.register_fake
def _(x, global_scale, method, weight, scale_blocks):
    m, k = x.shape
    mp, kp = -(-m // 128) * 128, -(-scale_blocks // 4) * 4
    return (
        x.new_empty((m, k // 2), dtype=torch.uint8),
        x.new_empty((mp, kp), dtype=torch.float8_e4m3fn),
    )


@torch.library.custom_op("scalesweep::nvfp4_fake_quantize", mutates_args=())
def nvfp4_fake_quantize(
    x: torch.Tensor,
    global_scale: torch.Tensor,
    method: str,
    weight: Optional[torch.Tensor],  # noqa: UP045
) -> torch.Tensor:
    return fake_quantize_impl(x, global_scale, method, weight)


@nvfp4_fake_quantize.register_fake
def _(x, global_scale, method, weight):
    return torch.empty_like(x)


@torch.library.custom_op("scalesweep::nvfp4_dequantize", mutates_args=())
def nvfp4_dequantize(
    packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    return dequantize_impl(packed, scales, global_scale, dtype)


@nvfp4_dequantize.register_fake
def _(packed, scales, global_scale, dtype):
    return packed.new_empty(tuple(packed.shape[:-1]) + (packed.shape[-1] * 2,), dtype=dtype)


def quantize(x, global_scale, method="mse", weight=None):
    """Triton quantize through the custom op (checks first, so errors are plain)."""
    _check_x(x)
    g = _global_scale(global_scale, x.device)
    if method == "wmse":
        weight = _weight_rows(weight, x.shape, x.device)
    return nvfp4_quantize(x, g, method, weight)


def quantize_swizzled(x, global_scale, method="mse", weight=None, scale_blocks=None):
    """Triton quantize of x [M, K] with the scales written swizzled (see
    :func:`nvfp4_quantize_swizzled`); ``scale_blocks`` defaults to K / 16."""
    _check_x(x)
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got shape {tuple(x.shape)}")
    g = _global_scale(global_scale, x.device)
    if method == "wmse":
        weight = _weight_rows(weight, x.shape, x.device)
    kb = x.shape[-1] // BLOCK_SIZE if scale_blocks is None else int(scale_blocks)
    if kb < x.shape[-1] // BLOCK_SIZE:
        raise ValueError(f"scale_blocks {kb} < K / 16 = {x.shape[-1] // BLOCK_SIZE}")
    return nvfp4_quantize_swizzled(x, g, method, weight, kb)


def fake_quantize(x, global_scale, method="mse", weight=None):
    _check_x(x)
    g = _global_scale(global_scale, x.device)
    if method == "wmse":
        weight = _weight_rows(weight, x.shape, x.device)
    return nvfp4_fake_quantize(x, g, method, weight)


def dequantize(packed, scales, global_scale, dtype=torch.bfloat16):
    g = _global_scale(global_scale, packed.device, check=False)
    return nvfp4_dequantize(packed, scales, g, dtype)
