"""The quantizer's edges (issue 13): inputs people get wrong never lose data, never
pass silently, and give an ``error: ...`` a user can act on (exit 2), checked
before the model loads where the check is cheap."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from _quantize_models import calib_tokens
from safetensors.torch import load_file, save_file

from scalesweep_vllm.quantize import cli, data, preflight, quantize_model, writer
from scalesweep_vllm.quantize import pipeline as pipeline_mod
from scalesweep_vllm.quantize.report import format_report


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the model's weights are loaded: the check must come first."""

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the cheap checks")

    monkeypatch.setattr(pipeline_mod, "load_model", boom)


def _run(model, out, *extra, calib_file=None) -> int:
    args = ["--model", str(model), "--output", str(out), "--num-samples", "2", "--seq-len", "16"]
    if calib_file is not None:
        args += ["--calib", str(calib_file)]
    return cli.main([*args, "--quiet", *extra])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# -- 1. --overwrite never deletes what is not ours ---------------------------------


@pytest.fixture
def model_copy(tiny, tmp_path) -> Path:
    dst = tmp_path / "work" / "model"
    shutil.copytree(tiny, dst)
    return dst


@pytest.mark.parametrize("how", ["dotdot", "symlink", "contains", "inside", "calib-folder"])
def test_overwrite_refuses_model_and_calibration_folders(model_copy, tmp_path, how, capsys):
    work = model_copy.parent
    (work / "x").mkdir()
    (work / "data").mkdir()
    cal = work / "data" / "calib.txt"
    cal.write_text("some words to calibrate with " * 40)
    out = {
        "dotdot": work / "x" / ".." / "model",
        "symlink": tmp_path / "link",
        "contains": work,
        "inside": model_copy / "nvfp4",
        "calib-folder": work / "data",
    }[how]
    if how == "symlink":
        out.symlink_to(model_copy)
    before = _snapshot(work)
    assert _run(model_copy, out, "--overwrite", calib_file=cal) == 2
    err = capsys.readouterr().err
    want = "calibration file" if how == "calib-folder" else "model folder"
    assert "error:" in err and want in err, err
    assert _snapshot(work) == before


def test_overwrite_refuses_a_foreign_folder_even_empty_of_model(tiny, tmp_path, calib_txt, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8 not ours")
    assert _run(tiny, out, "--overwrite", calib_file=calib_txt) == 2
    assert "not written by scalesweep-quantize" in capsys.readouterr().err
    assert (out / "holiday.jpg").read_bytes() == b"\xff\xd8 not ours"


def test_overwrite_checks_run_before_the_model_loads(tiny, tmp_path, calib_txt, no_load):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "a.txt").write_text("x")
    assert _run(tiny, out, "--overwrite", calib_file=calib_txt) == 2
    assert _run(tiny, tiny / "sub", "--overwrite", calib_file=calib_txt) == 2


# -- 2. nothing quantized is an error ------------------------------------------------


def _gpt2(path: Path, n_positions: int = 64) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=320, n_embd=32, n_layer=2, n_head=2, n_positions=n_positions)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def test_conv1d_model_is_refused_with_reasons(tmp_path, capsys):
    src = _gpt2(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="nothing to quantize") as exc:
        quantize_model(src, tmp_path / "o", calib=calib_tokens(), num_samples=2, progress=False)
    assert "Conv1D" in str(exc.value) and "transformer.h.0.attn.c_attn" in str(exc.value)
    assert not (tmp_path / "o").exists()
    assert cli.main(["--model", str(src), "--dry-run", "--seq-len", "16"]) == 2  # lists, refuses
    out = capsys.readouterr()
    assert "transformer.h.1.mlp.c_fc: Conv1D" in out.out and "nothing to quantize" in out.err


def test_no_linear_with_in_features_multiple_of_16_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=320,
        hidden_size=40,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "odd")
    with pytest.raises(ValueError, match="nothing to quantize.*not a multiple of 16"):
        quantize_model(
            tmp_path / "odd", tmp_path / "o", calib=calib_tokens(), num_samples=2, progress=False
        )
    assert not (tmp_path / "o").exists()


