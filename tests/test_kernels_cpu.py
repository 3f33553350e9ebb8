"""The C++ CPU backend vs the reference (sweep.py), bit for bit, on every build
(instruction-set level) this CPU runs.

Codes, scales, packed nibbles and fake-quantized values must be identical (atol=0)
on the Triton tests' random and adversarial sets (imported from test_kernels.py),
on larger random sets, and against the exhaustive sweep; inputs the reference
rejects raise its errors; without the extension the dispatch falls back to the
reference with one warning.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from scalesweep_vllm import nvfp4, sweep
from scalesweep_vllm.kernels import cpu_backend, cpu_build, dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _missing(what: str, log: str) -> None:
    """Fail where the backend must exist (CI, or g++ and ninja present), skip elsewhere."""
    why = cpu_backend.required()
    if why:
        pytest.fail(f"{what} ({why}, so this is a failure, not a skip); build log:\n{log}")
    pytest.skip(what)


@pytest.fixture(autouse=True, scope="module", params=cpu_build.cpu_isas())
def isa_build(request):
    """Every test below runs on every build this CPU can run (generic, AVX2, AVX-512),
    so an AVX-512 machine proves the AVX2 and generic builds too."""
    if not cpu_backend.available():
        _missing(f"C++ CPU backend unavailable: {cpu_backend.why()}", cpu_backend.build_log())
    try:
        cpu_build.build(request.param)
    except Exception as err:  # noqa: BLE001 - reported with its log
        _missing(f"the {request.param} build is unavailable", str(err)[-4000:])
    with cpu_backend.use(request.param) as mod:
        yield mod


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern, so -0.0 != 0.0 and every mantissa bit counts."""
    width = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    return t.view(width[t.dtype])


def check_cpu(x, g, method, w=None, exhaustive=False):
    """The Triton tests' exact check on the C++ backend (codes, scales, packed nibbles,
    fake-quant values), plus dequantize of its own output."""
    import test_kernels

    packed, scales = test_kernels.check_exact(x, g, method, w, backend="cpu", exhaustive=exhaustive)
    y_ref = sweep.quantize_dequantize(x, g, scales).to(x.dtype)
    d = dispatch.dequantize(packed, scales, g, x.dtype, backend="cpu")
    assert torch.equal(_bits(d), _bits(y_ref)), f"{method}: dequantize differs"
    return scales


# -- the Triton tests' sets --------------------------------------------------------------


@pytest.fixture(scope="module")
def tk():
    pytest.importorskip("triton")
    import test_kernels

    return test_kernels


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("method", ["absmax", "mse", "wmse"])
def test_random_exact(method, m, dtype, tk):
    check_cpu(*tk.random_case(method, m, dtype))


@pytest.mark.parametrize("method", ["absmax", "mse", "wmse"])
def test_adversarial_exact(method, tk):
    """Ties at every E2M1 midpoint, zeros and -0.0, constant and one-hot blocks,
    subnormal-range scales next to big blocks, in every dtype; also exhaustive."""
    x = tk._adversarial_rows()
    w = tk._weight(64, torch.Generator().manual_seed(7)) if method == "wmse" else None
    for g in (torch.tensor([1.0]), nvfp4.global_scale(x.abs().max())):
        check_cpu(x, g, method, w)
        if method != "absmax":
            check_cpu(x, g, method, w, exhaustive=True)
    for dtype in (torch.bfloat16, torch.float16):
        xd = x.to(dtype)
        check_cpu(xd, nvfp4.global_scale(xd.float().abs().max()), method, w)


@pytest.mark.parametrize("method", ["mse", "wmse"])
def test_extreme_values_exact(method, tk):
    """Values near the fp32/bf16/fp16 range ends, tiny tensors with a huge global scale
    (FP8 subnormal scales, flushed elements), and the accepted domain's edges."""
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(4, 64, generator=gen)
    w = tk._weight(64, gen) if method == "wmse" else None
    for scale, dtype in (
        (3.0e38, torch.float32),
        (3.0e38, torch.bfloat16),
        (6.0e4, torch.float16),
        (1e-30, torch.float32),
    ):
        x = (base / base.abs().max() * scale).to(dtype)
        check_cpu(x, nvfp4.global_scale(x.float().abs().max()), method, w)
    check_cpu(base * 2.0**-106, torch.tensor([2.0**100]), method, w)
    unit = base / base.abs().max()
    check_cpu(unit * 2.0**120, torch.tensor([nvfp4.GLOBAL_SCALE_MIN]), method, w)
    check_cpu(unit * 2.0**-110, torch.tensor([nvfp4.GLOBAL_SCALE_MAX]), method, w)
    check_cpu(unit * 2.0**50, torch.tensor([1.0]), method, w)
    if method == "wmse":
        w8 = torch.randint(0, 81, (64,), generator=gen) / 8.0
        for scale in (2.0**-140, 2.0**120, 1e-44, 1e36):
            check_cpu(unit, torch.tensor([1536.0]), "wmse", w8 * scale)


