"""Tensor-parallel sharding of the plugin's tensors, proven against vLLM's own layers
without an engine.

vLLM's parallel Linear classes are built with a faked TP world (size and rank patched
where vLLM reads them) and load tensors through their own weight loaders, so what a
rank holds is what vLLM gives it. Checked against that:
- :func:`head_slice` (the rows of the per-head Q/K/V vectors a rank uses), for split
  and replicated KV heads;
- the plugin's Linear on the real tiny checkpoint: packed weights and fp8 block scales
  sliced with the rows (column-parallel) or the input features (row-parallel), the
  fused global scales, the row-parallel WMSE input vector slice, and that each rank's
  runtime-quantized input slice is the slice of the whole input's quantization (blocks
  of 16 never straddle ranks), so the ranks' partial GEMMs sum to the full one.
The engine-level TP=2 run is tests/test_plugin_tp.py.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

from plugin_support import tiny_checkpoint  # noqa: E402

from scalesweep_vllm import kernels  # noqa: E402
from scalesweep_vllm.plugin.attention import head_slice  # noqa: E402


@contextlib.contextmanager
def fake_tp(size: int, rank: int):
    """vLLM's TP world size and rank, patched in every module that reads them here."""
    import vllm.distributed as dist
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.parameter as parameter
    from vllm.config import VllmConfig, set_current_vllm_config

    mods = (dist, linear, parameter)
    saved = [
        (m, n, getattr(m, n))
        for m in mods
        for n in ("get_tensor_model_parallel_world_size", "get_tensor_model_parallel_rank")
    ]
    for m in mods:
        m.get_tensor_model_parallel_world_size = lambda: size
        m.get_tensor_model_parallel_rank = lambda: rank
    try:
        with set_current_vllm_config(VllmConfig()):
            yield
    finally:
        for m, n, f in saved:
            setattr(m, n, f)


# -- head_slice ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("heads", "kv_heads", "tp"),
    [(4, 2, 2), (4, 1, 2), (4, 4, 2), (8, 2, 4), (8, 1, 4), (8, 2, 8), (9, 3, 3), (6, 6, 1)],
)
def test_head_slice_is_what_vllm_loads(heads, kv_heads, tp):
    """Rows tagged with their head index, loaded by QKVParallelLinear's own loader."""
    from vllm.model_executor.layers.linear import QKVParallelLinear

    d, hidden = 16, 32
    for rank in range(tp):
        with fake_tp(tp, rank):
            lin = QKVParallelLinear(
                hidden, d, heads, kv_heads, bias=False, params_dtype=torch.float32
            )
        for shard, total, offset in (("q", heads, 0), ("k", kv_heads, 1000), ("v", kv_heads, 2000)):
            rows = torch.arange(total).repeat_interleave(d).float() + offset
            lin.weight_loader(lin.weight, rows[:, None].expand(-1, hidden).clone(), shard)
        held = lin.weight[:, 0].reshape(-1, d)[:, 0].long()  # one tag per head row block
        q, kv = lin.num_heads, lin.num_kv_heads
        want_q = torch.arange(heads)[head_slice(heads, q, rank, tp)]
        want_kv = torch.arange(kv_heads)[head_slice(kv_heads, kv, rank, tp)]
        assert held[:q].tolist() == want_q.tolist()
        assert (held[q : q + kv] - 1000).tolist() == want_kv.tolist()
        assert (held[q + kv :] - 2000).tolist() == want_kv.tolist()


# -- the plugin's Linear on the real checkpoint -------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory, "W4A4KV4Q4")