# -- 3. not a causal LM, or already quantized -----------------------------------------


def test_encoder_without_lm_head_is_refused(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=320,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertModel(cfg).save_pretrained(tmp_path / "bert")
    assert _run(tmp_path / "bert", tmp_path / "o", calib_file=None) == 2
    assert "causal-LM head" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_already_quantized_input_is_refused(tiny, tmp_path, calib_txt, capsys, monkeypatch):
    ck = tmp_path / "ck"
    quantize_model(tiny, ck, calib=calib_tokens(), num_samples=2, seq_len=16, progress=False)
    assert _run(ck, tmp_path / "again", calib_file=calib_txt) == 2
    assert "already quantized" in capsys.readouterr().err
    (ck / "scalesweep.json").unlink()  # a stock compressed-tensors checkpoint
    with pytest.raises(ValueError, match="already quantized .compressed-tensors.; pass the bf16"):
        quantize_model(ck, tmp_path / "again", calib=calib_tokens(), progress=False)


# -- 4. calibration data ------------------------------------------------------------------


def test_binary_and_non_utf8_calibration_rejected(tiny, tmp_path, capsys, no_load):
    binf = tmp_path / "weights.bin"
    binf.write_bytes(b"\x00\x01\x02 hello" * 100)
    assert _run(tiny, tmp_path / "o", calib_file=binf) == 2
    assert "binary" in capsys.readouterr().err
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e.\n".encode("latin-1") * 20)
    assert _run(tiny, tmp_path / "o", calib_file=latin) == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert _run(tiny, tmp_path / "o", calib_file=tmp_path) == 2
    assert "is a directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_json_arrays_and_jsonl_fields(tmp_path):
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps(["first doc", "second doc"]))
    docs, how = data.read_calibration_file(arr)
    assert docs == ["first doc", "second doc"] and "JSON array" in how
    objs = tmp_path / "b.json"
    objs.write_text(json.dumps([{"text": "one", "id": 1}, {"text": "two", "id": 2}]))
    assert data.read_calibration_file(objs)[0] == ["one", "two"]
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"id": i, "content": f"doc {i}"}) for i in range(3)))
    with pytest.warns(data.CalibrationWarning, match="'content'"):
        docs, how = data.read_calibration_file(jl)
    assert docs == ["doc 0", "doc 1", "doc 2"] and "field 'content'" in how
    mixed = tmp_path / "d.jsonl"
    mixed.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"body": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:2: no 'text' field"):
        data.read_calibration_file(mixed)
    nostr = tmp_path / "e.json"
    nostr.write_text(json.dumps([{"n": 1}, {"n": 2}]))
    with pytest.raises(ValueError, match="no 'text' field and no other string field"):
        data.read_calibration_file(nostr)
    obj = tmp_path / "f.json"
    obj.write_text(json.dumps({"text": "not an array"}))
    with pytest.raises(ValueError, match="array of strings"):
        data.read_calibration_file(obj)
    bad = tmp_path / "g.json"
    bad.write_text("[1, 2")
    with pytest.raises(ValueError, match="not valid JSON"):
        data.read_calibration_file(bad)
    plain = tmp_path / "h.txt"  # text that merely starts with a bracket stays text
    plain.write_text("[1] A citation.\n\nAnother paragraph.")
    assert data.read_calibration_file(plain)[0] == ["[1] A citation.", "Another paragraph."]


def test_jsonl_field_and_token_shortfall_are_reported(tiny, tmp_path, capsys):
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"content": "Paris is lovely. " * 3}) for _ in range(2)))
    out = tmp_path / "o"
    rc = cli.main(
        [
            "--model",
            str(tiny),
            "--output",
            str(out),
            "--calib",
            str(jl),
            "--num-samples",
            "8",
            "--seq-len",
            "32",
        ]
    )
    assert rc == 0
    cap = capsys.readouterr()
    assert "warning:" in cap.err and "'content'" in cap.err and "fewer than the 256" in cap.err
    rep = json.loads((out / "quantization_report.json").read_text())
    cal = rep["calibration"]
    assert cal["requested_tokens"] == 256 and cal["tokens"] < 256
    assert any("fewer than the 256" in w for w in cal["warnings"])
    assert "field 'content'" in cal["source"]
    assert "warning: calibration data" in (out / "quantization_report.txt").read_text()


