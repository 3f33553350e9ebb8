"""Triton kernels vs the reference (sweep.py), bit for bit, in Triton's interpreter on CPU.

Codes, scales and fake-quantized values must be identical (atol=0): the kernels
follow the reference's fp32 arithmetic op for op. The interpreter runs on CPU
tensors when TRITON_INTERPRET=1; the launcher loads a private interpreted copy of
the kernels, so other test modules that import Triton normally are unaffected.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from scalesweep_vllm import nvfp4, sweep  # noqa: E402
from scalesweep_vllm.kernels import dispatch, launch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The interpreter runs the kernels in numpy, which warns on the inf/NaN candidate errors
# that the kernels (like the reference) produce and then never select.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _ref_scales(x, g, method, w, exhaustive=False):
    if method == "absmax":
        return sweep.absmax_scales(x, g)
    return sweep.sweep_scales(x, g, w if method == "wmse" else None, exhaustive=exhaustive)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern, so -0.0 != 0.0 and every mantissa bit counts."""
    width = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    return t.view(width[t.dtype])


def check_exact(x, g, method, w=None, fake=True, backend="triton", exhaustive=False):
    """Packed codes, scales (and fake-quant values) of ``backend`` (the Triton kernels;
    tests/test_kernels_cpu.py passes "cpu") == reference, bit for bit; ``exhaustive``:
    against the exhaustive sweep."""
    scales_ref = _ref_scales(x, g, method, w, exhaustive)
    packed_ref = nvfp4.pack_fp4(sweep.quantize_codes(x, g, scales_ref))
    packed, scales = dispatch.quantize(x, g, method, w, backend=backend)
    assert scales.dtype == torch.float8_e4m3fn and packed.dtype == torch.uint8
    assert scales.shape == scales_ref.shape and packed.shape == packed_ref.shape
    s, s_ref = scales.view(torch.uint8), scales_ref.view(torch.uint8)
    if not torch.equal(s, s_ref):
        bad = (s != s_ref).nonzero()[:5].tolist()
        raise AssertionError(
            f"{method}: scale codes differ at {bad}: {s[s != s_ref][:5]} vs {s_ref[s != s_ref][:5]}"
        )
    assert torch.equal(packed, packed_ref), f"{method}: packed codes differ"
    if fake:
        y = dispatch.fake_quantize(x, g, method, w, backend=backend)
        y_ref = sweep.quantize_dequantize(x, g, scales_ref).to(x.dtype)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert torch.equal(_bits(y), _bits(y_ref)), f"{method}: fake-quant values differ"
    return packed, scales


