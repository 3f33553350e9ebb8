"""Launch-side checks and backend choice: Triton (:mod:`.launch`) on CUDA tensors, the
C++ CPU backend (:mod:`.cpu_backend`) on CPU tensors, the torch reference
(:mod:`scalesweep_vllm.sweep`) where neither applies; all give identical codes, scales
and values (tests/test_kernels.py, tests/test_kernels_cpu.py)."""

from __future__ import annotations

import torch

from .. import hessian_sweep, nvfp4, sweep
from . import cpu_backend, launch

METHODS = ("absmax", "mse", "wmse")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x: torch.Tensor, method: str, weight: torch.Tensor | None, backend: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    _check_backend(backend)
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES:
        raise TypeError(
            f"x must be a float32/float16/bfloat16 tensor, got {getattr(x, 'dtype', x)}"
        )
    if method == "wmse" and weight is None:
        raise ValueError("method 'wmse' needs a weight (per-column importance, >= 0)")
    if method != "wmse" and weight is not None:
        raise ValueError(f"method {method!r} takes no weight; use method='wmse'")


_BACKENDS = ("auto", "torch", "triton", "cpu")


def _check_backend(backend: str) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {_BACKENDS}")


def _use_cpu(device: torch.device, backend: str) -> bool:
    """backend "auto": the C++ backend on CPU tensors when it built; "cpu": always
    (RuntimeError where it cannot be had or the tensor is not on the CPU)."""
    if backend == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"backend='cpu' needs a CPU tensor, got one on {device}")
        if not cpu_backend.available():
            raise RuntimeError(
                f"backend='cpu': the C++ CPU backend is unavailable ({cpu_backend.why()})"
            )
        return True
    return backend == "auto" and device.type == "cpu" and cpu_backend.available()


def _use_triton(device: torch.device, backend: str) -> bool:
    """backend "auto": Triton on CUDA tensors when triton is installed, torch otherwise;
    "triton": always (CPU tensors then need TRITON_INTERPRET=1, checked at launch)."""
    if backend in ("torch", "cpu"):
        return False
    if backend == "triton":
        return True
    return device.type == "cuda" and launch.have_triton()


def _scales(x, global_scale, method, weight):
    if method == "absmax":
        return sweep.absmax_scales(x, global_scale)
    return sweep.sweep_scales(x, global_scale, weight if method == "wmse" else None)


def quantize(
    x: torch.Tensor,
    global_scale: torch.Tensor | float,
    method: str = "mse",
    weight: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4-quantize x: packed E2M1 codes and FP8 block scales."""
    _check(x, method, weight, backend)
    if _use_triton(x.device, backend):
        return launch.quantize(x, global_scale, method, weight)
    if _use_cpu(x.device, backend):
        got = cpu_backend.quantize(x, global_scale, method, weight)
        if got is not None:
            return got
    scales = _scales(x, global_scale, method, weight)
    codes = sweep.quantize_codes(x, global_scale, scales)
    return nvfp4.pack_fp4(codes), scales


def dequantize(
    packed: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | float,
    dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
) -> torch.Tensor:
    """Decode packed NVFP4 in compressed-tensors' order: ``(v / G) * q``, then cast."""
    _check_backend(backend)
    if _use_triton(packed.device, backend):
        return launch.dequantize(packed, scales, global_scale, dtype)
    if _use_cpu(packed.device, backend):
        got = cpu_backend.dequantize(packed, scales, global_scale, dtype)
        if got is not None:
            return got
    codes = nvfp4.unpack_fp4(packed)
    if scales.shape[-1] * nvfp4.BLOCK_SIZE != codes.shape[-1]:
        raise ValueError(f"scales {tuple(scales.shape)} do not match packed {tuple(packed.shape)}")
    g = torch.as_tensor(global_scale, dtype=torch.float32, device=packed.device).reshape(())
    s = (scales.to(torch.float32) / g).repeat_interleave(nvfp4.BLOCK_SIZE, dim=-1)
    return (s * nvfp4.decode_e2m1(codes)).to(dtype)


def fake_quantize(
    x: torch.Tensor,
    global_scale: torch.Tensor | float,
    method: str = "mse",
    weight: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Quantize-dequantize, same shape and dtype as x."""
    _check(x, method, weight, backend)
    if _use_triton(x.device, backend):
        return launch.fake_quantize(x, global_scale, method, weight)
    if _use_cpu(x.device, backend):
        got = cpu_backend.fake_quantize(x, global_scale, method, weight)
        if got is not None:
            return got
    scales = _scales(x, global_scale, method, weight)
    return sweep.quantize_dequantize(x, global_scale, scales).to(x.dtype)


def hessian_sweep_scales(
    x: torch.Tensor, global_scale: torch.Tensor | float, factors, backend: str = "auto"
) -> torch.Tensor:
    """Block-Hessian ScaleSweep scales (float8_e4m3fn ``[N, K/16]``) of a weight ``x``
    ``[N, K]`` with :class:`scalesweep_vllm.hessian_sweep.HessianFactors`: the C++
    backend on CPU tensors, the torch reference elsewhere (a Triton kernel is not
    written yet). Both give the exhaustive sweep's codes."""
    _check_backend(backend)
    if backend == "triton":
        raise ValueError("the block-Hessian sweep has no Triton kernel; use auto, cpu or torch")
    if _use_cpu(x.device, backend):
        codes = cpu_backend.hessian_codes(x, global_scale, factors)
        if codes is not None:
            return sweep._codes_to_scales(codes)
    return hessian_sweep.hessian_sweep_scales(x, global_scale, factors)