# -- 5. --seq-len within the model's positions ------------------------------------------


def test_seq_len_beyond_positions(tiny, tmp_path, calib_txt, capsys, no_load):
    assert _run(tiny, tmp_path / "o", "--seq-len", "512", calib_file=calib_txt) == 2
    assert "exceeds the 256 positions" in capsys.readouterr().err
    gpt2 = _gpt2(tmp_path / "gpt2", n_positions=32)
    assert _run(gpt2, tmp_path / "o", "--seq-len", "64", calib_file=calib_txt) == 2
    assert "exceeds the 32 positions" in capsys.readouterr().err


# -- 6. quantizer and plugin agree on head_dim ----------------------------------------


def _head_dim_8(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_kv_and_query_schemes_need_head_dim_multiple_of_16(tmp_path, monkeypatch):
    src = _head_dim_8(tmp_path / "hd8")
    for scheme in ("W4A4KV4", "W4A4KV4Q4"):
        with pytest.raises(ValueError, match="head_dim is 8"):
            quantize_model(src, tmp_path / "o", scheme=scheme, calib=calib_tokens(seq_len=16))
    ck = tmp_path / "w4a4"
    quantize_model(src, ck, scheme="W4A4", calib=calib_tokens(seq_len=16), progress=False)
    from scalesweep_vllm.plugin.metadata import (
        CheckpointError,
        CompressedTensorsInfo,
        ScaleSweepMetadata,
        resolve_settings,
    )

    cfg = json.loads((ck / "config.json").read_text())
    ct = CompressedTensorsInfo.parse(cfg["quantization_config"])
    meta = ScaleSweepMetadata.load(ck)  # informational attention entries: accepted
    assert meta.attention and next(iter(meta.attention.values())).head_dim == 8
    s = resolve_settings(ct, meta, str(ck))
    assert s.activations == "wmse" and s.kv_cache is None and s.query is None
    for var in ("SCALESWEEP_KV_CACHE", "SCALESWEEP_QUERY"):
        monkeypatch.setenv(var, "mse")
        with pytest.raises(CheckpointError, match="head_dim 8 is not a multiple of 16"):
            resolve_settings(ct, meta, str(ck))
        monkeypatch.delenv(var)


# -- 7. errors a user can act on --------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "gpu", "mps", "tpu:3"])
def test_bad_device_before_the_model_loads(tiny, tmp_path, calib_txt, device, capsys, no_load):
    assert _run(tiny, tmp_path / "o", "--device", device, calib_file=calib_txt) == 2
    err = capsys.readouterr().err
    assert "error: --device" in err and "Traceback" not in err


def test_read_only_parent(tiny, tmp_path, calib_txt, capsys, no_load):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert _run(tiny, ro / "out", calib_file=calib_txt) == 2
        assert "read-only" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)
    assert not list(ro.iterdir())


def test_not_enough_space_before_loading(tiny, tmp_path, calib_txt, capsys, monkeypatch, no_load):
    need = preflight.estimate_checkpoint_bytes(tiny)
    size = sum(f.stat().st_size for f in tiny.glob("*.safetensors"))
    assert 0.1 * size < need < size  # NVFP4 Linears, bf16 rest, from the fp32 headers alone
    real = shutil.disk_usage
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: real(p)._replace(free=need // 2))
    assert _run(tiny, tmp_path / "o", calib_file=calib_txt) == 2
    assert "not enough space" in capsys.readouterr().err


def test_disk_full_while_writing_leaves_nothing(tiny, tmp_path, calib_txt, capsys, monkeypatch):
    real = writer.save_file

    def full(tensors, path, **k):
        real(tensors, path, **k)
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(writer, "save_file", full)
    out = tmp_path / "o"
    assert _run(tiny, out, calib_file=calib_txt) == 2
    err = capsys.readouterr().err
    assert "error: No space left on device" in err and "Traceback" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]


