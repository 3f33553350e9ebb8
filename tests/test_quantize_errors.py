"""The quantizer's command line and its bad inputs: clear errors, nothing half written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _quantize_models import calib_tokens, save_tiny_model
from safetensors.torch import load_file, save_file

from scalesweep_vllm.quantize import cli, quantize_model, writer
from scalesweep_vllm.quantize import pipeline as pipeline_mod


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_cli_text_and_jsonl_calibration(tiny, tmp_path, calib_txt, capsys):
    out = tmp_path / "out"
    rc = cli.main(
        [
            "--model",
            str(tiny),
            "--output",
            str(out),
            "--calib",
            str(calib_txt),
            "--num-samples",
            "4",
            "--seq-len",
            "32",
            "--objective",
            "mse",
            "--scheme",
            "W4A16",
            "--global-scale",
            "compressed-tensors",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "NVFP4 quantization report" in text and "s per billion parameters" in text
    meta = json.loads((out / "scalesweep.json").read_text())
    assert meta["global_scale_convention"] == "compressed-tensors"
    assert meta["calibration"]["num_samples"] == 4 and meta["calibration"]["seq_len"] == 32
    sd = load_file(out / "model.safetensors")
    assert not any(k.endswith("input_global_scale") for k in sd)  # W4A16: weights only
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file()
    rep = json.loads((out / "quantization_report.json").read_text())
    assert rep["totals"]["mse_scalesweep"] < rep["totals"]["mse_absmax"]
    jl = tmp_path / "calib.jsonl"
    jl.write_text(
        "\n".join(json.dumps({"text": "Paris is the capital of France. " * 9}) for _ in range(6))
    )
    out2 = tmp_path / "out2"
    assert (
        cli.main(
            [
                "--model",
                str(tiny),
                "--output",
                str(out2),
                "--calib",
                str(jl),
                "--num-samples",
                "3",
                "--seq-len",
                "16",
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((out2 / "scalesweep.json").read_text())["calibration"]["num_samples"] == 3


def test_dry_run_writes_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "never"
    assert cli.main(["--model", str(tiny), "--output", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "DRY RUN" in text and "model.layers.0.mlp.down_proj" in text
    assert "q_proj+k_proj+v_proj" in text
    assert not out.exists() and not _leftovers(tmp_path)


def test_missing_model_dir(tmp_path, capsys):
    rc = cli.main(["--model", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        quantize_model(tmp_path / "nope", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_not_a_causal_lm(tmp_path, capsys):
    from transformers import T5Config, T5ForConditionalGeneration

    src = tmp_path / "t5"
    T5ForConditionalGeneration(
        T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    ).save_pretrained(src)
    rc = cli.main(["--model", str(src), "--output", str(tmp_path / "o")])
    assert rc == 2
    assert "not a causal language model" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["--model", str(empty), "--output", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_overwrite(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = [
        "--model",
        str(tiny),
        "--output",
        str(out),
        "--num-samples",
        "2",
        "--seq-len",
        "16",
        "--quiet",
        "--calib",
    ]
    calib = tmp_path / "c.txt"
    calib.write_text("some words to calibrate with " * 20)
    assert cli.main([*args, str(calib)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    # a folder that is not ours is never deleted, --overwrite or not
    assert cli.main([*args, str(calib), "--overwrite"]) == 2
    assert "not written by scalesweep-quantize" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # empty now: --overwrite may use it
    assert cli.main([*args, str(calib), "--overwrite"]) == 0
    assert (out / "config.json").is_file() and (out / "scalesweep.json").is_file()
    (out / "extra.txt").write_text("x")  # an earlier output of ours is replaced whole
    assert cli.main([*args, str(calib), "--overwrite"]) == 0
    assert not (out / "extra.txt").exists() and (out / "config.json").is_file()
    assert not _leftovers(tmp_path)


def test_nan_weight_names_the_layer(tmp_path):
    src = save_tiny_model("llama", tmp_path / "nan")
    sd = load_file(src / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj"):
        quantize_model(src, tmp_path / "o", calib=calib_tokens(), progress=False)
    assert not (tmp_path / "o").exists() and not _leftovers(tmp_path)


def test_empty_calibration_file(tiny, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    rc = cli.main(["--model", str(tiny), "--output", str(tmp_path / "o"), "--calib", str(empty)])
    assert rc == 2
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not _leftovers(tmp_path)


@pytest.mark.parametrize("where", ["quantize", "write"])
def test_ctrl_c_leaves_nothing(tiny, tmp_path, monkeypatch, where, capsys):
    """KeyboardInterrupt mid-quantization or mid-write: no output, no temporary dir."""
    calls = {"n": 0}
    if where == "quantize":
        real = pipeline_mod.quantize_group

        def boom(*a, **k):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return real(*a, **k)

        monkeypatch.setattr(pipeline_mod, "quantize_group", boom)
    else:
        real_save = writer.save_file

        def boom(tensors, path, **k):
            real_save(tensors, path, **k)  # the first file lands in the staging dir
            raise KeyboardInterrupt

        monkeypatch.setattr(writer, "save_file", boom)
    out = tmp_path / "out"
    calib = tmp_path / "c.txt"
    calib.write_text("interrupt me please " * 50)
    rc = cli.main(
        [
            "--model",
            str(tiny),
            "--output",
            str(out),
            "--calib",
            str(calib),
            "--num-samples",
            "2",
            "--seq-len",
            "16",
            "--quiet",
        ]
    )
    assert rc == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt"]


def test_bad_scheme_and_objective(tiny, tmp_path):
    with pytest.raises(ValueError, match="scheme"):
        quantize_model(tiny, tmp_path / "o", scheme="W3A3")
    with pytest.raises(ValueError, match="objective"):
        quantize_model(tiny, tmp_path / "o", objective="gptq")
    with pytest.raises(SystemExit):
        cli.main(["--scheme", "W8A8"])


@pytest.mark.parametrize("scheme", ["W4A16", "W4A4", "W4A4KV4Q4"])
def test_literal_config_equals_compressed_tensors(scheme):
    """The fallback used where compressed-tensors is missing is what it would build."""
    from scalesweep_vllm.quantize.scheme import get_scheme

    ign = ["lm_head", "model.layers.0.mlp.down_proj"]
    sch = get_scheme(scheme)
    assert writer.literal_quantization_config(sch, ign) == writer.build_quantization_config(
        sch, ign
    )


def test_quantize_without_compressed_tensors(tmp_path, monkeypatch):
    """Machines without compressed-tensors (the lent GPUs) still write the same config."""
    import sys

    src = save_tiny_model("llama", tmp_path / "src")
    quantize_model(
        src, tmp_path / "a", calib=calib_tokens(), num_samples=2, seq_len=16, progress=False
    )
    monkeypatch.setitem(sys.modules, "compressed_tensors.quantization", None)
    quantize_model(
        src, tmp_path / "b", calib=calib_tokens(), num_samples=2, seq_len=16, progress=False
    )
    cfg_a = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg_b = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg_a == cfg_b
