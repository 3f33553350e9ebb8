"""The ScaleSweep reference: bounded sweep == exhaustive sweep, never worse than
AbsMax, optimal in exact (float64) arithmetic, clear errors on bad input."""

import math

import pytest
import torch

from scalesweep_vllm import nvfp4, sweep

FP8 = nvfp4.fp8_values()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def block_sets(scale=1):
    """(name, x [n, 16], G) covering ordinary, heavy-tailed and adversarial blocks.
    About 580k blocks at scale=1."""
    n = 100_000 * scale
    g = _gen(123)
    sets = []
    for name, x in (
        ("gaussian", torch.randn(n, 16, generator=g)),
        ("laplace", torch.distributions.Laplace(0.0, 1.0).sample((n, 16))),
        ("student-t3", torch.distributions.StudentT(3.0).sample((n, 16))),
    ):
        sets.append((name, x, nvfp4.global_scale(x.abs().max())))
    out = torch.randn(n // 2, 16, generator=g)
    mask = torch.rand(n // 2, 16, generator=g) < 0.02
    out = torch.where(mask, out * 40, out)
    sets.append(("outliers", out, nvfp4.global_scale(out.abs().max())))
    # per-block magnitudes spread over 40 octaves, one global scale: covers the FP8
    # subnormal codes, the top of the range and saturation (compressed-tensors' 448).
    spread = torch.randn(n, 16, generator=g) * torch.exp2(torch.rand(n, 1, generator=g) * 40 - 30)
    sets.append(
        ("spread-448", spread, nvfp4.global_scale(spread.abs().max() / 4, "compressed-tensors"))
    )
    top = torch.randn(n // 4, 16, generator=g)
    top = top / top.abs().amax(dim=1, keepdim=True) * (1 + torch.rand(n // 4, 1, generator=g))
    sets.append(("fp8-top-448", top, nvfp4.global_scale(1.0, "compressed-tensors")))
    sub = torch.randn(n // 4, 16, generator=g) * 2.0**-12
    sets.append(("subnormal", sub, nvfp4.global_scale(1.0)))
    special = torch.zeros(4000, 16)
    special[1000:3000] = torch.randn(2000, 1, generator=g)  # constant blocks
    special[3000:] = torch.randint(-12, 13, (1000, 16), generator=g) / 4.0  # ties galore
    sets.append(("zero-const-ties", special, nvfp4.global_scale(3.0)))
    return sets


def random_weights(shape, seed):
    g = _gen(seed)
    w = torch.rand(shape, generator=g) ** 3 * 10
    return torch.where(torch.rand(shape, generator=g) < 0.2, 0.0, w)


@pytest.mark.slow
def test_bounded_equals_exhaustive_over_a_million_blocks():
    total = 0
    for i, (name, x, g) in enumerate(block_sets(scale=2)):
        for w in (None, random_weights(x.shape, i)):
            if w is not None and x.shape[0] > 60_000:
                x, w = x[:60_000], w[:60_000]  # WMSE on a subset keeps the run short
            ex = sweep.sweep_codes(x, g, w, exhaustive=True)
            bd = sweep.sweep_codes(x, g, w)
            bad = (ex != bd).nonzero().flatten()
            assert bad.numel() == 0, f"{name} {'wmse' if w is not None else 'mse'}: {bad[:5]}"
            lo, hi = sweep.sweep_bounds(x, g, w)
            assert bool(((lo <= ex) & (ex <= hi)).all())
            total += x.shape[0]
    assert total >= 1_000_000


def test_bounded_equals_exhaustive_quick():
    """A small version of the above that runs everywhere in seconds."""
    for i, (name, x, g) in enumerate(block_sets()):
        x = x[:3000]
        for w in (None, random_weights(x.shape, i), random_weights(16, i)):
            ex = sweep.sweep_codes(x, g, w, exhaustive=True)
            assert torch.equal(sweep.sweep_codes(x, g, w), ex), name


def test_window_shapes():
    x = torch.randn(20_000, 16, generator=_gen(5))
    g = nvfp4.global_scale(x.abs().max())
    c0 = sweep.absmax_codes(x, g).flatten()
    lo, hi = sweep.sweep_bounds(x, g)
    lo, hi = lo.flatten(), hi.flatten()
    assert bool((lo >= c0 - 3).all()) and bool((hi <= (c0 + 7).clamp(max=126)).all())
    assert (hi - lo + 1).float().mean() <= 11
    # the window reaches every code below max|y| / 3.5 (above it, v/2 is never worse),
    # and the paper's global scale keeps that inside the FP8 range for every block
    y_max = x.abs().amax(-1) * g
    assert bool((FP8[(hi + 1).clamp(max=126)] >= y_max / 3.5).all())
    assert int(c0.max()) <= 120 and float(y_max.max() / 3.5) < 448
    w = random_weights(x.shape, 5)
    lo_w, hi_w = sweep.sweep_bounds(x, g, w)
    assert (hi_w - lo_w + 1).float().mean() < 16  # the weighted sweep stays narrow


def test_sweep_never_worse_than_absmax_or_four_over_six():
    for i, (name, x, g) in enumerate(block_sets()):
        x = x[:20_000]
        for w in (None, random_weights(x.shape, i)):
            e_sw = sweep.block_errors(x, g, sweep.sweep_scales(x, g, w), w)
            e_abs = sweep.block_errors(x, g, sweep.absmax_scales(x, g), w)
            e_46 = sweep.block_errors(x, g, sweep.four_over_six_scales(x, g, w), w)
            assert bool((e_sw <= e_abs).all()), name
            assert bool((e_sw <= e_46).all()), name


def _float64_errors(x, g, w):
    """Independent: true squared error of every code, quantized in float64."""
    xd, gd = x.double(), float(g)
    errs = []
    for code in range(1, 127):
        s = FP8[code].double() / gd
        a = xd.abs() / s
        step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0)).double()
        q = torch.clamp(torch.round(a / step) * step, max=6)
        e = (xd.abs() - q * s) ** 2
        errs.append((e * (1 if w is None else w.double())).sum(-1))
    return torch.stack(errs, dim=-1)


def test_choice_is_optimal_in_float64():
    for i, (name, x, g) in enumerate(block_sets()):
        x = x[:2000]
        for w in (None, random_weights(x.shape, 7 + i)):
            e64 = _float64_errors(x, g, w)
            chosen = sweep.sweep_codes(x, g, w).flatten() - 1
            got = e64.gather(1, chosen[:, None]).flatten()
            best = e64.min(dim=1).values
            # fp32 rounding of x*G/v may flip a near-tie: allow 1e-5 relative
            assert bool((got <= best * (1 + 1e-5) + 1e-30).all()), name


def test_gaussian_mse_reduction_at_least_20_percent():
    x = torch.randn(4096, 1024, generator=_gen(11))
    g = nvfp4.global_scale(x.abs().max())
    e_abs = sweep.block_errors(x, g, sweep.absmax_scales(x, g)).mean()
    e_sw = sweep.block_errors(x, g, sweep.sweep_scales(x, g)).mean()
    assert 1 - e_sw / e_abs >= 0.20


def test_tie_rule_smallest_code():
    # all-zero block: every scale is exact, the smallest code wins
    assert sweep.sweep_codes(torch.zeros(1, 16), 1.0, exhaustive=True).item() == 1
    assert sweep.sweep_codes(torch.zeros(1, 16), 1.0).item() == 1
    # constant 1 with G = 6: v = 1, 1.5, 2, 3, 4, 6 are all exact; v = 1 (code 56) wins
    x = torch.ones(3, 16)
    assert sweep.sweep_codes(x, 6.0, exhaustive=True).flatten().tolist() == [56] * 3
    assert sweep.sweep_codes(x, 6.0).flatten().tolist() == [56] * 3
    # all weights zero: every error is 0 -> code 1
    assert sweep.sweep_codes(x, 6.0, torch.zeros(16)).flatten().tolist() == [1] * 3


def test_absmax_scale_definition():
    x = torch.randn(64, 64, generator=_gen(3)).to(torch.bfloat16)
    g = nvfp4.global_scale(x.float().abs().max())
    amax = x.float().abs().reshape(64, 4, 16).amax(-1)
    want = torch.clamp((amax / 6) * g, max=448).to(torch.float8_e4m3fn)
    got = sweep.absmax_scales(x, g)
    assert got.dtype == torch.float8_e4m3fn and got.shape == (64, 4)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_shapes_dtypes_and_nd_input():
    x = torch.randn(2, 3, 32, generator=_gen(4))
    g = nvfp4.global_scale(x.abs().max())
    for fn in (sweep.absmax_scales, sweep.sweep_scales, sweep.four_over_six_scales):
        s = fn(x, g)
        assert s.shape == (2, 3, 2) and s.dtype == torch.float8_e4m3fn
    s = sweep.sweep_scales(x, g)
    flat = sweep.sweep_scales(x.reshape(6, 32), g)
    assert torch.equal(s.reshape(6, 2).view(torch.uint8), flat.view(torch.uint8))
    codes = sweep.quantize_codes(x, g, s)
    assert codes.shape == x.shape and codes.dtype == torch.uint8 and int(codes.max()) < 16
    xq = sweep.quantize_dequantize(x, g, s)
    assert xq.dtype == torch.float32 and xq.shape == x.shape
    assert torch.equal(nvfp4.decode_e2m1(codes) * (s.float() / g).repeat_interleave(16, -1), xq)
    # SQNR of NVFP4 on Gaussian data is about 20 dB; anything far below means a bug
    sqnr = 10 * math.log10(float((x**2).sum() / ((x - xq) ** 2).sum()))
    assert sqnr > 18


def test_dequantize_matches_compressed_tensors_decompression():
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    w = (torch.randn(96, 256, generator=_gen(8)) * 0.02).to(torch.bfloat16)
    g = nvfp4.global_scale(w.float().abs().max())
    s = sweep.sweep_scales(w, g, torch.rand(256, generator=_gen(9)))
    packed = nvfp4.pack_fp4(sweep.quantize_codes(w, g, s))
    args = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    out = NVFP4PackedCompressor.decompress(
        {"weight_packed": packed, "weight_scale": s, "weight_global_scale": g}, scheme
    )
    ours = sweep.quantize_dequantize(w, g, s).to(torch.bfloat16)
    assert out["weight"].dtype == torch.bfloat16
    assert torch.equal(out["weight"], ours)


@pytest.mark.parametrize(
    "x, g, w, err, match",
    [
        (torch.randn(4, 24), 1.0, None, ValueError, "multiple of 16"),
        (torch.tensor([[float("nan")] + [0.0] * 15]), 1.0, None, ValueError, "NaN or Inf"),
        (torch.tensor([[float("inf")] + [0.0] * 15]), 1.0, None, ValueError, "NaN or Inf"),
        (torch.randn(2, 16), 0.0, None, ValueError, "finite and > 0"),
        (torch.randn(2, 16), -1.0, None, ValueError, "finite and > 0"),
        (torch.randn(2, 16), float("inf"), None, ValueError, "finite and > 0"),
        (torch.randn(2, 16), torch.tensor([1.0, 2.0]), None, ValueError, "one number"),
        (torch.randn(2, 16), 1e36, None, ValueError, "effectively zero"),
        (torch.randn(2, 16), 1.0, -torch.ones(16), ValueError, ">= 0"),
        (torch.randn(2, 16), 1.0, torch.ones(8), ValueError, "broadcast"),
        (torch.randn(2, 16), 1.0, torch.full((16,), float("nan")), ValueError, "NaN"),
        (torch.randint(0, 3, (2, 16)), 1.0, None, TypeError, "floating-point"),
    ],
)
def test_bad_input(x, g, w, err, match):
    with pytest.raises(err, match=match):
        sweep.sweep_scales(x, g, w)


def test_bad_scales():
    x = torch.randn(2, 32)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        sweep.quantize_dequantize(x, 1.0, torch.ones(2, 2))
    with pytest.raises(ValueError, match="do not match"):
        sweep.quantize_dequantize(x, 1.0, sweep.absmax_scales(torch.randn(2, 16), 1.0))