def test_config_only_and_truncated_weights(tiny, tmp_path, calib_txt, capsys, no_load):
    only = tmp_path / "only-config"
    only.mkdir()
    shutil.copy(tiny / "config.json", only / "config.json")
    assert _run(only, tmp_path / "o", calib_file=calib_txt) == 2
    assert "no weights" in capsys.readouterr().err
    cut = tmp_path / "truncated"
    shutil.copytree(tiny, cut)
    f = cut / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert _run(cut, tmp_path / "o", calib_file=calib_txt) == 2
    assert "truncated safetensors" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# -- 9. GGUF, --quiet, the report's objective ---------------------------------------------


def test_gguf_paths(tmp_path, calib_txt, capsys, monkeypatch):
    folder = tmp_path / "g"
    folder.mkdir()
    (folder / "model.Q4_0.gguf").write_bytes(b"GGUF not really")
    assert _run(folder, tmp_path / "o", calib_file=calib_txt) == 2
    assert "GGUF file but no config.json" in capsys.readouterr().err
    monkeypatch.setenv("SCALESWEEP_CACHE", str(tmp_path / "cache"))
    assert _run(folder / "model.Q4_0.gguf", tmp_path / "o", calib_file=calib_txt) == 2
    assert "cannot convert this GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_gguf_file_is_converted_once_and_quantized(tiny, tmp_path, monkeypatch):
    """The conversion path (the real converter is the default model's, tested end to
    end there): a .gguf file lands as a bf16 folder in the cache, keyed by the file."""
    from scalesweep_vllm.quantize import assets

    calls = []

    def fake_convert(src, out):
        calls.append(src)
        for f in tiny.iterdir():
            shutil.copy(f, out / f.name)

    monkeypatch.setattr(assets, "_convert_gguf", fake_convert)
    monkeypatch.setenv("SCALESWEEP_CACHE", str(tmp_path / "cache"))
    g = tmp_path / "tiny.gguf"
    g.write_bytes(b"GGUF")
    for out in ("a", "b"):
        quantize_model(
            g, tmp_path / out, calib=calib_tokens(), num_samples=2, seq_len=16, progress=False
        )
    assert len(calls) == 1 and calls[0] == g.resolve()
    assert (tmp_path / "a" / "scalesweep.json").is_file()
    assert cli.default_output(str(g), "W4A4", "wmse").name == "tiny-nvfp4-W4A4-wmse"


def test_quiet_hides_transformers_progress(tiny, tmp_path, calib_txt, capfd):
    from transformers.utils import logging as tlog

    assert tlog.is_progress_bar_enabled()
    assert _run(tiny, tmp_path / "o", calib_file=calib_txt) == 0
    cap = capfd.readouterr()
    assert cap.out == "" and "Loading" not in cap.err and "%|" not in cap.err, cap.err
    assert tlog.is_progress_bar_enabled()  # restored


def test_report_says_what_the_sweep_minimises():
    rows = [
        {
            "name": "model.layers.0.mlp.up_proj",
            "shape": [32, 16],
            "weight_global_scale": 1.0,
            "input_global_scale": None,
            "mse_absmax": 1.0,
            "mse_scalesweep": 1.1,
            "mse_reduction": -0.1,
            "wmse_absmax": 1.0,
            "wmse_scalesweep": 0.5,
            "wmse_reduction": 0.5,
        }
    ]
    text = format_report({"header": {"objective": "wmse"}, "layers": rows})
    assert "minimises WMSE" in text and "may rise (negative red.)" in text
    assert "minimises plain MSE" in format_report({"header": {"objective": "mse"}, "layers": rows})
    text = format_report({"header": {"objective": "hessian"}, "layers": rows})
    assert "e^T H_b e" in text and "absmax" not in text.split("objective hessian")[1][:80]


def test_truncation_check_is_exact(tmp_path):
    """The header check accepts an intact file byte for byte and refuses one byte less."""
    f = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(3, 16), "b": torch.zeros(5)}, str(f))
    hdr = preflight._safetensors_header(f)
    assert set(hdr) - {"__metadata__"} == {"a", "b"}
    assert load_file(f)["a"].shape == (3, 16)
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        preflight._safetensors_header(f)
    assert os.path.getsize(f) > 8
