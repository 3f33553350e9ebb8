"""The evaluation (issue 16) on the tiny random model and a few hundred tokens."""

from __future__ import annotations

import pytest
import torch
from plugin_support import tiny_checkpoint, tiny_model_dir

from scalesweep_vllm.evaluate import Checkpoint, evaluate, quantize_recipe
from scalesweep_vllm.quantize import assets
from scalesweep_vllm.quantize.pipeline import DEFAULT_GLOBAL_SCALE

TOKENS, SEQ_LEN = 256, 64
CALIB = dict(num_samples=16, seq_len=64)  # what tiny_checkpoint uses


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("eval-cache")


def _eval(model_dir, cache, **kw):
    return evaluate(
        model=str(model_dir), tokens=TOKENS, seq_len=SEQ_LEN, progress=False, cache=cache, **kw
    )


def test_calibration_and_evaluation_texts_are_disjoint():
    cal, ev = assets.calibration_texts(), assets.evaluation_texts()
    assert len(cal) > 7000 and len(ev) > 1500
    assert not set(cal) & set(ev)
    # and the evaluation reads the last 2,000 articles only, in file order
    arts = assets._articles()
    assert ev == [t for t in arts[-assets.EVALUATION_ARTICLES :] if t.strip()]
    assert len(arts) - assets.EVALUATION_ARTICLES >= assets.CALIBRATION_ARTICLES


def test_bf16_against_itself_is_zero(model_dir, cache):
    res = _eval(model_dir, cache)
    (row,) = res["runs"]
    assert row["kld_mean"] == 0.0 and row["kld_p99"] == 0.0 and row["top1"] == 1.0
    assert row["ppl"] == pytest.approx(res["bf16"]["ppl"], rel=0, abs=0)
    assert res["positions"] == TOKENS // SEQ_LEN * (SEQ_LEN - 1)


def test_in_memory_recipe_equals_written_checkpoint(model_dir, cache, tmp_path_factory):
    """The recipe quantized in memory and the checkpoint the quantizer writes for the
    same recipe (tiny_checkpoint: wmse, the default global scale, W4A4KV4Q4) give the
    same numbers."""
    ckpt_dir = tiny_checkpoint(tmp_path_factory, "W4A4KV4Q4")
    mem = quantize_recipe(
        model_dir,
        "wmse",
        DEFAULT_GLOBAL_SCALE,
        "cpu",
        False,
        assets.calibration_texts()[:32],
        **CALIB,
    )
    disk = Checkpoint.from_dir(ckpt_dir)
    assert set(mem.tensors) == set(disk.tensors)
    for k, t in disk.tensors.items():
        assert torch.equal(mem.tensors[k].view(torch.uint8), t.view(torch.uint8)), k
    a = _eval(model_dir, cache, checkpoint=mem, settings=["W4A4KV4Q4", "W4A16"])
    b = _eval(model_dir, cache, checkpoint=ckpt_dir, settings=["W4A4KV4Q4", "W4A16"])
    for ra, rb in zip(a["runs"], b["runs"], strict=True):
        for key in ("ppl", "kld_mean", "kld_p99", "top1"):
            assert ra[key] == rb[key], (ra["setting"], key)
    full, w4a16 = a["runs"]
    # quantizing more moves further from BF16 (perplexity: on a random model it sits
    # near the vocabulary size and moves either way; see the next test)
    assert full["kld_mean"] > w4a16["kld_mean"] > 0


def test_recorded_recipe_quantizes_the_same_checkpoint(model_dir, cache, tmp_path_factory):
    """The recipe a checkpoint records (scalesweep.json), quantized in memory by the
    evaluation (``scalesweep-eval --recipe-file``), gives its tensors bit for bit."""
    from scalesweep_vllm.quantize.cli import load_recipe

    ckpt_dir = tiny_checkpoint(tmp_path_factory, "W4A4KV4Q4")
    rec = load_recipe(ckpt_dir)
    mem = quantize_recipe(model_dir, rec, progress=False, calib=assets.calibration_texts()[:32])
    disk = Checkpoint.from_dir(ckpt_dir)
    assert set(mem.tensors) == set(disk.tensors)
    for k, t in disk.tensors.items():
        assert torch.equal(mem.tensors[k].view(torch.uint8), t.view(torch.uint8)), k
    res = _eval(
        model_dir, cache, recipe=rec, settings=["W4A16"], calib=assets.calibration_texts()[:32]
    )
    assert res["source"]["recipe"] == rec.to_json() and res["runs"][0]["kld_mean"] > 0


def test_checkpoint_without_metadata_runs_absmax_activations(tmp_path_factory):
    """Another tool's checkpoint (no scalesweep.json): AbsMax activations with its
    input_global_scale, nothing else, as stock vLLM runs it."""
    from scalesweep_vllm.evaluate import runtime_settings

    ck = Checkpoint.from_dir(tiny_checkpoint(tmp_path_factory, "W4A4KV4Q4"))
    ck.meta = None
    rs = runtime_settings(ck)
    assert (rs.activations, rs.kv_cache, rs.query) == ("absmax", None, None)
    with pytest.raises(ValueError, match="needs kv_cache"):
        runtime_settings(ck, "W4A4KV4")


@pytest.mark.slow
def test_quantized_perplexity_is_above_bf16_on_the_real_model(tmp_path):
    """On the real default model (a random one has no perplexity to lose): 512
    held-out tokens, 8 calibration samples; about a minute."""
    res = evaluate(
        recipe="wmse",
        settings=["W4A16", "W4A4KV4Q4"],
        tokens=512,
        seq_len=256,
        progress=False,
        cache=tmp_path,
        num_samples=8,
    )
    w4a16, full = res["runs"]
    assert res["bf16"]["ppl"] < w4a16["ppl"] < full["ppl"]
    assert 0 < w4a16["kld_mean"] < full["kld_mean"]


def test_build_model_decodes_every_weight_and_refuses_a_mismatch(tmp_path_factory):
    """Weights are decoded one at a time into the model: the result equals the
    compressed-tensors decode of every packed weight, and a tensor the config does
    not have (or of another shape) is refused by name."""
    from scalesweep_vllm import kernels
    from scalesweep_vllm.evaluate import build_model

    ck = Checkpoint.from_dir(tiny_checkpoint(tmp_path_factory, "W4A16"))
    model = build_model(ck, dtype=torch.float32)
    sd, got = ck.tensors, dict(model.named_parameters(remove_duplicate=False))
    packed = [n[: -len(".weight_packed")] for n in sd if n.endswith(".weight_packed")]
    assert packed
    for p in packed:
        want = kernels.dequantize(
            sd[p + ".weight_packed"],
            sd[p + ".weight_scale"],
            sd[p + ".weight_global_scale"].float(),
            torch.float32,
        )
        assert torch.equal(got[p + ".weight"], want), p
    assert torch.equal(got["model.norm.weight"], sd["model.norm.weight"].float())
    for bad in ({"model.extra.weight": torch.zeros(3)}, {"model.norm.weight": torch.zeros(7)}):
        ck2 = Checkpoint(ck.config, {**sd, **bad}, ck.meta, ck.vectors, "bad")
        with pytest.raises(ValueError, match=r"does not match its config.*unexpected"):
            build_model(ck2, dtype=torch.float32)