def test_top_of_range_exact(tk):
    """Unsaturated blocks at AbsMax codes 120..126 and the c0 = 126 block whose optimum
    (122) lies below c0 - 3: found by the second stage here too."""
    gen = torch.Generator().manual_seed(41)
    x = tk.top_of_range_rows(gen)
    scales = check_cpu(x, torch.tensor([1.0]), "mse")
    assert int(scales.view(torch.uint8).flatten()[-1]) == 122
    check_cpu(x, torch.tensor([1.0]), "mse", exhaustive=True)
    check_cpu(x, torch.tensor([1.0]), "wmse", tk._weight(64, gen), exhaustive=True)


def test_wmse_zero_weights_and_shapes_exact():
    """Zero weight on the largest element, one non-zero column, all zero; per-head
    [H, D] weights for x [T, H, D] as the plugin passes them, [H, 1], full, scalar."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 32, generator=gen)
    g = nvfp4.global_scale(x.abs().max())
    w = torch.ones(32)
    w[x[0].abs().argmax()] = 0.0
    check_cpu(x, g, "wmse", w)
    one = torch.zeros(32)
    one[3] = 1.0
    check_cpu(x, g, "wmse", one)  # windows of ~120 codes
    check_cpu(x, g, "wmse", torch.zeros(32))
    xh = torch.randn(5, 9, 64, generator=gen).to(torch.bfloat16)
    gh = nvfp4.global_scale(xh.float().abs().max())
    for wh in (
        torch.rand(9, 64, generator=gen),
        torch.rand(1, 9, 64, generator=gen),
        torch.rand(9, 1, generator=gen),
        torch.rand(5, 9, 64, generator=gen),
        torch.rand(5, 1, 64, generator=gen),  # leading-dim broadcast: reference path
        torch.tensor(2.0),
    ):
        check_cpu(xh, gh, "wmse", wh)


def test_layouts_exact():
    """Leading dims, a row stride that is not K, a transposed (column-strided) input."""
    gen = torch.Generator().manual_seed(5)
    big = torch.randn(6, 96, generator=gen).to(torch.bfloat16)
    g = nvfp4.global_scale(big.float().abs().max())
    check_cpu(big[:, :64], g, "mse")
    check_cpu(big.view(2, 3, 96), g, "wmse", torch.rand(96, generator=gen))
    t = torch.randn(64, 6, generator=gen).t()
    check_cpu(t[:, :48].contiguous().t().t(), g, "absmax")
    check_cpu(torch.randn(32, 48, generator=gen).t(), g, "mse")


@pytest.mark.parametrize("dist", ["gauss", "laplace", "t3", "outliers"])
def test_many_blocks_exact(dist):
    """32k blocks per distribution, both global-scale conventions, MSE and WMSE."""
    gen = torch.Generator().manual_seed({"gauss": 1, "laplace": 2, "t3": 3, "outliers": 4}[dist])
    x = torch.randn(128, 4096, generator=gen)
    if dist == "laplace":
        x = x.sign() * torch.empty_like(x).exponential_(generator=gen)
    elif dist == "t3":
        x = x / (torch.randn(128, 4096, 3, generator=gen).square().mean(-1).sqrt())
    elif dist == "outliers":
        x[torch.rand(128, 4096, generator=gen) < 0.01] *= 100.0
    x = x.to(torch.bfloat16)
    amax = x.float().abs().max()
    w = torch.randn(4096, generator=gen).exp()
    for conv in ("paper", "compressed-tensors"):
        g = nvfp4.global_scale(amax, conv)
        for method, wt in (("mse", None), ("wmse", w)):
            s = dispatch.quantize(x, g, method, wt, backend="cpu")[1]
            assert torch.equal(s.view(torch.uint8), sweep.sweep_scales(x, g, wt).view(torch.uint8))


def test_threads_do_not_change_results():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(256, 1536, generator=gen).to(torch.bfloat16)
    g = nvfp4.global_scale(x.float().abs().max())
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dispatch.fake_quantize(x, g, "mse", backend="cpu")
        torch.set_num_threads(max(n, 2))
        two = dispatch.fake_quantize(x, g, "mse", backend="cpu")
    finally:
        torch.set_num_threads(n)
    assert torch.equal(_bits(one), _bits(two))


def test_dequantize_any_scale_byte():
    """Every scale byte (negative, NaN included) decodes as the reference decodes it."""
    gen = torch.Generator().manual_seed(13)
    packed = torch.randint(0, 256, (256, 8), generator=gen, dtype=torch.uint8)
    scales = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    scales = scales.reshape(256, 1)
    for dtype in DTYPES:
        got = dispatch.dequantize(packed, scales, 3.0, dtype, backend="cpu")
        ref = dispatch.dequantize(packed, scales, 3.0, dtype, backend="torch")
        assert torch.equal(got.isnan(), ref.isnan())
        assert torch.equal(_bits(got)[~got.isnan()], _bits(ref)[~ref.isnan()])


# -- what the reference rejects -----------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rejected(bad):
    x = torch.randn(4, 32)
    x[2, 7] = bad
    for method, w in (("absmax", None), ("mse", None), ("wmse", torch.ones(32))):
        with pytest.raises(ValueError, match="NaN or Inf"):
            dispatch.fake_quantize(x, 100.0, method, w, backend="cpu")
        with pytest.raises(ValueError, match="NaN or Inf"):
            dispatch.quantize(x.to(torch.bfloat16), 100.0, method, w, backend="cpu")


def test_domain_rejected_with_the_reference_messages():
    x = torch.randn(2, 32)
    for g, match in ((1.4e-45, "below"), (2.0**116, "exceeds"), (float("nan"), "finite")):
        with pytest.raises(ValueError, match=match):
            dispatch.quantize(x, g, "mse", backend="cpu")
    with pytest.raises(ValueError, match="2\\^50"):
        dispatch.fake_quantize(x / x.abs().max() * 2.0**40, 2.0**11, "mse", backend="cpu")
    with pytest.raises(ValueError, match="must be >= 0"):
        dispatch.fake_quantize(x, 100.0, "wmse", -torch.ones(32), backend="cpu")
    with pytest.raises(ValueError, match="multiple of 16"):
        dispatch.fake_quantize(torch.randn(2, 24), 100.0, "mse", backend="cpu")


# -- the fallback -------------------------------------------------------------------------


def test_fallback_when_the_extension_cannot_build(monkeypatch):
    """A failed build: one warning, the reference's results, backend='cpu' refused."""
    monkeypatch.setattr(cpu_backend, "_MODULE", None)
    monkeypatch.setattr(cpu_backend, "_FAILED", None)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: g++: command not found")

    monkeypatch.setattr(cpu_backend, "build", no_compiler)
    x = torch.randn(8, 64).to(torch.bfloat16)
    g = nvfp4.global_scale(x.float().abs().max())
    with pytest.warns(RuntimeWarning, match="C\\+\\+ CPU backend is unavailable.*g\\+\\+"):
        y = dispatch.fake_quantize(x, g, "mse")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        y2 = dispatch.fake_quantize(x, g, "mse")
    ref = sweep.quantize_dequantize(x, g, sweep.sweep_scales(x, g)).to(x.dtype)
    assert torch.equal(_bits(y), _bits(ref)) and torch.equal(_bits(y2), _bits(ref))
    with pytest.raises(RuntimeError, match="g\\+\\+: command not found"):
        dispatch.fake_quantize(x, g, "mse", backend="cpu")


