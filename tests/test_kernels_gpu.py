"""Triton kernels on a CUDA GPU vs the reference, bit for bit, on large tensors.

Run by benchmarks/gpu_suite.sh (``pytest -m gpu tests/test_kernels_gpu.py``); skipped
without CUDA. Needs only torch and triton (no vLLM).
"""

from __future__ import annotations

import pytest
import torch

from scalesweep_vllm import nvfp4, sweep
from scalesweep_vllm.kernels import dispatch, launch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _bits(t):
    width = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    return t.view(width[t.dtype])


def _ref(x, g, method, w):
    """Reference on the same device (torch CUDA ops are IEEE: div, sqrt, round-half-even)."""
    if method == "absmax":
        s = sweep.absmax_scales(x, g)
    else:
        s = sweep.sweep_scales(x, g, w if method == "wmse" else None)
    return nvfp4.pack_fp4(sweep.quantize_codes(x, g, s)), s


def _data(m, k, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=gen)
    x *= torch.rand(m, 1, device="cuda", generator=gen) * 4  # rows of different size
    x[torch.rand(m, k, device="cuda", generator=gen) < 1e-3] *= 50.0  # outliers
    x[: m // 64] = 0.0  # all-zero rows
    return x.to(dtype)


@pytest.fixture(params=["1", "0"], ids=["hw-e2m1-if-blackwell", "arith-e2m1"])
def hw_env(request, monkeypatch):
    """Both E2M1 roundings on Blackwell (hardware cvt, arithmetic); on Hopper both runs
    take the arithmetic path."""
    if request.param == "1" and torch.cuda.get_device_capability()[0] < 10:
        pytest.skip("no hardware E2M1 conversion before compute capability 10")
    monkeypatch.setenv("SCALESWEEP_HW_E2M1", request.param)
    return request.param


@pytest.mark.parametrize("method", ["absmax", "mse", "wmse"])
def test_large_bf16_exact(method, hw_env):
    x = _data(4096, 4096, torch.bfloat16, 1)
    g = nvfp4.global_scale(x.float().abs().max())
    w = None
    if method == "wmse":
        w = torch.rand(4096, device="cuda") * 3
        w[::7] = 0.0
    packed, scales = launch.quantize_impl(x, g, method, w)
    packed_ref, scales_ref = _ref(x, g, method, w)
    torch.testing.assert_close(
        scales.view(torch.uint8), scales_ref.view(torch.uint8), atol=0, rtol=0
    )
    assert torch.equal(packed, packed_ref)
    y = launch.fake_quantize_impl(x, g, method, w)
    y_ref = sweep.quantize_dequantize(x, g, scales_ref).to(x.dtype)
    assert torch.equal(_bits(y), _bits(y_ref))
    # the GPU reference agrees with the CPU reference on a slice
    p_cpu, s_cpu = _ref(x[:64].cpu(), g.cpu(), method, None if w is None else w.cpu())
    assert torch.equal(s_cpu.view(torch.uint8), scales_ref[:64].view(torch.uint8).cpu())
    assert torch.equal(p_cpu, packed_ref[:64].cpu())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["absmax", "mse", "wmse"])
def test_dtypes_shapes_exact(method, dtype):
    for m, k in ((1, 16), (3, 48), (257, 1024), (1000, 2064)):
        x = _data(m, k, dtype, m + k)
        g = nvfp4.global_scale(x.float().abs().max())
        w = torch.rand(k, device="cuda") if method == "wmse" else None
        packed, scales = dispatch.quantize(x, g, method, w)  # auto -> Triton on CUDA
        packed_ref, scales_ref = _ref(x, g, method, w)
        assert torch.equal(scales.view(torch.uint8), scales_ref.view(torch.uint8)), (m, k)
        assert torch.equal(packed, packed_ref), (m, k)