@pytest.fixture(scope="module")
def tensors(ckpt):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(ckpt.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def hf(ckpt):
    """The checkpoint's config.json."""
    return json.loads((ckpt / "config.json").read_text())


def _config(ckpt, hf):
    from scalesweep_vllm.plugin.config import ScaleSweepConfig

    cfg = ScaleSweepConfig.from_config(hf["quantization_config"])
    cfg.maybe_update_config(str(ckpt))
    # what vLLM sets from LlamaForCausalLM.packed_modules_mapping before building layers
    cfg.packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    return cfg


def _layer(kind: str, cfg, tp: int, rank: int, hf):
    """One of the tiny model's Linear layers as vLLM builds it, with the plugin's method."""
    from vllm.model_executor.layers.linear import (
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )

    h, inter, d = hf["hidden_size"], hf["intermediate_size"], hf["head_dim"]
    p = "model.layers.0"
    with fake_tp(tp, rank):
        if kind == "qkv_proj":
            return QKVParallelLinear(
                h,
                d,
                hf["num_attention_heads"],
                hf["num_key_value_heads"],
                bias=False,
                quant_config=cfg,
                prefix=f"{p}.self_attn.qkv_proj",
                params_dtype=torch.float32,
            )
        if kind == "gate_up_proj":
            return MergedColumnParallelLinear(
                h,
                [inter, inter],
                bias=False,
                quant_config=cfg,
                prefix=f"{p}.mlp.gate_up_proj",
                params_dtype=torch.float32,
            )
        full_in = hf["num_attention_heads"] * d if kind == "o_proj" else inter
        where = "self_attn" if kind == "o_proj" else "mlp"
        return RowParallelLinear(
            full_in,
            h,
            bias=False,
            quant_config=cfg,
            prefix=f"{p}.{where}.{kind}",
            params_dtype=torch.float32,
        )


SHARDS = {
    "qkv_proj": [("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v")],
    "gate_up_proj": [("mlp.gate_proj", 0), ("mlp.up_proj", 1)],
    "o_proj": [("self_attn.o_proj", None)],
    "down_proj": [("mlp.down_proj", None)],
}


def _load(layer, tensors, kind, tp, rank):
    with fake_tp(tp, rank):
        for name, shard in SHARDS[kind]:
            for suffix in (
                "weight_packed",
                "weight_scale",
                "weight_global_scale",
                "input_global_scale",
            ):
                param = getattr(layer, suffix)
                t = tensors[f"model.layers.0.{name}.{suffix}"]
                if shard is None:
                    param.weight_loader(param, t)
                else:
                    param.weight_loader(param, t, shard)


def _expected_rows(tensors, kind, suffix, tp, rank, hf):
    """The checkpoint rows a rank must hold for a column-parallel layer (vLLM's rules)."""
    parts = []
    for name, shard in SHARDS[kind]:
        t = tensors[f"model.layers.0.{name}.{suffix}"]
        if kind == "qkv_proj":
            d = hf["head_dim"]
            total = hf["num_attention_heads"] if shard == "q" else hf["num_key_value_heads"]
            local = total // tp if total >= tp else 1
            sl = head_slice(total, local, rank, tp)
            parts.append(t.reshape(total, d, -1)[sl].reshape(-1, t.shape[-1]))
        else:
            n = t.shape[0] // tp
            parts.append(t[rank * n : (rank + 1) * n])
    return torch.cat(parts)


@pytest.mark.parametrize("kind", ["qkv_proj", "gate_up_proj", "o_proj", "down_proj"])
def test_packed_weights_scales_and_vectors_per_rank(kind, ckpt, tensors, hf):
    cfg = _config(ckpt, hf)
    tp = 2
    for rank in range(tp):
        layer = _layer(kind, cfg, tp, rank, hf)
        _load(layer, tensors, kind, tp, rank)
        names = [f"model.layers.0.{n}" for n, _ in SHARDS[kind]]
        gs = [float(tensors[f"{n}.weight_global_scale"]) for n in names]
        assert layer.weight_global_scale.tolist() == gs  # one per fused shard, all loaded
        assert len(set(gs)) == 1  # fused partners share one (the checkpoint's convention)
        if kind in ("o_proj", "down_proj"):  # row-parallel: input features split
            full = tensors[f"{names[0]}.weight_packed"]
            k2 = full.shape[1] // tp
            assert torch.equal(layer.weight_packed, full[:, rank * k2 : (rank + 1) * k2])
            sc = tensors[f"{names[0]}.weight_scale"].view(torch.uint8)
            k16 = sc.shape[1] // tp
            assert torch.equal(
                layer.weight_scale.view(torch.uint8), sc[:, rank * k16 : (rank + 1) * k16]
            )
            vec = cfg.meta.vectors[f"{names[0]}.input_weight"]
            k = vec.numel() // tp
            assert torch.equal(layer.scalesweep_input_weight, vec[rank * k : (rank + 1) * k])
        else:  # column-parallel: output rows split by vLLM's rules, input whole
            for suffix, view in (("weight_packed", None), ("weight_scale", torch.uint8)):
                want = _expected_rows(tensors, kind, suffix, tp, rank, hf)
                got = getattr(layer, suffix)
                if view is not None:
                    want, got = want.view(view), got.view(view)
                assert torch.equal(got, want), f"{kind} rank {rank} {suffix}"
            want_vec = sum(cfg.meta.vectors[f"{n}.input_weight"] for n in names)
            assert torch.equal(layer.scalesweep_input_weight, want_vec)


@pytest.mark.parametrize("kind", ["o_proj", "down_proj"])
def test_row_parallel_ranks_sum_to_the_whole(kind, ckpt, tensors, hf):
    """Each rank quantizes its slice of the input with its vector slice; that is the
    slice of the whole input's quantization, bit for bit (blocks of 16 never straddle
    ranks), so the ranks' partial GEMMs add up to the full quantized GEMM up to the
    fp32 summation order (within each rank's GEMM and of the all-reduce's one sum)."""
    cfg = _config(ckpt, hf)
    name = f"model.layers.0.{SHARDS[kind][0][0]}"
    w = kernels.dequantize(
        tensors[f"{name}.weight_packed"],
        tensors[f"{name}.weight_scale"],
        tensors[f"{name}.weight_global_scale"].float(),
        torch.float32,
    )
    k = w.shape[1]
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(3)) * 3
    g = tensors[f"{name}.input_global_scale"].float().reshape(())
    xq = kernels.fake_quantize(x, g, "wmse", cfg.meta.vectors[f"{name}.input_weight"])
    tp, parts = 2, []
    for rank in range(tp):
        layer = _layer(kind, cfg, tp, rank, hf)
        _load(layer, tensors, kind, tp, rank)
        with fake_tp(tp, rank):
            layer.quant_method.process_weights_after_loading(layer)
        kr = layer.input_size_per_partition
        assert kr == k // tp
        cols = slice(rank * kr, (rank + 1) * kr)
        xs = x[:, cols]
        mine = kernels.fake_quantize(
            xs, layer.scalesweep_input_gs, "wmse", layer.scalesweep_input_weight
        )
        assert torch.equal(mine, xq[:, cols])
        with fake_tp(tp, rank):
            parts.append(layer.quant_method.apply(layer, xs))
    y_tp = parts[0] + parts[1]  # the all-reduce of two ranks
    y = torch.nn.functional.linear(xq, w)
    # |fl(sum) - sum| <= k * eps * sum |x_i w_i| for any summation order (k terms)
    bound = k * torch.finfo(torch.float32).eps * (xq.abs() @ w.abs().T)
    assert ((y_tp - y).abs() <= bound).all()
    assert (y_tp - y).abs().max() < 1e-3 * y.abs().max()