def test_disabled_by_environment_in_a_fresh_process():
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('error')\n"
        "from scalesweep_vllm.kernels import cpu_backend, dispatch\n"
        "x = torch.randn(4, 32)\n"
        "try:\n"
        "    dispatch.fake_quantize(x, 10.0, 'mse')\n"
        "except RuntimeWarning as w:\n"
        "    print('WARNED', w)\n"
        "print('AVAILABLE', cpu_backend.available(), cpu_backend.why())\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT, SCALESWEEP_CPU_BACKEND="0")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "AVAILABLE False SCALESWEEP_CPU_BACKEND=0" in res.stdout
    assert "WARNED" not in res.stdout  # turned off on purpose: no warning


def test_auto_uses_the_extension_on_cpu(monkeypatch):
    calls = []
    real = cpu_backend.fake_quantize
    monkeypatch.setattr(cpu_backend, "fake_quantize", lambda *a: calls.append(1) or real(*a))
    dispatch.fake_quantize(torch.randn(2, 32), 10.0, "mse")
    dispatch.fake_quantize(torch.randn(2, 32), 10.0, "mse", backend="torch")
    assert calls == [1]


def test_cached_weights_and_scales_follow_in_place_changes():
    """The per-tensor caches of prepared weights and global scales never serve stale values."""
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(4, 3, 64, generator=gen).to(torch.bfloat16)
    w = torch.rand(3, 64, generator=gen)
    g = torch.tensor([50.0])
    for _ in range(2):
        check_cpu(x, g, "wmse", w)
        w.mul_(0.0)
        w[1, 5] = 1.0  # in place: same tensor, new values
        g.mul_(4.0)
    check_cpu(x, g, "wmse", w.clone())  # a new tensor with the same values


