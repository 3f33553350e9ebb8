"""The block-Hessian sweep (scalesweep_vllm/hessian_sweep.py): its objective against an
independent float64 form, its window and pruning against the exhaustive sweep on
random, correlated, ill-conditioned, dead and tie blocks."""

import pytest
import torch

from scalesweep_vllm import hessian_sweep as hs
from scalesweep_vllm.nvfp4 import fp8_code_to_value
from scalesweep_vllm.sweep import absmax_codes, quantize_dequantize


def block_hessians(x: torch.Tensor) -> torch.Tensor:
    """Diagonal 16x16 blocks of X^T X / n, computed the obvious way."""
    return block_hessians_of(x.double().T @ x.double() / x.shape[0])


def activations(tokens, k, seed, corr=0.3, outliers=(), dead=(), dead_blocks=()):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * corr + torch.eye(k)
    x = torch.randn(tokens, k, generator=g) @ mix
    for c in outliers:
        x[:, c] *= 40
    for c in dead:
        x[:, c] = 0
    for b in dead_blocks:
        x[:, 16 * b : 16 * b + 16] = 0
    return x


def form64(w, g, codes, factors):
    """(x - x_hat)^T (L L^T) (x - x_hat) in float64, G-units, from the dequantized
    weights (independent of the sweep's arithmetic)."""
    xh = quantize_dequantize(w, g, codes.to(torch.uint8).view(torch.float8_e4m3fn))
    e = (w.double() - xh.double()).reshape(w.shape[0], -1, 16) * float(g)
    flushed = w.abs().reshape(e.shape) * float(g) < hs.FLUSH_SCALED
    e = torch.where(flushed, 0.0, e)
    L = factors.L.double()
    z = torch.einsum("bjk,nbj->nbk", L, e)
    return (z * z).sum(-1)


def sweep_both(w, g, f):
    st = {}
    b = hs.hessian_sweep_codes(w, g, f, stats=st)
    e = hs.hessian_sweep_codes(w, g, f, exhaustive=True)
    return b, e, st