def test_per_head_weight_exact():
    """Q/K/V-style input [T, H, D] with a per-head WMSE weight [H, D]."""
    x = _data(4096, 1024, torch.bfloat16, 13).reshape(4096, 8, 128)
    g = nvfp4.global_scale(x.float().abs().max())
    w = torch.rand(8, 128, device="cuda")
    w[3, ::5] = 0.0
    packed, scales = dispatch.quantize(x, g, "wmse", w)
    packed_ref, scales_ref = _ref(x, g, "wmse", w)
    assert torch.equal(scales.view(torch.uint8), scales_ref.view(torch.uint8))
    assert torch.equal(packed, packed_ref)
    y = dispatch.fake_quantize(x, g, "wmse", w)
    assert torch.equal(_bits(y), _bits(sweep.quantize_dequantize(x, g, scales_ref).to(x.dtype)))


def test_strided_exact():
    big = _data(512, 1536, torch.bfloat16, 3)
    g = nvfp4.global_scale(big.float().abs().max())
    for x in (big[:, 256:1280], big[::2, :1024], big.t().contiguous().t()[:, :512]):
        packed, scales = dispatch.quantize(x, g, "mse")
        packed_ref, scales_ref = _ref(x, g, "mse", None)
        assert torch.equal(scales.view(torch.uint8), scales_ref.view(torch.uint8))
        assert torch.equal(packed, packed_ref)


@pytest.mark.parametrize("method", ["absmax", "mse", "wmse"])
def test_poisoned_outputs_fully_written(method):
    """Every byte of the outputs is written: two different poisons give the reference."""
    x = _data(1023, 2048, torch.bfloat16, 5)  # odd M: the last program is partly masked
    g = nvfp4.global_scale(x.float().abs().max())
    w = torch.rand(2048, device="cuda") if method == "wmse" else None
    packed_ref, scales_ref = _ref(x, g, method, w)
    y_ref = sweep.quantize_dequantize(x, g, scales_ref).to(x.dtype)
    for poison in (0xA5, 0x5A):
        out = torch.full((1023, 1024), poison, dtype=torch.uint8, device="cuda")
        sc = torch.full((1023, 128), poison, dtype=torch.uint8, device="cuda")
        launch.quantize_impl(x, g, method, w, out=out, scales=sc)
        assert torch.equal(out, packed_ref) and torch.equal(sc, scales_ref.view(torch.uint8))
        yo = torch.full((1023 * 2048,), poison * 257, dtype=torch.int16, device="cuda")
        launch.fake_quantize_impl(x, g, method, w, out=yo.view(torch.bfloat16))
        assert torch.equal(yo.view(1023, 2048), _bits(y_ref))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_exact(dtype):
    gen = torch.Generator(device="cuda").manual_seed(7)
    packed = torch.randint(0, 256, (777, 512), device="cuda", dtype=torch.uint8, generator=gen)
    codes = torch.randint(0, 127, (777, 64), device="cuda", dtype=torch.uint8, generator=gen)
    scales = codes.view(torch.float8_e4m3fn)
    g = nvfp4.global_scale(torch.tensor(13.0))
    y = dispatch.dequantize(packed, scales, g, dtype)
    y_ref = dispatch.dequantize(packed, scales, g, dtype, backend="torch")
    assert torch.equal(_bits(y), _bits(y_ref))


def test_fp8_rounding_matches_torch_float8():
    """The kernels' FP8 E4M3 rounding (integer arithmetic on fp32 bits, no tl.float8e4nv)
    against torch's float8_e4m3fn conversion on the GPU: every fp32 value in [0, 480] with
    a stride of 7 in its bit pattern (~23M values), every code, midpoint and neighbour."""
    hi = torch.tensor(480.0).view(torch.int32).item()
    t = torch.arange(0, hi, 7, device="cuda", dtype=torch.int32).view(torch.float32)
    v = nvfp4.fp8_values("cuda")
    mid = (v[1:] + v[:-1]) / 2
    pts = torch.cat([v, mid])
    t = torch.cat(
        [
            t,
            pts,
            torch.nextafter(pts, torch.zeros_like(pts)),
            torch.nextafter(pts, torch.full_like(pts, 1e9)),
        ]
    )
    rne, ceil, val = launch.fp8_codes(t)
    torch_codes = t.clamp(0, 448).to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
    bad = (rne != torch_codes).nonzero()
    assert bad.numel() == 0, f"{bad.numel()} mismatches, e.g. t={t[bad[:5, 0]].tolist()}"
    assert torch.equal(ceil, nvfp4.fp8_ceil_code(t))
    assert torch.equal(
        _bits(val), _bits(torch_codes.to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32))
    )
    # and inside the 2-D quantize kernel: AbsMax scales == torch's conversion of (amax/6)*G
    x = _data(2048, 4096, torch.bfloat16, 9)
    g = nvfp4.global_scale(x.float().abs().max())
    _, scales = launch.quantize_impl(x, g, "absmax")
    amax = x.float().abs().reshape(2048, 256, 16).amax(-1)
    expect = ((amax / 6.0) * g).clamp(max=448).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(scales.view(torch.uint8), expect.clamp(min=1))


