"""The C++ block-Hessian sweep (kernels/cpu/nvfp4_cpu.cpp, ``hessian``) against the
reference (hessian_sweep.py) and its exhaustive sweep, code for code, on every
instruction-set build this CPU runs: random, correlated, rank-deficient, dead,
outlier, tie, tiny/huge and padded-row inputs; the reference's errors on bad input."""

from __future__ import annotations

import pytest
import torch
from test_hessian_sweep import CASES, activations, block_hessians
from test_kernels_cpu import isa_build  # noqa: F401 - autouse: every ISA build

from scalesweep_vllm import hessian_sweep as hs
from scalesweep_vllm import kernels, nvfp4
from scalesweep_vllm.kernels import cpu_backend


def both(w, g, f):
    got = cpu_backend.hessian_codes(w, g, f)
    assert got is not None
    ref = hs.hessian_sweep_codes(w, g, f)
    return got, ref


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("damp", [1e-4, 3.0])
@pytest.mark.parametrize("g_num", [256.0, 2688.0])
def test_codes_equal_the_reference_and_the_exhaustive_sweep(case, damp, g_num):
    x = activations(64, 64, seed=21, **CASES[case])
    f = hs.hessian_factors(block_hessians(x), damp=damp)
    gen = torch.Generator().manual_seed(22)
    w = torch.randn(37, 64, generator=gen) * torch.rand(37, 1, generator=gen) * 3  # 37: padding
    g = g_num / float(w.abs().max())
    got, ref = both(w, g, f)
    assert torch.equal(got, ref)
    assert torch.equal(got, hs.hessian_sweep_codes(w, g, f, exhaustive=True))
    cands, forms = cpu_backend.LAST_HESSIAN_WORK
    assert w.numel() // 16 <= forms < cands  # c0 of every block; pruning prunes


def test_adversarial_blocks():
    """Rank-deficient and cancelling channels, ties, zeros, flushed and huge values,
    and bf16/fp16 weights (decoded to fp32 first, as the reference does)."""
    gen = torch.Generator().manual_seed(23)
    x = activations(3, 32, seed=24, corr=1.0)  # rank 3: the damping carries the rest
    x2 = torch.randn(200, 32, generator=gen)
    x2[:, 1] = -x2[:, 0]  # always cancel
    v = float(nvfp4.fp8_code_to_value(torch.tensor(100)))
    tie = torch.tensor([0, 1, 2, -3, 1.5, -0.5, 0.5, 1.5, 2, 1, 0, 0, -1, 3, 2, 0.5]) * v
    for acts in (x, x2):
        f = hs.hessian_factors(block_hessians(acts), damp=1e-4)
        w = torch.randn(40, 32, generator=gen)
        w[0] = 0.0
        w[1, :16] = tie
        w[2, :5] = 1e-30
        w[3] = w[3] * 1e-6
        w[4, 3] = 2.0**40
        w[5, 16:] = -0.0
        for g in (1.0, 2688 / float(w.abs().max())):
            got, ref = both(w, g, f)
            assert torch.equal(got, ref)
        g = 2688 / float(w.abs().max())
        for dt in (torch.bfloat16, torch.float16):
            wd = w.clamp(-6e4, 6e4).to(dt)
            got, ref = both(wd, g, f)
            assert torch.equal(got, ref)


def test_dispatch_and_errors():
    f = hs.hessian_factors(block_hessians(activations(50, 32, seed=25)))
    w = torch.randn(20, 32)
    g = 2688 / float(w.abs().max())
    got = kernels.hessian_sweep_scales(w, g, f)
    ref = kernels.hessian_sweep_scales(w, g, f, backend="torch")
    assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
    assert torch.equal(
        kernels.hessian_sweep_scales(w, g, f, backend="cpu").view(torch.uint8),
        ref.view(torch.uint8),
    )
    with pytest.raises(ValueError, match="NaN"):
        kernels.hessian_sweep_scales(torch.full((4, 32), float("nan")), 1.0, f)
    with pytest.raises(ValueError, match="blocks per row"):
        kernels.hessian_sweep_scales(torch.randn(4, 48), 1.0, f)
    with pytest.raises(ValueError, match="exceeds"):
        kernels.hessian_sweep_scales(torch.full((4, 32), 2.0**60), 1.0, f)
    with pytest.raises(ValueError, match="Triton"):
        kernels.hessian_sweep_scales(w, g, f, backend="triton")
