"""benchmarks/bench_vllm_absmax.py: tie inputs are real ties, the comparison counts
right, and without CUDA/vLLM the script skips in one line with exit 0."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from scalesweep_vllm import kernels, nvfp4

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vllm_absmax.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_vllm_absmax", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ours(x, g):
    return kernels.quantize(x, g, method="absmax", backend="torch")


def test_tie_cases_sit_on_ties():
    bench = _bench()
    vals = nvfp4.fp8_values().double()
    mids = (vals[1:] + vals[:-1]) / 2

    x, g = bench.make_case("ties_scale", 8, 64, "cpu", seed=1)
    assert x.dtype == torch.bfloat16 and float(g) == 1.0
    t = x.float().reshape(-1, 16).abs().amax(-1) / 6.0  # fp32, as our quantizer computes
    assert torch.isin(t.double(), mids).all()  # every block's scale is an FP8 midpoint

    x, g = bench.make_case("ties_code", 8, 64, "cpu", seed=2)
    b = x.double().reshape(-1, 16)
    amax = b.abs().amax(-1, keepdim=True)
    v = amax / 6.0
    assert torch.isin(v.squeeze(-1), vals).all()  # the AbsMax scale is an exact FP8 value
    r = (b / v).abs()
    is_max = b.abs() == amax
    ties = torch.tensor(bench.E2M1_TIES, dtype=torch.float64)
    assert torch.isin(r[~is_max], ties).all()  # every other element is a midpoint * v


def test_compare_counts_and_self_agreement():
    bench = _bench()
    res = bench.run(_ours, "cpu", rows=8, cols=64, seed=3, ours=_ours)
    assert set(res) == set(bench.CASES)
    for r in res.values():
        assert r["blocks"] == 8 * 4 and r["elements"] == 8 * 64
        assert r["scale_diff_frac"] == 0 and r["code_diff_frac"] == 0
        assert r["scale_max_code_step"] == 0 and r["signed_zero_only_diffs"] == 0
        assert r["ours_off_exact_frac"] == r["vllm_off_exact_frac"]
    assert res["gaussian_paper"]["ours_off_exact_frac"] == 0  # no ties in random data

    # 4 rows x 2 blocks. Their side: block (0, 0) one FP8 code higher; one element of
    # block (0, 1) one E2M1 step away; one zero in another row turned into -0.
    x, g = bench.make_case("gaussian_paper", 4, 32, "cpu")
    packed, scales = _ours(x, g)
    codes = nvfp4.unpack_fp4(packed)
    s2 = scales.view(torch.uint8).clone()
    s2[0, 0] += 1
    c2 = codes.clone()
    col = 16 + int(((c2[0, 16:] & 7) < 7).nonzero()[0])
    c2[0, col] += 1  # magnitude + 1 whatever the sign
    zeros = ((c2[1:] & 7) == 0).nonzero()
    assert len(zeros), "the seeded input has a zero code outside row 0"
    c2[1 + int(zeros[0, 0]), int(zeros[0, 1])] ^= 8
    r = bench.compare((packed, scales), (nvfp4.pack_fp4(c2), s2.view(torch.float8_e4m3fn)))
    assert r["scale_diff_frac"] == 1 / 8 and r["scale_max_code_step"] == 1
    assert r["code_diff_frac"] == 1 / (4 * 32)
    assert r["code_diff_frac_same_scale"] == 1 / (7 * 16)
    assert r["blocks_with_code_diff_same_scale_frac"] == 1 / 7
    assert r["code_max_step_same_scale"] == 1
    assert r["signed_zero_only_diffs"] == 1


def test_skips_in_one_line_without_cuda(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the skip path is not taken")
    assert _bench().main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("bench_vllm_absmax: skipped: no CUDA")
    assert not list(tmp_path.iterdir())


def test_table_and_json_shape(tmp_path):
    bench = _bench()
    res = bench.run(_ours, "cpu", rows=4, cols=32, cases=("ties_code",), ours=_ours)
    text = bench.table(res)
    assert text.splitlines()[2].startswith("ties_code")
    json.dumps(res)  # plain numbers only