def test_custom_op_opcheck():
    x = _data(64, 256, torch.bfloat16, 11)
    g = nvfp4.global_scale(x.float().abs().max()).cuda()
    torch.library.opcheck(torch.ops.scalesweep.nvfp4_quantize.default, (x, g, "mse", None))
    torch.library.opcheck(torch.ops.scalesweep.nvfp4_fake_quantize.default, (x, g, "absmax", None))


def test_auto_backend_runs_triton(monkeypatch):
    calls = []
    real = launch.quantize_impl
    monkeypatch.setattr(launch, "quantize_impl", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = _data(8, 64, torch.bfloat16, 15)
    dispatch.quantize(x, nvfp4.global_scale(4.0).cuda(), "mse")
    assert calls, "backend='auto' on a CUDA tensor did not launch the Triton kernel"


def test_cuda_graph_capture_and_replay():
    """The forward path (fake-quant with a device global scale and weight) can be captured
    in a CUDA graph, as vLLM does, and replays to the eager result."""
    x = _data(256, 512, torch.bfloat16, 17)
    g = nvfp4.global_scale(x.float().abs().max()).cuda()
    w = torch.rand(512, device="cuda")
    eager = dispatch.fake_quantize(x, g, "wmse", w)
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (compiles) outside the capture
        dispatch.fake_quantize(static_x, g, "wmse", w)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dispatch.fake_quantize(static_x, g, "wmse", w)
    static_x.copy_(_data(256, 512, torch.bfloat16, 18))
    graph.replay()
    torch.cuda.synchronize()
    expect = dispatch.fake_quantize(static_x, g, "wmse", w)
    assert torch.equal(_bits(out), _bits(expect))
    assert not torch.equal(_bits(out), _bits(eager))


@pytest.mark.parametrize("method", ["mse", "wmse"])
def test_domain_edges_and_top_of_range_exact(method):
    """The sweep's accepted domain on the GPU (BOUNDS_VERSION 2): G = 2^-117 and 2^115,
    max|x| * G = 2^50, elements flushed below 2^-12 (scaled), WMSE weights normalised
    per block (subnormal and huge scales: no flush-to-zero on the GPU either), and
    unsaturated blocks at AbsMax code 126 (the MSE sweep's second stage)."""
    gen = torch.Generator(device="cuda").manual_seed(29)
    base = torch.randn(512, 256, device="cuda", generator=gen)
    base /= base.abs().max()
    w = torch.randint(0, 81, (256,), device="cuda", generator=gen) / 8.0
    top = base.abs() * 0.3 + 0.6  # fifteen clustered at 0.6-0.9 of the maximum
    top[:, ::16] = 1.0
    cases = [
        (base * 2.0**120, nvfp4.GLOBAL_SCALE_MIN),
        (base * 2.0**-110, nvfp4.GLOBAL_SCALE_MAX),
        (base * 2.0**50, 1.0),
        (base * 2.0**-20, 1536.0),  # many elements below the flush threshold
        (top * 6 * 432.5, 1.0),  # c0 = 126, 448 above m/6
    ]
    scales = (1.0, 2.0**-140, 2.0**120) if method == "wmse" else (None,)
    for x, g in cases:
        g = torch.tensor([g], device="cuda")
        for scale in scales:
            wt = None if scale is None else w * scale
            p_ref, s_ref = _ref(x, g, method, wt)
            p, s = dispatch.quantize(x, g, method, wt, backend="triton")
            assert torch.equal(s.view(torch.uint8), s_ref.view(torch.uint8)), (g, scale)
            assert torch.equal(p, p_ref)