def _weight(k, gen, zeros=True):
    w = torch.rand(k, generator=gen) * 4
    if zeros:
        w[torch.randperm(k, generator=gen)[: k // 4]] = 0.0
    return w


# ---------------------------------------------------------------------------
# Random inputs: every method, dtype, odd M
# ---------------------------------------------------------------------------


def _run_clean(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter without TRITON_INTERPRET; it must succeed."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("method", ["absmax", "mse", "wmse"])
def test_random_exact(method, m, dtype):
    check_exact(*random_case(method, m, dtype))


def random_case(method, m, dtype):
    """(x [m, 64], G, weight or None): rows of random scale, 1/4 zero weights."""
    gen = torch.Generator().manual_seed(1000 * m + len(str(dtype)))
    x = (torch.randn(m, 64, generator=gen) * torch.rand(m, 1, generator=gen) * 10).to(dtype)
    g = nvfp4.global_scale(x.float().abs().max())
    return x, g, method, _weight(64, gen) if method == "wmse" else None


@pytest.fixture
def table(monkeypatch, request):
    """Sweep launches reading G / v and v^2 from the table kernel (True) or dividing."""
    monkeypatch.setattr(launch, "TABLE_MIN_BLOCKS", 0 if request.param else 1 << 62)
    return request.param


@pytest.mark.parametrize("table", [True], indirect=True, ids=["table"])
@pytest.mark.parametrize("dist", ["gauss", "laplace", "uniform", "outliers"])
def test_many_blocks_exact(dist, table):
    """512 blocks per distribution, both global-scale conventions (MSE and WMSE)."""
    seed = {"gauss": 1, "laplace": 2, "uniform": 3, "outliers": 4}[dist]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # Laplace samples from the global generator
    x = torch.randn(32, 256, generator=gen)
    if dist == "laplace":
        x = torch.distributions.Laplace(0.0, 1.0).sample((32, 256))
    elif dist == "uniform":
        x = torch.rand(32, 256, generator=gen) * 2 - 1
    elif dist == "outliers":
        x[torch.rand(32, 256, generator=gen) < 0.01] *= 100.0
    x = x.to(torch.bfloat16)
    amax = x.float().abs().max()
    check_exact(x, nvfp4.global_scale(amax, "paper"), "mse", fake=False)
    check_exact(x, nvfp4.global_scale(amax, "compressed-tensors"), "mse", fake=False)
    w = torch.randn(256, generator=gen).exp()
    check_exact(x, nvfp4.global_scale(amax), "wmse", w, fake=False)


# ---------------------------------------------------------------------------
# Adversarial blocks
# ---------------------------------------------------------------------------


def _adversarial_rows() -> torch.Tensor:
    """Rows of 4 blocks (K = 64) with ties, zeros, constants, one-hots, tiny blocks."""
    fp8 = nvfp4.fp8_values()
    rows = []
    zero = torch.zeros(16)
    negzero = torch.full((16,), -0.0)
    # E2M1 midpoints for the AbsMax scale: amax = 6v makes c0 exact, r = x/v hits ties.
    mids = torch.tensor(
        [
            0.25,
            0.75,
            1.25,
            1.75,
            2.5,
            3.5,
            5.0,
            6.0,
            -0.25,
            -0.75,
            -1.25,
            -1.75,
            -2.5,
            -3.5,
            -5.0,
            0.0,
        ]
    )
    for code in (9, 40, 64, 100):
        v = fp8[code]
        rows.append(torch.cat([mids * v, -mids * v, mids.flip(0) * v, zero]))
    rows.append(torch.cat([zero, negzero, torch.full((16,), 1.0), torch.full((16,), -3.7)]))
    one_hot = torch.zeros(16)
    one_hot[5] = -2.0
    tiny = torch.randn(16) * 1e-3  # subnormal-range FP8 scales next to a big block
    rows.append(torch.cat([one_hot, tiny, tiny * 1e-2, torch.randn(16) * 300]))
    small = torch.linspace(-1, 1, 16) * 1e-4
    rows.append(torch.cat([small, small * 0.3, torch.full((16,), 2.0**-20), torch.randn(16)]))
    return torch.stack(rows)


@pytest.mark.parametrize("table", [True, False], indirect=True, ids=["table", "divide"])
@pytest.mark.parametrize("method", ["absmax", "mse", "wmse"])
def test_adversarial_exact(method, table):
    x = _adversarial_rows()
    gen = torch.Generator().manual_seed(7)
    w = _weight(64, gen) if method == "wmse" else None
    for g in (torch.tensor([1.0]), nvfp4.global_scale(x.abs().max())):
        check_exact(x, g, method, w)
    # bf16 / fp16 versions of the same blocks
    for dtype in (torch.bfloat16, torch.float16):
        xd = x.to(dtype)
        check_exact(xd, nvfp4.global_scale(xd.float().abs().max()), method, w)


@pytest.mark.parametrize("table", [True, False], indirect=True, ids=["table", "divide"])
@pytest.mark.parametrize("method", ["mse", "wmse"])
def test_huge_values_exact(method, table):
    """Values near the fp32 and bf16 ranges' ends (tiny global scale) and tiny tensors
    (huge global scale, subnormal block scales)."""
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(4, 64, generator=gen)
    w = _weight(64, gen) if method == "wmse" else None
    for scale, dtype in (
        (3.0e38, torch.float32),
        (3.0e38, torch.bfloat16),
        (6.0e4, torch.float16),
        (1e-30, torch.float32),
    ):
        x = (base / base.abs().max() * scale).to(dtype)
        g = nvfp4.global_scale(x.float().abs().max())
        check_exact(x, g, method, w)
    # huge global scale, tiny tensor: FP8 subnormal block scales, some elements flushed
    x = base * 2.0**-106
    check_exact(x, torch.tensor([2.0**100]), method, w)


@pytest.mark.parametrize("method", ["mse", "wmse"])
def test_domain_edges_exact(method):
    """The edges of the accepted domain (sweep module docstring), accepted and exact:
    G = 2^-117 and 2^115, max|x| * G = 2^50, a block whose squared error underflowed
    (exact on one grid plus 2^-69.5), WMSE weights at extreme scales (normalised per
    block by a power of two, subnormals included)."""
    gen = torch.Generator().manual_seed(23)
    base = torch.randn(4, 64, generator=gen)
    base = base / base.abs().max()
    w = _weight(64, gen) if method == "wmse" else None
    check_exact(base * 2.0**120, torch.tensor([nvfp4.GLOBAL_SCALE_MIN]), method, w, fake=False)
    check_exact(base * 2.0**-110, torch.tensor([nvfp4.GLOBAL_SCALE_MAX]), method, w, fake=False)
    check_exact(base * 2.0**50, torch.tensor([1.0]), method, w, fake=False)
    tiny = torch.tensor([[64.0, 128.0, 192.0, 64.0] * 3 + [128.0, 192.0, 64.0, 2.0**-69.5]])
    check_exact(tiny, torch.tensor([1.0]), method, None if w is None else w[:16])
    if method == "wmse":
        w8 = torch.randint(0, 81, (64,), generator=gen) / 8.0
        ref = dispatch.quantize(base, 1536.0, "wmse", w8, backend="triton")[1].view(torch.uint8)
        for scale in (2.0**-140, 2.0**120, 1e-44, 1e36):
            _, s = check_exact(base, torch.tensor([1536.0]), "wmse", w8 * scale, fake=False)
            if math.log2(scale).is_integer():
                assert torch.equal(s.view(torch.uint8), ref)


def test_global_scale_rejected_on_host():
    """A host-side global scale outside [2^-117, 2^115] (or not finite) is refused by the
    launcher, with the reference's messages; decoding takes any scale."""
    x = torch.randn(2, 32)
    for g, match in ((1.4e-45, "below"), (2.0**-118, "below"), (2.0**116, "exceeds")):
        for method in ("absmax", "mse"):
            with pytest.raises(ValueError, match=match):
                dispatch.quantize(x, g, method, backend="triton")
            with pytest.raises(ValueError, match=match):
                dispatch.quantize(x, torch.tensor([g]), method, backend="torch")
    with pytest.raises(ValueError, match="finite"):
        dispatch.fake_quantize(x, float("nan"), backend="triton")
    p, s = dispatch.quantize(x, 1.0, backend="torch")
    dispatch.dequantize(p, s, 2.0**-120, torch.float32, backend="triton")


#: tests/test_sweep.py::C0_126_BLOCK: AbsMax code 126, exact MSE optimum 122 (< c0 - 3).
C0_126_BLOCK = [
    2592.79233652, 1981.95424996, 1215.56451101, 1973.07044441, 1952.22350199,
    1993.10240380, 2010.68039110, 1940.72532769, 1952.64533899, 1998.15244066,
    2092.44321121, 1959.44022403, 1970.37141566, 1919.82471967, 1945.70484924,
    1998.76496524,
]  # fmt: skip


def top_of_range_rows(gen: torch.Generator) -> torch.Tensor:
    """Rows of 64: 32 blocks at each AbsMax code 120..126 (largest element anywhere in
    its rounding interval, the other fifteen at 0.6-0.9 of it) and 32 copies of the
    c0 = 126 counterexample to the old c0 - 3 floor (its optimum is 122)."""
    fp8 = nvfp4.fp8_values()
    rows = []
    for c0 in range(120, 127):
        v = fp8[c0]
        lo = (fp8[c0 - 1] + v) / 2
        hi = (fp8[c0 + 1] + v) / 2 if c0 < 126 else 448 * 1.01
        m = 6 * (lo + (hi - lo) * torch.rand(32, 1, generator=gen))
        rest = (
            m
            * (0.6 + 0.3 * torch.rand(32, 1, generator=gen))
            * (1 + 0.1 * (torch.rand(32, 15, generator=gen) - 0.5))
        )
        rows.append(torch.cat([rest[:, :7], m, rest[:, 7:]], 1))
    rows.append(torch.tensor([C0_126_BLOCK] * 32))
    return torch.cat(rows).reshape(-1, 64)


@pytest.mark.parametrize("table", [True, False], indirect=True, ids=["table", "divide"])
def test_top_of_range_exact(table):
    """Unsaturated blocks at AbsMax codes 120..126 (others clustered at 0.6-0.9 of the
    maximum; tests/test_sweep.py::top_of_range_blocks), and the c0 = 126 block whose
    optimum lies below c0 - 3 (found by the MSE sweep's second stage)."""
    gen = torch.Generator().manual_seed(41)
    x = top_of_range_rows(gen)
    g = torch.tensor([1.0])
    _, scales = check_exact(x, g, "mse")
    assert int(scales.view(torch.uint8).flatten()[-1]) == 122
    check_exact(x, g, "wmse", _weight(64, gen), fake=False)


def test_wmse_zero_weights_exact():
    """Weight zero on the largest element, everywhere but one column, and all zero."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 32, generator=gen)
    g = nvfp4.global_scale(x.abs().max())
    w = torch.ones(32)
    w[x[0].abs().argmax()] = 0.0
    check_exact(x, g, "wmse", w)
    w = torch.zeros(32)
    w[3] = 1.0
    check_exact(x, g, "wmse", w, fake=False)  # windows of ~120 codes: slow in the interpreter
    check_exact(x[:2], g, "wmse", torch.zeros(32), fake=False)
    check_exact(x, g, "wmse", torch.ones(1, 32))  # [1, K] is a per-column vector too


def test_wmse_weight_shapes_exact():
    """Per-head weights [H, D] for x [T, H, D] (Q/K/V), [H, 1], full and scalar weights."""
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(3, 4, 32, generator=gen).to(torch.bfloat16)
    g = nvfp4.global_scale(x.float().abs().max())
    for w in (
        torch.rand(4, 32, generator=gen),
        torch.rand(1, 4, 32, generator=gen),
        torch.rand(4, 1, generator=gen),
        torch.rand(3, 4, 32, generator=gen),
        torch.tensor(2.0),
    ):
        check_exact(x, g, "wmse", w, fake=w.dim() == 2)
    # exact-representable block (E_ref = 0) with zero weights
    xe = torch.tensor([[0.5, 1.0, -6.0, 3.0] * 4 + [0.0] * 16])
    check_exact(xe, torch.tensor([1.0]), "wmse", torch.tensor([0.0, 1.0] * 16))


# ---------------------------------------------------------------------------
# Layouts: leading dims, non-contiguous rows, strided columns
# ---------------------------------------------------------------------------


def test_layouts_exact():
    gen = torch.Generator().manual_seed(5)
    big = torch.randn(6, 96, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    g = nvfp4.global_scale(big.float().abs().max())
    check_exact(big[:, :64], g, "mse")  # row stride 96 != K: strided path
    check_exact(big[:, 16:80], g, "wmse", torch.rand(64, generator=gen))
    check_exact(big.t().contiguous().t()[:, :32], g, "mse")  # column stride != 1
    check_exact(big.reshape(2, 3, 96), g, "absmax")  # leading dims
    check_exact(torch.randn(2, 3, 32, generator=gen).permute(1, 0, 2), g, "mse")
    p, s = dispatch.quantize(torch.empty(0, 32), g, "mse", backend="triton")
    assert p.shape == (0, 16) and s.shape == (0, 2)


# ---------------------------------------------------------------------------
# Dequantize, FP8 helpers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_exact(dtype):
    gen = torch.Generator().manual_seed(9)
    packed = torch.randint(0, 256, (5, 32), generator=gen, dtype=torch.uint8)
    codes = torch.randint(0, 256, (5, 4), generator=gen, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x42  # NaN codes checked separately
    scales = codes.view(torch.float8_e4m3fn)
    for g in (nvfp4.global_scale(3.7), torch.tensor([1.0]), torch.tensor([1e-20])):
        y = dispatch.dequantize(packed, scales, g, dtype, backend="triton")
        y_ref = dispatch.dequantize(packed, scales, g, dtype, backend="torch")
        assert y.dtype == dtype and y.shape == (5, 64)
        assert torch.equal(_bits(y), _bits(y_ref))
    nan_scales = torch.full((1, 2), 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn)
    y = dispatch.dequantize(
        torch.full((1, 16), 0x21, dtype=torch.uint8),
        nan_scales,
        1.0,
        torch.float32,
        backend="triton",
    )
    assert torch.isnan(y).all()


def test_roundtrip_dequantize_equals_fake_quant():
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(3, 4, 48, generator=gen).to(torch.bfloat16)
    g = nvfp4.global_scale(x.float().abs().max())
    p, s = dispatch.quantize(x, g, "mse", backend="triton")
    y = dispatch.dequantize(p, s, g, torch.bfloat16, backend="triton")
    assert torch.equal(_bits(y), _bits(dispatch.fake_quantize(x, g, "mse", backend="triton")))


def test_fp8_helpers_match_torch():
    """The kernels' integer FP8 rounding == torch's float8_e4m3fn conversion (RNE) and
    nvfp4.fp8_ceil_code, on every code, every midpoint and its neighbours."""
    v = nvfp4.fp8_values()[1:]
    mid = (v[1:] + v[:-1]) / 2
    pts = torch.cat(
        [torch.zeros(1), v, mid, torch.tensor([2.0**-10, 1e-30, 447.9, 448.0, 460.0, 464.0, 1e6])]
    )
    t = torch.cat(
        [
            pts,
            torch.nextafter(pts, torch.tensor(0.0)),
            torch.nextafter(pts, torch.tensor(1e9)),
            torch.rand(4000) * 500,
            torch.rand(1000) * 2.0**-6,
        ]
    ).abs()
    rne, ceil, val = launch.fp8_codes(t)
    torch_codes = t.clamp(0, 448).to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
    assert torch.equal(rne, torch_codes)
    assert torch.equal(rne, nvfp4.fp8_rne_code(t))
    assert torch.equal(ceil, nvfp4.fp8_ceil_code(t))
    assert torch.equal(_bits(val), _bits(nvfp4.fp8_code_to_value(rne)))


# ---------------------------------------------------------------------------
# Errors, dispatch, custom ops
# ---------------------------------------------------------------------------


def test_bad_inputs():
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        dispatch.quantize(torch.randn(2, 24), 1.0, backend="triton")
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        dispatch.quantize(x.double(), 1.0, backend="triton")
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        dispatch.quantize(torch.ones(2, 32, dtype=torch.int32), 1.0, backend="triton")
    with pytest.raises(ValueError, match="needs a weight"):
        dispatch.quantize(x, 1.0, "wmse", backend="triton")
    with pytest.raises(ValueError, match="does not broadcast"):
        dispatch.quantize(x, 1.0, "wmse", torch.ones(16), backend="triton")
    with pytest.raises(ValueError, match="does not broadcast"):
        dispatch.quantize(x, 1.0, "wmse", torch.ones(3, 32), backend="triton")
    with pytest.raises(ValueError, match="does not broadcast"):
        dispatch.quantize(x, 1.0, "wmse", torch.ones(2, 2, 32), backend="triton")
    with pytest.raises(ValueError, match="takes no weight"):
        dispatch.quantize(x, 1.0, "mse", torch.ones(32), backend="triton")
    with pytest.raises(ValueError, match="one number"):
        dispatch.quantize(x, torch.ones(2), backend="triton")
    with pytest.raises(ValueError, match="unknown method"):
        dispatch.quantize(x, 1.0, "max", backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        dispatch.quantize(x, 1.0, backend="cuda")
    p, s = dispatch.quantize(x, 1.0, backend="torch")
    with pytest.raises(ValueError, match="do not match"):
        dispatch.dequantize(p, s[:, :1], 1.0, backend="triton")
    with pytest.raises(TypeError, match="dtype"):
        dispatch.dequantize(p, s, 1.0, torch.float64, backend="triton")


def test_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    x = torch.randn(1, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.quantize(x, 1.0, backend="triton")
    # auto on CPU is the torch reference and needs no interpreter
    packed, scales = dispatch.quantize(x, 1.0, backend="auto")
    assert torch.equal(scales.view(torch.uint8), sweep.sweep_scales(x, 1.0).view(torch.uint8))


def test_missing_triton_message(monkeypatch):
    monkeypatch.setattr(launch, "have_triton", lambda: False)
    monkeypatch.setattr(launch, "_MODULES", {})
    with pytest.raises(RuntimeError, match="need triton"):
        dispatch.quantize(torch.randn(1, 16), 1.0, backend="triton")


def test_imports_without_triton():
    """The package and the torch path work when triton cannot be imported."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from scalesweep_vllm.kernels import dispatch, launch\n"
        "assert not launch.have_triton()\n"
        "p, s = dispatch.quantize(torch.randn(2, 32), 1.0)\n"
        "try:\n"
        "    dispatch.quantize(torch.randn(2, 32), 1.0, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'need triton' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    _run_clean(code)


def test_custom_op_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 5, 64, dtype=torch.bfloat16)
        g = torch.empty(1)
        p, s = torch.ops.scalesweep.nvfp4_quantize(x, g, "mse", None)
        y = torch.ops.scalesweep.nvfp4_fake_quantize(x, g, "wmse", torch.empty(64))
        d = torch.ops.scalesweep.nvfp4_dequantize(p, s, g, torch.float16)
    assert p.shape == (3, 5, 32) and p.dtype == torch.uint8
    assert s.shape == (3, 5, 4) and s.dtype == torch.float8_e4m3fn
    assert y.shape == x.shape and y.dtype == x.dtype
    assert d.shape == (3, 5, 64) and d.dtype == torch.float16


def test_blackwell_path_compiles():
    """The sm_100 build (hardware cvt.rn.satfinite.e2m1x2.f32) and the sm_90 build compile
    on this CPU-only machine, to cubins, with no shared memory in the candidate loop."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not any(os.path.exists(os.path.join(ptxas, n)) for n in ("ptxas", "ptxas-blackwell")):
        pytest.skip("triton's bundled ptxas is missing: cannot build cubins here")
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r})\n"
        "import ptx_report\n"
        "rows = [ptx_report.report(100, 'mse', True), ptx_report.report(90, 'mse', False)]\n"
        "print(json.dumps(rows))\n"
    )
    res = _run_clean(code)
    import json

    bw, hopper = json.loads(res.stdout.strip().splitlines()[-1])
    assert bw["has_cvt_e2m1x2"] and bw["cubin_bytes"] > 0
    assert not hopper["has_cvt_e2m1x2"] and hopper["cubin_bytes"] > 0
    assert bw["shared_memory_in_loop"] == 0 and hopper["shared_memory_in_loop"] == 0
    assert 0 < bw["ptx_per_element_candidate"] < hopper["ptx_per_element_candidate"]
