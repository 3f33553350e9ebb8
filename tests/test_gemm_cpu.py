"""The packed NVFP4 GEMMs (kernels/cpu/nvfp4_gemm.cpp through kernels/cpu_gemm.py)
against their specification (scalesweep_vllm/gemm_reference.py), bit for bit, on every
instruction-set build this CPU runs: every E2M1 code and every non-NaN fp8 scale byte
(negative and subnormal ones included), M = 1 and odd N, the register (M <= 4) and
scratch (M > 4) paths, non-contiguous and bf16 inputs, zeros, subnormals, huge and
non-finite values; the result does not depend on the batch or the thread count."""

from __future__ import annotations

import pytest
import torch
from test_kernels_cpu import isa_build  # noqa: F401 - autouse: every ISA build

from scalesweep_vllm import gemm_reference as ref
from scalesweep_vllm import kernels, nvfp4
from scalesweep_vllm.kernels import cpu_gemm

SHAPES = [(1, 1, 16), (1, 37, 64), (2, 16, 32), (3, 33, 48), (4, 17, 80), (5, 40, 16),
          (9, 31, 96), (17, 48, 256)]  # fmt: skip


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (so -0.0 != 0.0) where finite or infinite; NaN where NaN."""
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    return torch.equal(a.view(torch.int32)[~nan], b.view(torch.int32)[~nan])


def weight(n: int, k: int, seed: int):
    """Random packed bytes (all 16 codes) and scale bytes from every non-NaN fp8 code."""
    gen = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]
    pick = torch.randint(0, codes.numel(), (n, k // 16), generator=gen)
    return packed, codes[pick].view(torch.float8_e4m3fn)


def g_rows(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.exp2(torch.randint(-20, 20, (n,), generator=gen).float()) * (
        1 + torch.rand(n, generator=gen)
    )


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_w4a16_equals_the_reference(m, n, k):
    packed, scales = weight(n, k, seed=m * 1000 + n)
    g = g_rows(n, seed=k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n)) * 3
    got = cpu_gemm.w4a16(x, cpu_gemm.pack(packed, scales, g))
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert same(got, ref.w4a16(x, packed, scales, g))


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_w4a4_equals_the_reference(m, n, k):
    packed, scales = weight(n, k, seed=m * 1000 + n + 1)
    xpacked, xscales = weight(m, k, seed=m * 1000 + n + 2)
    alpha = 1.0 / (g_rows(n, seed=k + 1) * 300.0)
    got = cpu_gemm.w4a4(xpacked, xscales, cpu_gemm.pack(packed, scales, alpha, "w4a4"))
    assert same(got, ref.w4a4(xpacked, xscales, packed, scales, alpha))


def test_w4a16_adversarial_inputs():
    """Zeros, -0, subnormals, values whose products overflow, Inf and NaN in x; the
    extreme global scales of the accepted range."""
    n, k = 19, 64
    packed, scales = weight(n, k, seed=5)
    for g in (torch.full((n,), nvfp4.GLOBAL_SCALE_MIN), torch.full((n,), nvfp4.GLOBAL_SCALE_MAX),
              g_rows(n, 6)):  # fmt: skip
        x = torch.randn(7, k, generator=torch.Generator().manual_seed(7))
        x[0] = 0.0
        x[1] = -0.0
        x[2] = 1e-40  # subnormal
        x[3] = 3e38
        x[4, 5] = float("inf")
        x[5, 9] = float("nan")
        x[6, ::3] = -float("inf")
        got = cpu_gemm.w4a16(x, cpu_gemm.pack(packed, scales, g))
        want = ref.w4a16(x, packed, scales, g)
        assert same(got, want)
        assert got.isnan().any() and got.isinf().any()  # the cases reached those values


def test_batch_and_thread_invariance():
    """Each row's result is the same alone, in any batch (register or scratch path) and
    on one thread or two: the summation order is fixed."""
    n, k = 45, 128
    packed, scales = weight(n, k, seed=8)
    pw = cpu_gemm.pack(packed, scales, g_rows(n, 9))
    x = torch.randn(13, k, generator=torch.Generator().manual_seed(10))
    full = cpu_gemm.w4a16(x, pw)
    rows = torch.cat([cpu_gemm.w4a16(x[i : i + 1], pw) for i in range(13)])
    assert same(full, rows)
    assert same(full[:3], cpu_gemm.w4a16(x[:3], pw))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_gemm.w4a16(x, pw)
    finally:
        torch.set_num_threads(threads)
    assert same(full, one)


def test_inputs_of_other_layouts_and_dtypes():
    """Non-contiguous and leading-dims inputs; bf16/fp16 inputs are used in fp32."""
    n, k = 24, 64
    packed, scales = weight(n, k, seed=11)
    g = g_rows(n, 12)
    pw = cpu_gemm.pack(packed, scales, g)
    base = torch.randn(2, 3, 2 * k, generator=torch.Generator().manual_seed(13))
    x = base[..., ::2]  # strided
    assert not x.is_contiguous()
    got = cpu_gemm.w4a16(x, pw)
    assert got.shape == (2, 3, n)
    assert same(got.reshape(6, n), ref.w4a16(x.reshape(6, k), packed, scales, g))
    xb = torch.randn(3, k).to(torch.bfloat16)
    assert same(cpu_gemm.w4a16(xb, pw), ref.w4a16(xb.float(), packed, scales, g))


def test_w4a16_is_the_product_with_the_dequantized_weight():
    """The weights the kernel multiplies are exactly the dequantize kernel's (fp32):
    one-hot inputs read them out (a -0 weight reads out as +0: the sum starts at +0)."""
    n, k = 21, 48
    packed, scales = weight(n, k, seed=14)
    g = g_rows(n, 15)
    got = cpu_gemm.w4a16(torch.eye(k), cpu_gemm.pack(packed, scales, g))
    rows = [kernels.dequantize(packed[i : i + 1], scales[i : i + 1], g[i], torch.float32)
            for i in range(n)]  # fmt: skip
    want = torch.cat(rows).T
    assert not want.isnan().any()
    assert torch.equal(got, want)


def test_w4a4_is_the_fake_quantized_product_to_fp32_rounding():
    """The W4A4 arithmetic computes the same real number as fake-quantized x times the
    dequantized weight; the two differ only by fp32 rounding: per output at most
    (K/16 + 2) * 2^-24 * sum |a_k w_k| (block sums exact; K/16 terms summed, one
    multiply by alpha, one by 1/4 exact)."""
    n, k, m = 33, 512, 6
    gen = torch.Generator().manual_seed(16)
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(m, k, generator=gen) * torch.rand(1, k, generator=gen) * 4
    gw, ga = 448 * 6 / float(w.abs().max()), 448 * 6 / float(x.abs().max())
    packed, scales = kernels.quantize(w, gw, "mse")
    xp, xs = kernels.quantize(x, ga, "mse")
    alpha = torch.full((n,), 1.0 / (ga * gw))
    got = cpu_gemm.w4a4(xp, xs, cpu_gemm.pack(packed, scales, alpha, "w4a4"))
    a = kernels.dequantize(xp, xs, ga, torch.float32).double()
    wd = kernels.dequantize(packed, scales, gw, torch.float32).double()
    exact = a @ wd.T
    bound = (k // 16 + 2) * 2.0**-24 * (a.abs() @ wd.abs().T) + 1e-30
    assert ((got.double() - exact).abs() <= bound).all()


def test_pack_layout_and_errors():
    n, k = 37, 64
    packed, scales = weight(n, k, seed=17)
    pw = cpu_gemm.pack(packed, scales, torch.ones(n))
    tiles = 3  # 37 channels -> 3 tiles of 16, padded
    assert pw.codes.shape == (tiles, k, 8) and pw.scales.shape == (tiles, k // 16, 16)
    assert pw.nbytes() == tiles * 16 * (k // 2 + k // 16 + 4)
    # tile 1, input feature 5 = group 1, kj 1; channel 9 (high nibble) and 1 (low) of
    # that tile share byte 16 * 0 + 4 * 1 + 1 of the group; channel 6 is in lane 1
    c = nvfp4.unpack_fp4(packed)
    group = pw.codes[1].reshape(-1)[32:64]
    assert int(group[5] >> 4) == int(c[16 + 9, 5])
    assert int(group[5] & 15) == int(c[16 + 1, 5])
    assert int(group[16 + 4 + 2] & 15) == int(c[16 + 6, 5])
    bad = scales.view(torch.uint8).clone()
    bad[3, 1] = 0x7F
    with pytest.raises(ValueError, match="NaN"):
        cpu_gemm.pack(packed, bad.view(torch.float8_e4m3fn), torch.ones(n))
    with pytest.raises(ValueError, match="uint8"):
        cpu_gemm.pack(packed.float(), scales, torch.ones(n))
    with pytest.raises(ValueError, match="scales"):
        cpu_gemm.pack(packed, scales[:, :2], torch.ones(n))
    with pytest.raises(ValueError, match="rows"):
        cpu_gemm.pack(packed, scales, torch.ones(n - 1))
    with pytest.raises(ValueError, match="rows"):
        cpu_gemm.pack(packed, scales, torch.full((n,), float("nan")))
    with pytest.raises(ValueError, match="global scales"):
        cpu_gemm.pack(packed, scales, torch.full((n,), 2.0**120))
    cpu_gemm.pack(packed, scales, torch.full((n,), 2.0**-130), "w4a4")  # alpha: any > 0
    with pytest.raises(ValueError, match=r"\[\.\.\., 64\]"):
        cpu_gemm.w4a16(torch.randn(2, 32), pw)
    with pytest.raises(ValueError, match="codes"):
        cpu_gemm.w4a4(torch.zeros(2, 16, dtype=torch.uint8), scales[:2], pw)


def test_custom_ops_trace_under_torch_compile():
    """Fake implementations let Dynamo trace through the ops (vLLM's compiled CPU mode)."""
    n, k = 20, 32
    packed, scales = weight(n, k, seed=18)
    g = g_rows(n, 19)
    pw = cpu_gemm.pack(packed, scales, g)
    x = torch.randn(3, k)
    torch.library.opcheck(
        cpu_gemm._w4a16_op, (x, pw.codes, pw.scales, pw.rows, n),
        test_utils=("test_schema", "test_faketensor"),
    )  # fmt: skip
    f = torch.compile(lambda t: cpu_gemm.w4a16(t, pw) * 2, backend="eager", fullgraph=True)
    assert same(f(x), ref.w4a16(x, packed, scales, g) * 2)


def test_fma32_rounds_once():
    """The reference's fp32 FMA: checked against exact rational arithmetic on random
    triples and on ones built so that the float64 sum lands exactly on an fp32
    midpoint it is not (naive float64-then-fp32 rounds those the wrong way)."""
    from fractions import Fraction

    gen = torch.Generator().manual_seed(20)
    a = torch.randn(3000, generator=gen) * torch.exp2(
        torch.randint(-30, 30, (3000,), generator=gen)
    )
    b = torch.randn(3000, generator=gen)
    c = torch.randn(3000, generator=gen) * torch.exp2(
        torch.randint(-30, 30, (3000,), generator=gen)
    )
    u = 2.0**-23
    # c = 1 + u (odd), a*b = 2^-24 - 2^-70: the exact sum is just below the midpoint
    # 1 + 1.5u, its float64 rounding is the midpoint, ties-to-even would go up.
    a = torch.cat([a, torch.tensor([2.0**-24 * (1 + u), -(2.0**-24) * (1 + u)])])
    b = torch.cat([b, torch.tensor([1 - u, 1 - u])])
    c = torch.cat([c, torch.tensor([1 + u, -(1 + u)])])
    got = ref.fma32(a, b, c)
    assert float(got[-2]) == 1 + u and float(got[-1]) == -(1 + u)
    naive = (a.double() * b.double() + c.double()).float()
    assert float(naive[-2]) != 1 + u  # the case is the hard one
    for ai, bi, ci, gi in zip(a.tolist(), b.tolist(), c.tolist(), got.tolist(), strict=True):
        exact = Fraction(ai) * Fraction(bi) + Fraction(ci)
        r = torch.tensor([gi], dtype=torch.float32)
        lo = torch.nextafter(r, torch.tensor([-float("inf")]))
        hi = torch.nextafter(r, torch.tensor([float("inf")]))
        err = abs(exact - Fraction(gi))
        assert err <= abs(exact - Fraction(float(lo))) and err <= abs(exact - Fraction(float(hi)))
        if err == abs(exact - Fraction(float(lo))) or err == abs(exact - Fraction(float(hi))):
            assert r.view(torch.int32).item() % 2 == 0  # a tie: to even
