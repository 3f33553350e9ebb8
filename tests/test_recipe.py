"""The weight path's stages and its one recipe object: the Recipe's validation and
JSON round trip, the CLI's recipe (flags, --recipe from a checkpoint), every
objective against its reference function, a new objective as one class, and a
recorded recipe reproducing its checkpoint bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from _quantize_models import calib_tokens, save_tiny_model
from safetensors.torch import load_file

from scalesweep_vllm import hessian_sweep, nvfp4, sweep
from scalesweep_vllm.quantize import cli, objectives
from scalesweep_vllm.quantize.gptq import GPTQConfig
from scalesweep_vllm.quantize.recipe import Recipe
from scalesweep_vllm.quantize.weights import GroupMember, quantize_group


def test_recipe_validates_and_normalises():
    r = Recipe(scheme="w4a16", rope_bias=True, gptq={"scales": "inloop"}, hessian_damp=1)
    assert r.scheme == "W4A16" and r.rope_bias == "on"
    assert r.gptq == GPTQConfig(scales="inloop") and r.hessian_damp == 1.0
    bad = [
        ({"scheme": "W3A3"}, "unknown scheme"),
        ({"objective": "gptq"}, "unknown objective"),
        ({"global_scale_convention": "nvidia"}, "convention"),
        ({"runtime_global_scale_convention": "nvidia"}, "convention"),
        ({"hessian_damp": 0.0}, "hessian_damp"),
        ({"hessian_damp": float("nan")}, "hessian_damp"),
        ({"rope_bias": "maybe"}, "rope_bias"),
        ({"num_samples": 0}, "num_samples"),
        ({"seq_len": True}, "seq_len"),
        ({"gptq": {"damp": 0}}, "damp"),
        ({"gptq": {"actorder": "column", "scales": "inloop"}}, "fixed scales"),
        ({"gptq": {"actorder": "row"}}, "actorder"),
    ]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            Recipe(**kw)
    with pytest.raises(TypeError, match="unknown recipe options"):
        Recipe().replace(objectve="mse")
    from scalesweep_vllm.quantize import quantize_model

    with pytest.raises(TypeError, match="recipe must be a Recipe"):
        quantize_model(None, None, "W4A16", in_memory=True)
    with pytest.raises(TypeError, match="unknown recipe options"):
        quantize_model(None, None, in_memory=True, objectiv="mse")


def test_recipe_json_round_trip():
    for r in (
        Recipe(),
        Recipe(objective="hessian", hessian_damp=0.01, gptq=True, scheme="W4A4KV4Q4"),
        Recipe(gptq={"actorder": "column", "sequential": False}, global_scale_convention="paper"),
        Recipe(
            global_scale_convention="paper", runtime_global_scale_convention="compressed-tensors"
        ),
    ):
        back = Recipe.from_json(json.loads(json.dumps(r.to_json())))
        assert back == r
    with pytest.raises(ValueError, match="unknown recipe fields"):
        Recipe.from_json({**Recipe().to_json(), "extra": 1})
    assert Recipe().runtime_method == "wmse" and not Recipe().needs_hessian
    assert Recipe(objective="hessian").runtime_method == "wmse"
    assert Recipe(objective="hessian").needs_hessian and Recipe(gptq=True).needs_hessian
    assert Recipe(objective="mse").runtime_method == "mse"


def _args(*argv):
    return cli.build_parser().parse_args(list(argv))


def test_cli_recipe_from_flags_and_from_a_checkpoint(tmp_path):
    assert cli.recipe_from_args(_args()) == Recipe()
    r = cli.recipe_from_args(
        _args(
            "--scheme", "W4A16", "--objective", "hessian", "--hessian-damp", "0.001",
            "--gptq", "--gptq-scales", "inloop", "--global-scale", "paper",
            "--num-samples", "8",
        )
    )  # fmt: skip
    assert r == Recipe(
        scheme="W4A16",
        objective="hessian",
        hessian_damp=0.001,
        gptq=GPTQConfig(scales="inloop"),
        global_scale_convention="paper",
        num_samples=8,
    )
    r = cli.recipe_from_args(_args("--gptq", "--gptq-order-by", "column"))
    assert r.gptq == GPTQConfig(actorder="column")
    assert cli.recipe_from_args(_args("--gptq", "--no-gptq-actorder")).gptq.actorder is False
    for argv, match in (
        (("--gptq", "--gptq-order-by", "column", "--no-gptq-actorder"), "contradicts"),
        (("--gptq-scales", "inloop"), "without --gptq"),
        (("--gptq", "--gptq-order-by", "column", "--gptq-scales", "inloop"), "fixed scales"),
        (("--hessian-damp", "20"), "hessian_damp"),
    ):
        with pytest.raises(ValueError, match=match):
            cli.recipe_from_args(_args(*argv))
    # --recipe: a recorded recipe (file or checkpoint folder), flags on top
    rec = Recipe(objective="mse", gptq={"damp": 0.05}, scheme="W4A16")
    f = tmp_path / "r.json"
    f.write_text(json.dumps(rec.to_json()))
    assert cli.recipe_from_args(_args("--recipe", str(f))) == rec
    got = cli.recipe_from_args(_args("--recipe", str(f), "--scheme", "W4A4", "--gptq-damp", "0.1"))
    assert got == rec.replace(scheme="W4A4", gptq=GPTQConfig(damp=0.1))
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "scalesweep.json").write_text(json.dumps({"scalesweep_vllm_version": "x"}))
    with pytest.raises(ValueError, match="predates"):
        cli.recipe_from_args(_args("--recipe", str(ck)))
    with pytest.raises(FileNotFoundError):
        cli.recipe_from_args(_args("--recipe", str(tmp_path / "none")))
    assert cli.main(["--recipe", str(tmp_path / "none"), "--dry-run"]) == 2


def _weights(seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 64, generator=gen) * torch.rand(24, 1, generator=gen)
    x = torch.randn(200, 64, generator=gen) @ (
        torch.eye(64) + 0.3 * torch.randn(64, 64, generator=gen)
    )
    return w, x


def test_each_objective_is_its_reference():
    """Every registered objective's scales and codes are the reference function's."""
    w, x = _weights()
    g = nvfp4.global_scale(float(w.abs().max()), "compressed-tensors")
    diag = x.square().mean(0)
    h = x.T @ x / x.shape[0]
    blocks = torch.stack([h[i : i + 16, i : i + 16] for i in range(0, 64, 16)])
    refs = {
        "absmax": sweep.absmax_scales(w, g),
        "mse": sweep.sweep_scales(w, g),
        "wmse": sweep.sweep_scales(w, g, diag),
        "four_over_six": sweep.four_over_six_scales(w, g),
        "hessian": hessian_sweep.hessian_sweep_scales(
            w, g, hessian_sweep.hessian_factors(blocks, damp=0.01), exhaustive=True
        ),
    }
    assert set(refs) == set(objectives.REGISTRY)
    for name, ref in refs.items():
        obj = objectives.get_objective(name, hessian_damp=0.01)
        packed, scales = obj.quantize(w, g, diag, obj.prepare(h, 200, "w"))
        assert torch.equal(scales.view(torch.uint8), ref.view(torch.uint8)), name
        assert torch.equal(nvfp4.unpack_fp4(packed), sweep.quantize_codes(w, g, ref)), name
    with pytest.raises(ValueError, match="no calibration Hessian"):
        objectives.get_objective("hessian").prepare(None, 0, "layer.x")
    with pytest.raises(ValueError, match="choose one of absmax, mse, wmse, hessian"):
        objectives.get_objective("nope")


def test_a_new_objective_is_one_class(monkeypatch):
    """A subclass registered under a new name is used by the weight path as it is."""
    monkeypatch.setattr(objectives, "REGISTRY", dict(objectives.REGISTRY))

    @objectives.register
    class Eighths(objectives.Objective):
        """amax / 8 per block (worse than AbsMax: a test objective)."""

        name = "eighths"

        def quantize(self, w, g_w, diag, prepared):
            scales = sweep._codes_to_scales(
                sweep._absmax_codes_blocks(w.abs().reshape(-1, 16), g_w, 8.0).reshape(
                    w.shape[0], -1
                )
            )
            return nvfp4.pack_fp4(sweep.quantize_codes(w, g_w, scales)), scales

    w, x = _weights(1)
    member = GroupMember("l", w, x.square().mean(0), 1.0)
    (q,) = quantize_group([member], "eighths", "paper", False)
    g = nvfp4.global_scale(float(w.abs().max()), "paper")
    want = sweep._absmax_codes_blocks(w.abs().reshape(-1, 16), g, 8.0).reshape(24, -1)
    assert torch.equal(q.weight_scale.view(torch.uint8).to(torch.int64), want)
    assert Recipe(objective="eighths").objective == "eighths"


@pytest.mark.parametrize("objective", ["hessian", "wmse"])
def test_a_recorded_recipe_reproduces_its_checkpoint(tmp_path, objective):
    """scalesweep.json records the whole recipe; `--recipe CKPT` on the same model and
    calibration writes bit-identical tensors (the recipe decides every number)."""
    src = save_tiny_model("qwen2", tmp_path / "src")
    ids = calib_tokens()
    torch.save(ids, tmp_path / "ids.pt")
    first = tmp_path / "a"
    from scalesweep_vllm.quantize import quantize_model

    rec = Recipe(
        scheme="W4A4KV4Q4",
        objective=objective,
        gptq={"scales": "inloop", "block_size": 32} if objective == "wmse" else None,
        global_scale_convention="paper",
        hessian_damp=0.001,
        num_samples=8,
        seq_len=48,
    )
    quantize_model(src, first, rec, calib=ids, progress=False)
    meta = json.loads((first / "scalesweep.json").read_text())
    assert Recipe.from_json(meta["recipe"]) == rec
    report = json.loads((first / "quantization_report.json").read_text())
    assert report["header"]["recipe"] == rec.to_json()
    second = tmp_path / "b"
    quantize_model(src, second, cli.load_recipe(first), calib=ids, progress=False)
    ta, tb = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k].view(torch.uint8), tb[k].view(torch.uint8)), k


def test_runtime_global_scale_convention_moves_only_runtime_scales(tmp_path):
    """Paper weights with compressed-tensors runtime parts: the weights and their global
    scales are the all-paper recipe's; every input and q/k/v global scale is 448/256
    times its all-paper value (the same calibrated amax under the other target)."""
    from scalesweep_vllm.quantize import quantize_model

    src = save_tiny_model("llama", tmp_path / "src")
    ids = calib_tokens()
    base = Recipe(scheme="W4A4KV4Q4", global_scale_convention="paper", num_samples=8, seq_len=48)
    outs = {}
    for rt in (None, "compressed-tensors"):
        rec = base.replace(runtime_global_scale_convention=rt)
        rep = quantize_model(src, None, rec, calib=ids, progress=False, in_memory=True)
        outs[rt] = rep["checkpoint"]
    a, b = outs[None], outs["compressed-tensors"]
    for k, t in a["tensors"].items():
        if k.endswith("input_global_scale"):
            assert torch.allclose(b["tensors"][k], t * 448 / 256, rtol=1e-6), k
        else:
            assert torch.equal(b["tensors"][k].view(torch.uint8), t.view(torch.uint8)), k
    for prefix, entry in a["meta"]["attention"].items():
        for c in "qkv":
            key = f"{c}_global_scale"
            assert b["meta"]["attention"][prefix][key] == pytest.approx(entry[key] * 448 / 256)
    assert b["meta"]["runtime_global_scale_convention"] == "compressed-tensors"
    assert a["meta"]["runtime_global_scale_convention"] == "paper"