CASES = {
    "correlated": dict(corr=0.3),
    "strongly correlated": dict(corr=2.0),
    "outliers and dead channels": dict(corr=0.3, outliers=(3, 20, 40), dead=(5, 33)),
    "dead block": dict(corr=0.3, dead_blocks=(1,)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("g_num", [1536.0, 2688.0])
def test_bounded_equals_exhaustive(case, g_num):
    x = activations(64, 64, seed=1, **CASES[case])
    f = hs.hessian_factors(block_hessians(x))
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(48, 64, generator=gen) * torch.rand(48, 1, generator=gen) * 3
    g = g_num / float(w.abs().max())
    b, e, st = sweep_both(w, g, f)
    assert torch.equal(b, e)
    assert st["wrongly_pruned"] == 0
    assert st["forms"] < st["candidates"]  # the pruning does prune


def test_rank_deficient_and_negatively_correlated():
    """Few tokens (H_b of rank 3, the damping carries the rest) and a pair of
    channels that always cancel (H = [[1, -1], [-1, 1]] on them)."""
    x = activations(3, 32, seed=3, corr=1.0)
    f = hs.hessian_factors(block_hessians(x), damp=1e-4)
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(64, 32, generator=gen)
    b, e, st = sweep_both(w, 1536 / float(w.abs().max()), f)
    assert torch.equal(b, e) and st["wrongly_pruned"] == 0
    x = torch.randn(200, 32, generator=gen)
    x[:, 1] = -x[:, 0]
    f = hs.hessian_factors(block_hessians(x))
    b, e, st = sweep_both(w, 1536 / float(w.abs().max()), f)
    assert torch.equal(b, e) and st["wrongly_pruned"] == 0


def test_objective_matches_float64_form():
    x = activations(40, 48, seed=5, corr=0.5, outliers=(7,))
    f = hs.hessian_factors(block_hessians(x))
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(16, 48, generator=gen)
    g = torch.tensor(2688 / float(w.abs().max()))
    for c in (60, 90, 100, 110, 118, 126):
        codes = torch.full((16, 3), c, dtype=torch.int64)
        got = hs.hessian_candidate_errors(w, g, f, codes).double()
        ref = form64(w, g, codes, f)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-30), c


def test_factors_are_the_damped_blocks():
    """L L^T = 2^k (H_b + damp * mean(diag H_b) I), a dead block gives I."""
    x = activations(30, 48, seed=7, dead_blocks=(2,), dead=(4,))
    h = block_hessians(x)
    f = hs.hessian_factors(h, damp=0.05)
    ll = f.L.double() @ f.L.double().transpose(1, 2)
    for b in range(2):
        hd = h[b] + 0.05 * h[b].diagonal().mean() * torch.eye(16, dtype=torch.float64)
        ratio = ll[b, 0, 0] / hd[0, 0]
        assert float(torch.log2(ratio)) == pytest.approx(round(float(torch.log2(ratio))), abs=1e-5)
        assert torch.allclose(ll[b], hd * ratio, rtol=1e-5, atol=1e-6)
        assert 1 <= float(ll[b].diagonal().max()) < 2 + 1e-5
    assert f.dead.tolist() == [False, False, True]
    assert torch.allclose(ll[2], torch.eye(16, dtype=torch.float64))
    # the bounds' ingredients: w_i <= 1 / (H^-1)_ii and lam <= lambda_min
    p = torch.linalg.inv(ll)
    assert (f.w.double() <= 1 / p.diagonal(dim1=1, dim2=2) * (1 + 1e-7)).all()
    assert (f.lam.double() <= torch.linalg.eigvalsh(ll)[:, 0] * (1 + 1e-7)).all()


def test_window_edges():
    """Above hi every code has the bit-identical E; below lo every code loses to c0."""
    x = activations(64, 32, seed=8, corr=0.8)
    f = hs.hessian_factors(block_hessians(x))
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(24, 32, generator=gen) * torch.rand(24, 1, generator=gen)
    g = torch.tensor(256.0 / float(w.abs().max()))  # low G: room above for hi < 126
    lo, hi = hs.hessian_window(w, g, f)
    c0 = absmax_codes(w, g).to(torch.int64)
    e0 = hs.hessian_candidate_errors(w, g, f, c0)
    assert (hi < 126).any()
    for c in range(1, 127):
        e = hs.hessian_candidate_errors(w, g, f, torch.full_like(c0, c))
        above, below = c > hi, c < lo
        e_hi = hs.hessian_candidate_errors(w, g, f, hi)
        assert torch.equal(e[above], e_hi[above])
        assert (e[below] > e0[below]).all()


def test_ties_go_to_the_smaller_code():
    """A block on the grid {0, .5, 1, 1.5, 2, 3} * v is exact at v and at v/2 (grid
    {0, 1, 2, 3, 4, 6} there): E = 0 at both codes, and the smaller wins in both
    sweeps. An all-zero block gets code 1."""
    f = hs.hessian_factors(block_hessians(activations(50, 16, seed=10, corr=1.0)))
    g = 1.0
    v = float(fp8_code_to_value(torch.tensor(100)))
    w = torch.tensor([[0, 1, 2, -3, 1.5, -0.5, 0.5, 1.5, 2, 1, 0, 0, -1, 3, 2, 0.5]]) * v
    b, e, _ = sweep_both(w, g, f)
    exact = [
        c
        for c in range(1, 127)
        if float(hs.hessian_candidate_errors(w, g, f, torch.tensor([[c]]))) == 0.0
    ]
    assert exact == [92, 100] and int(b) == int(e) == 92
    zero = torch.zeros(3, 16)
    assert hs.hessian_sweep_codes(zero, g, f).tolist() == [[1]] * 3


def test_tiny_and_huge_values():
    f = hs.hessian_factors(block_hessians(activations(50, 32, seed=11)))
    gen = torch.Generator().manual_seed(12)
    w = torch.randn(8, 32, generator=gen)
    w[0, :5] = 1e-30  # flushed
    w[1] = w[1] * 1e-6
    w[2, 3] = 2.0**40  # with G = 1: near the 2^50 domain edge after scaling
    b, e, st = sweep_both(w, 1.0, f)
    assert torch.equal(b, e) and st["wrongly_pruned"] == 0


def test_bad_input_is_refused():
    h = block_hessians(activations(20, 32, seed=13))
    with pytest.raises(ValueError, match="damp"):
        hs.hessian_factors(h, damp=0.0)
    with pytest.raises(ValueError, match=r"\[K/16, 16, 16\]"):
        hs.hessian_factors(h[:, :8, :8])
    bad = h.clone()
    bad[0, 0, 1] += 1.0
    with pytest.raises(ValueError, match="symmetric"):
        hs.hessian_factors(bad)
    bad = h.clone()
    bad[1, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        hs.hessian_factors(bad)
    bad = h.clone()
    bad[0] = -torch.eye(16, dtype=h.dtype)
    with pytest.raises(ValueError, match="negative diagonal"):
        hs.hessian_factors(bad)
    f = hs.hessian_factors(h)
    with pytest.raises(ValueError, match="blocks per row"):
        hs.hessian_sweep_codes(torch.randn(4, 48), 1.0, f)
    with pytest.raises(ValueError, match="NaN"):
        hs.hessian_sweep_codes(torch.full((4, 32), float("nan")), 1.0, f)


def test_quantize_model_with_the_hessian_objective(tmp_path, monkeypatch):
    """``objective="hessian"`` end to end on a tiny Llama: runtime parts record wmse;
    a Linear's stored scales are exactly the block-Hessian sweep of the Hessian its
    calibration gathered, and that Hessian is its inputs' ``X^T X / n`` (recomputed
    here from the original model; other attention kernels and summation orders move
    it by well under 1%)."""
    import json

    from _quantize_models import calib_tokens, save_tiny_model, save_tiny_tokenizer
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from scalesweep_vllm.quantize import pipeline, quantize_model

    src = save_tiny_model("llama", tmp_path / "src")
    save_tiny_tokenizer(src)
    ids = calib_tokens()
    name = "model.layers.0.self_attn.o_proj"  # not fused; K = 64
    seen_h = {}
    real = pipeline.quantize_group

    def spy(members, *args, **kw):
        seen_h[members[0].name] = kw["hessian"].clone()
        return real(members, *args, **kw)

    monkeypatch.setattr(pipeline, "quantize_group", spy)
    quantize_model(
        src, tmp_path / "q", scheme="W4A4", objective="hessian", calib=ids, progress=False
    )
    meta = json.loads((tmp_path / "q" / "scalesweep.json").read_text())
    assert meta["objective"] == "hessian" and meta["activations"]["method"] == "wmse"
    t = load_file(tmp_path / "q" / "model.safetensors")
    # the quantizer loads the model in bf16 and computes in float32
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).float()
    w = model.get_submodule(name).weight.detach()
    g = t[f"{name}.weight_global_scale"]
    h = seen_h[name]
    codes = hs.hessian_sweep_codes(w, g, hs.hessian_factors(block_hessians_of(h)))
    assert torch.equal(codes, t[f"{name}.weight_scale"].view(torch.uint8).to(torch.int64))
    seen = []
    model.get_submodule(name).register_forward_pre_hook(
        lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    with torch.no_grad():
        model(input_ids=ids)
    x = torch.cat(seen)
    ref = x.T @ x / x.shape[0]
    assert float((h - ref).norm() / ref.norm()) < 1e-2


def block_hessians_of(h: torch.Tensor) -> torch.Tensor:
    """The 16x16 diagonal blocks of a [K, K] matrix."""
    return torch.stack([h[i : i + 16, i : i + 16] for i in range(0, h.shape[0], 16)])


def test_first_zero_code_is_the_first_code_that_rounds_to_zero():
    """The bisection against a scan of all 126 codes: random magnitudes over 10
    decades, zeros, huge values (no code rounds them to 0: 126) and the exact
    boundaries m * G / v = 1/4 (a tie: rounds to 0) and just above them."""
    from scalesweep_vllm.nvfp4 import round_e2m1_magnitude

    gen = torch.Generator().manual_seed(14)
    vs = fp8_code_to_value(torch.arange(1, 127))
    for g in (1.0, 0.37, 2688.0):
        m = torch.rand(4000, generator=gen) * 10.0 ** torch.randint(-6, 4, (4000,), generator=gen)
        edge = vs * 0.25 / g
        above = torch.nextafter(edge, edge * 2)
        m = torch.cat([m, torch.zeros(3), torch.tensor([1e30]), edge, above])
        scan = torch.full(m.shape, 126, dtype=torch.int64)
        for c in range(126, 0, -1):
            v = fp8_code_to_value(torch.tensor(c))
            scan = torch.where(round_e2m1_magnitude(m * (g / v)) == 0, c, scan)
        assert torch.equal(hs.first_zero_code(m, g), scan)