# -- four-over-six, the evaluation's peer baseline ---------------------------------------


def _check_four_over_six(x, g):
    """Scale codes and fake-quantized bits of the C++ four-over-six against
    ``sweep.four_over_six_scales`` and ``sweep.quantize_dequantize``."""
    got = cpu_backend.quantize(x, g, "four_over_six", None)
    assert got is not None, "the C++ backend declined a valid input"
    want = sweep.four_over_six_scales(x, g)
    assert torch.equal(got[1].view(torch.uint8), want.view(torch.uint8)), "scale codes differ"
    y = cpu_backend.fake_quantize(x, g, "four_over_six", None)
    y_ref = sweep.quantize_dequantize(x, g, want).to(x.dtype)
    assert torch.equal(_bits(y), _bits(y_ref)), "fake-quantized values differ"
    return want


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_four_over_six_exact(dtype, tk):
    """Random rows, the adversarial set (ties, zeros, constants, tiny blocks), the top
    of the FP8 range (amax/4 saturates: both codes 126) and the domain's edges."""
    gen = torch.Generator().manual_seed(21)
    for m in (1, 3, 17, 300):
        x = tk.random_case("mse", m, dtype)[0]
        for conv in ("paper", "compressed-tensors"):
            _check_four_over_six(x, nvfp4.global_scale(x.float().abs().max(), conv))
    adv = tk._adversarial_rows().to(dtype)
    for g in (torch.tensor([1.0]), nvfp4.global_scale(adv.float().abs().max())):
        _check_four_over_six(adv, g)
    top = tk.top_of_range_rows(gen)
    if dtype != torch.float16:  # 448 * 6 * 1.01 overflows float16
        _check_four_over_six(top.to(dtype), torch.tensor([1.0]))
    unit = torch.randn(4, 64, generator=gen)
    unit = (unit / unit.abs().max()).to(dtype)
    _check_four_over_six(unit * 2.0**-20, torch.tensor([2.0**30]))
    _check_four_over_six(unit, torch.tensor([nvfp4.GLOBAL_SCALE_MIN]))


def test_four_over_six_chooses_both_and_ties_low():
    """The data picks each of the two scales somewhere, and a block whose two errors tie
    (all zero: both codes reconstruct it exactly) takes the smaller code."""
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(64, 256, generator=gen)
    g = nvfp4.global_scale(x.abs().max())
    s = _check_four_over_six(x, g).view(torch.uint8).long()
    a = sweep._blocks(x).amax(-1).reshape(s.shape)
    c6 = nvfp4.fp8_rne_code(((a / 6) * g).clamp(max=448)).clamp(min=1)
    c4 = nvfp4.fp8_rne_code(((a / 4) * g).clamp(max=448)).clamp(min=1)
    assert bool((s == c6).any()) and bool((s == c4).any()) and bool(((s == c6) | (s == c4)).all())
    z = torch.zeros(2, 32)
    assert int(_check_four_over_six(z, torch.tensor([1.0])).view(torch.uint8).max()) == 1


def test_four_over_six_rejections_go_to_the_reference():
    """NaN and a global scale out of range: the backend declines, the reference raises."""
    from scalesweep_vllm.runtime import Part

    bad = torch.randn(2, 32)
    bad[1, 5] = float("nan")
    assert cpu_backend.fake_quantize(bad, 1.0, "four_over_six", None) is None
    with pytest.raises(ValueError):
        Part("four_over_six", 1.0)(bad)
    x = torch.randn(2, 32)
    assert cpu_backend.fake_quantize(x, 2.0**120, "four_over_six", None) is None
    with pytest.raises(ValueError):
        Part("four_over_six", 2.0**120)(x)


def test_runtime_four_over_six_uses_the_backend(monkeypatch):
    """runtime.Part('four_over_six') on a CPU tensor: the C++ result, equal to the
    reference bit for bit; with the backend off, the reference itself."""
    from scalesweep_vllm import runtime

    gen = torch.Generator().manual_seed(23)
    x = torch.randn(3, 5, 64, generator=gen).to(torch.bfloat16)
    g = nvfp4.global_scale(x.float().abs().max())
    calls = []
    real = cpu_backend.fake_quantize
    monkeypatch.setattr(cpu_backend, "fake_quantize", lambda *a: calls.append(a[2]) or real(*a))
    y = runtime.Part("four_over_six", g)(x)
    assert calls == ["four_over_six"]
    ref = sweep.quantize_dequantize(x, g, sweep.four_over_six_scales(x, g)).to(x.dtype)
    assert torch.equal(_bits(y), _bits(ref))
    monkeypatch.setattr(cpu_backend, "available", lambda: False)
    assert torch.equal(_bits(runtime.Part("four_over_six", g)(x)), _bits(ref))
    assert calls == ["four_over_six"]
