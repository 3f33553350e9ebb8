"""benchmarks/bench_quantizer.py runs (tiny shapes on CPU) and writes sound JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quantizer.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_quantizer", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_quantizer_cpu_smoke(tmp_path, capsys):
    bench = _bench()
    rc = bench.main(
        [
            "--shape",
            "tiny",
            "--device",
            "cpu",
            "--objectives",
            "absmax",
            "wmse",
            "--end-to-end",
            "--num-samples",
            "2",
            "--seq-len",
            "16",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    res = json.loads((tmp_path / "bench_quantizer.json").read_text())
    h, i, layers = 64, 128, 2
    per_layer = 2 * h * h + h * h + 3 * h * i  # q (h x h) + k, v (h/2 x h each), o, mlp
    for r in res["weight_path"]:
        assert r["quantized_params"] == layers * per_layer
        assert r["seconds"] > 0 and r["s_per_billion_params"] > 0
    assert res["end_to_end"]["totals"]["quantized_linears"] == layers * 7
    assert "s per billion parameters" in capsys.readouterr().out


def test_bench_quantizer_without_cuda_exits_cleanly(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the no-GPU path is not taken")
    assert _bench().main([]) == 0
    assert "no CUDA" in capsys.readouterr().out
