#!/usr/bin/env python
"""NVIDIA Model Optimizer's NVFP4 recipes on the default model, run by ModelOpt itself
(in its own venv: ``bash scripts/setup-peers.sh``), exported with its unified HF export
for ``scalesweep-eval --checkpoint``.

    .venv/bin/python benchmarks/peers_llmcompressor.py --export-tokens peers/calib_tokens.pt
    .venv-modelopt/bin/python benchmarks/peers_modelopt.py --tokens peers/calib_tokens.pt \\
        --model ~/.cache/scalesweep_vllm/SmolLM2-135M-Instruct --out peers/

Recipes (W4A4: NVFP4 weights and NVFP4 dynamic-block inputs, so the export has
``input_scale``; lm_head, embeddings and KV left alone by its default exclusions):

* ``modelopt-nvfp4-max``: ``configs/ptq/presets/model/nvfp4`` (``mtq.NVFP4_DEFAULT_CFG``).
* ``modelopt-nvfp4-mse-sweep``: ``.../nvfp4_w4a4_weight_mse_fp8_sweep``
  (``algorithm: {method: mse, fp8_scale_sweep: true}``).
* ``modelopt-nvfp4-local-hessian``: ``.../nvfp4_w4a4_weight_local_hessian``.
* ``modelopt-nvfp4-gptq``: ``general/ptq/nvfp4_default-kv_none-gptq`` (layerwise GPTQ,
  which max-calibrates scales first; 0.47 has no Local-Hessian + GPTQ), its
  ``layerwise.checkpoint_dir`` (per-layer resume files) at ``<out>/<name>.layerwise_ckpts``:
  a killed run resumes from its last finished layer; removed after the export.

The forward loop feeds each calibration row alone (batch 1, ``use_cache=False``: the
layerwise GPTQ replays layers with a cleared KV cache). One torch thread.

CPU patch (ModelOpt's NVFP4 fake-quant exists only as Triton kernels launched on CUDA;
nothing in its installed files is edited, the patch is applied at runtime here):

1. ``modelopt.torch.kernels.quantization.gemm``: ``IS_AVAILABLE = True`` and
   ``static_blockwise_fp4_fake_quant`` = :func:`static_fp4_fake_quant_cpu`, the launcher's
   torch part (``compute_fp4_scales``, via ModelOpt's own ``scaled_e4m3_impl`` /
   ``reduce_amax``) plus ``static_blockwise_fp4_fake_quant_kernel`` in torch;
   ``fp4_fake_quant_block`` = :func:`dynamic_fp4_fake_quant_cpu`, the Hopper
   ``fp4_fake_quant_kernel`` in torch. (``IS_AVAILABLE`` is read at call time only by
   ``tensor_quant``; the HF plugin bound it at import, before the patch.)
2. ``modelopt.torch.quantization.tensor_quant.dynamic_block_quantize_op``: for a CPU
   tensor in NVFP4 (E2M1 values, E4M3 scales) with an amax it does what
   ``_dynamic_block_quantize_impl`` does on a Hopper GPU (``amax.amax()`` when per-block,
   then ``fp4_fake_quant_block(inputs, amax)``) without its "amax must be a CUDA tensor"
   assert; any other call goes to the original op.

``--verify-kernels`` checks both CPU functions bit for bit against ModelOpt's own Triton
kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, ``triton`` importable), on
random and edge inputs; see :func:`verify_kernels` for what the interpreter needs.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from peers_args import add_dtype  # benchmarks/ (the script's folder) is on sys.path

RECIPES = {
    "modelopt-nvfp4-max": {"preset": "configs/ptq/presets/model/nvfp4"},
    "modelopt-nvfp4-mse-sweep": {
        "preset": "configs/ptq/presets/model/nvfp4_w4a4_weight_mse_fp8_sweep"
    },
    "modelopt-nvfp4-local-hessian": {
        "preset": "configs/ptq/presets/model/nvfp4_w4a4_weight_local_hessian"
    },
    "modelopt-nvfp4-gptq": {
        "recipe": "general/ptq/nvfp4_default-kv_none-gptq",
        "layerwise_checkpoint_dir": True,  # <out>/<name>.layerwise_ckpts
    },
    # ModelOpt's stacking (its ptq.md: "mse + gptq combines an MSE-searched weight scale
    # with GPTQ's layerwise update"): the Local-Hessian preset's quant_cfg, its algorithm
    # then the GPTQ recipe's, as a list (QuantizeAlgoCfgType accepts one)
    "modelopt-nvfp4-local-hessian-gptq": {
        "stack": ["modelopt-nvfp4-local-hessian", "modelopt-nvfp4-gptq"],
        "layerwise_checkpoint_dir": True,
    },
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
PATCHED = [
    "modelopt.torch.kernels.quantization.gemm.IS_AVAILABLE = True",
    "modelopt.torch.kernels.quantization.gemm.static_blockwise_fp4_fake_quant = "
    "CPU torch port of fp4_kernel.static_blockwise_fp4_fake_quant (launcher + "
    "static_blockwise_fp4_fake_quant_kernel)",
    "modelopt.torch.kernels.quantization.gemm.fp4_fake_quant_block = CPU torch port of "
    "fp4_kernel_hopper.fp4_fake_quant_block (launcher + fp4_fake_quant_kernel)",
    "modelopt.torch.quantization.tensor_quant.dynamic_block_quantize_op = wrapper: CPU "
    "NVFP4 with amax -> _dynamic_block_quantize_impl's Triton branch without the "
    "'amax must be a CUDA tensor' assert; everything else -> the original op",
]


# --------------------------------------------------------------------------- CPU kernels


def _fp4_qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``where(x >= 0, q, -q) * scale`` with ``q = fp4_round_magnitude(|x| / scale)``
    (``nvfp4_quant``), in fewer passes: its thresholds are round-half-even on the E2M1
    grid, i.e. ``round(r / step) * step`` with the power-of-two ``step`` = half the
    binade of ``r`` (at least 0.5), saturated at 6. ``x + 0.0`` turns -0.0 into +0.0
    (``x >= 0`` holds for it), the clamp to +-8 maps inf to 6, NaN gives -6 (its
    ``x >= 0`` is false and every threshold test fails)."""
    r = (x + 0.0) / scale
    r.clamp_(-8.0, 8.0)
    step = (r.view(torch.int32) & 0x7F800000).view(torch.float32) * 0.5
    step.clamp_(min=0.5)
    q = torch.round(r / step).mul_(step).clamp_(-6.0, 6.0).nan_to_num_(nan=-6.0)
    return q.mul_(scale)


def static_fp4_fake_quant_cpu(
    x,
    amax,
    global_amax=None,
    quantize_block_scales=True,
    fp8_max_for_normalization=448.0,
    out_dtype=None,
):
    """``fp4_kernel.static_blockwise_fp4_fake_quant`` on the CPU, same arithmetic in fp32."""
    from modelopt.torch.quantization.tensor_quant import scaled_e4m3_impl
    from modelopt.torch.quantization.utils import reduce_amax

    n_blocks = amax.numel()
    if x.numel() % n_blocks != 0:
        raise ValueError(f"x.numel() ({x.numel()}) is not divisible by amax.numel() ({n_blocks})")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    scale = amax.float() / 6.0  # compute_fp4_scales
    if quantize_block_scales:
        if global_amax is None:
            global_amax = reduce_amax(amax.float(), axis=None, keepdims=False, squeeze_scalar=True)
        fp8_amax = global_amax.float() * (448.0 / fp8_max_for_normalization) / 6.0
        scale = scaled_e4m3_impl(scale, fp8_amax)
    # static_blockwise_fp4_fake_quant_kernel + nvfp4_scalar_quant, one row per block
    xb = x.contiguous().view(n_blocks, -1).float()
    s = scale.contiguous().view(n_blocks, 1).float()
    zero = s == 0.0
    safe = torch.where(zero | torch.isnan(s) | (s.abs() == float("inf")), 1.0, s)
    y = _fp4_qdq(xb, safe)
    if bool(zero.any()):
        y = torch.where(zero, 0.0, y)
    return y.to(out_dtype).view(x.shape)


def dynamic_fp4_fake_quant_cpu(x, global_amax, block_size=16, *_args, **_kwargs):
    """``fp4_kernel_hopper.fp4_fake_quant_block`` on the CPU (tiling does not change
    the per-block math; a partial last block is zero-padded as the kernel's loads are)."""
    shape, dtype = x.shape, x.dtype
    x2 = x.reshape(-1, shape[-1]).float()
    gs = (global_amax.float() / (6.0 * 448.0)).reshape(())  # launcher, torch fp32
    gs = torch.where(gs > 0.0, gs, torch.tensor(1e-12, dtype=torch.float32))
    pad = (-x2.shape[1]) % block_size
    xp = torch.nn.functional.pad(x2, (0, pad)) if pad else x2
    xb = xp.view(xp.shape[0], -1, block_size)
    bmax = xb.abs().amax(dim=-1, keepdim=True)
    # fp8_quantize_scale: RTNE cast to e4m3 (the value is <= 448, so no saturation case)
    s8 = torch.minimum(bmax / (6.0 * gs), torch.tensor(448.0))
    bq = s8.to(torch.float8_e4m3fn).float() * gs
    bq = torch.where(bq >= 1e-5, bq, 1.0)
    y = _fp4_qdq(xb, bq).view(xp.shape)
    if pad:
        y = y[:, : x2.shape[1]]
    return y.to(dtype).reshape(shape)


def install_cpu_kernels() -> list[str]:
    """Apply the runtime patch of the module docstring; returns what was patched."""
    import modelopt.torch.kernels.quantization.gemm as gemm
    import modelopt.torch.quantization  # noqa: F401 - plugins bind their flags first
    from modelopt.torch.quantization import tensor_quant

    gemm.static_blockwise_fp4_fake_quant = static_fp4_fake_quant_cpu
    gemm.fp4_fake_quant_block = dynamic_fp4_fake_quant_cpu
    gemm.IS_AVAILABLE = True
    original = tensor_quant.dynamic_block_quantize_op

    def dynamic_block_quantize_op(inputs, block_size, amax, num_bits, exp_bits, s_bits, s_exp):
        nvfp4 = (num_bits, exp_bits, s_bits, s_exp) == (4, 2, 8, 4)
        if nvfp4 and amax is not None and not inputs.is_cuda:
            if amax.numel() != 1:
                amax = amax.amax()
            return gemm.fp4_fake_quant_block(inputs, amax)
        return original(inputs, block_size, amax, num_bits, exp_bits, s_bits, s_exp)

    tensor_quant.dynamic_block_quantize_op = dynamic_block_quantize_op
    return list(PATCHED)


# ------------------------------------------------------------------ verification


_INT = {1: "int8", 2: "int16", 4: "int32"}
_TINT = {1: torch.int8, 2: torch.int16, 4: torch.int32}


def _rne_convert_float(np_mod, torch_mod):
    """An exact fp32 -> bf16 / fp8e4nv conversion for Triton's interpreter (round to
    nearest even, which Triton's cast specifies and compiled kernels do; the interpreter
    truncates fp32->bf16 and rounds fp8 half-up without carry)."""
    from triton.language import core as tlc

    out_t = {tlc.bfloat16: torch_mod.bfloat16, tlc.float8e4nv: torch_mod.float8_e4m3fn}
    in_t = {tlc.float32: torch_mod.float32, **out_t}

    def convert(data, src, dst, rounding_mode, _orig):
        if src in in_t and dst in in_t and tlc.float32 in (src, dst):
            t = torch_mod.from_numpy(np_mod.ascontiguousarray(data).view(_INT[data.itemsize]))
            y = t.view(in_t[src]).to(in_t[dst])
            uint = {1: np_mod.uint8, 2: np_mod.uint16, 4: np_mod.uint32}[y.element_size()]
            return y.view(_TINT[y.element_size()]).numpy().view(uint)
        return _orig(data, src, dst, rounding_mode)

    return convert


def verify_kernels(seed: int = 0) -> dict:
    """Bit-compare the CPU ports with ModelOpt's Triton kernels in the interpreter.

    The interpreter cannot run ``libdevice.isnan`` (used on the block scale) and its
    fp32->bf16/fp8 casts are not round-to-nearest-even; the check replaces the former by
    ``x != x`` and, for the "rne" runs, the latter by torch's RNE casts. "stock" runs use
    the unmodified interpreter on inputs whose casts are exact (fp32 outputs, block
    amaxes that are 6 x an E4M3 value with a unit global scale), so the casts do not
    matter there. Each run compares the bits of every output element.
    """
    import contextlib
    import os
    import types

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--verify-kernels needs TRITON_INTERPRET=1 and triton importable")
    import numpy as np
    import triton
    import triton.language as tl
    import triton.runtime.interpreter as interp

    globals()["tl"] = tl  # the interpreter wants triton.language in a jit function's globals

    @triton.jit
    def _isnan(v):
        return v != v

    import modelopt.torch.kernels.quantization.common.nvfp4_quant as nq

    nq.libdevice = types.SimpleNamespace(isnan=_isnan)
    torch.cuda.device = lambda _d: contextlib.nullcontext()  # launchers wrap the grid in it
    from modelopt.torch.kernels.quantization.gemm import fp4_kernel, fp4_kernel_hopper

    stock = interp._convert_float
    rne = _rne_convert_float(np, torch)
    g = torch.Generator().manual_seed(seed)
    fp8_vals = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    cases = _verify_cases(g, fp8_vals)
    report = {}
    for name, kind, x, amax, gamax, mode in cases:
        interp._convert_float = stock if mode == "stock" else (lambda *a: rne(*a, stock))
        try:
            if kind == "static":
                ref = fp4_kernel.static_blockwise_fp4_fake_quant(x, amax, gamax, True, 448.0)
                got = static_fp4_fake_quant_cpu(x, amax, gamax, True, 448.0)
            else:
                ref = fp4_kernel_hopper.fp4_fake_quant_block(x, gamax)
                got = dynamic_fp4_fake_quant_cpu(x, gamax)
        finally:
            interp._convert_float = stock
        bits = {4: torch.int32, 2: torch.int16}[x.element_size()]
        diff = int((ref.view(bits) != got.view(bits)).sum())
        report[name] = {"elements": x.numel(), "bit_mismatches": diff, "interpreter": mode}
        print(f"{name:40s} {x.numel():8d} elements, {diff} bit mismatches ({mode})", flush=True)
    return report


def _edge_blocks(v: float, g) -> torch.Tensor:
    """Two 16-blocks of block amax exactly ``6 * v``: values at, just above and just
    below every E2M1 rounding threshold (in units of ``v``), zeros and tiny values."""
    t = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    up, dn = torch.nextafter(t, torch.tensor(9.0)), torch.nextafter(t, torch.tensor(0.0))
    a = torch.cat([torch.tensor([6.0]), t, up[0::2], dn[1::2], torch.tensor([0.0])])
    b = torch.cat([torch.tensor([6.0]), dn[0::2], up[1::2], torch.tensor([0.5, 1.5, 3.0, 4.0])])
    b = torch.cat([b, torch.tensor([2.0, 1e-30, -1e-30, -0.0])])
    x = torch.stack([a, b]) * v
    sign = torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0)
    return x * sign


def _verify_cases(g, fp8_vals):
    def rnd(*shape, dtype, spread=True):
        x = torch.randn(*shape, generator=g)
        if spread:  # heavy tails and tiny blocks: exercise large, small, subnormal scales
            x = x * torch.exp(torch.randn(shape[0], 1, generator=g) * 3)
        return x.to(dtype)

    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = rnd(512, 64, dtype=dtype)
        blocks = x.float().view(-1, 16)
        amax = blocks.abs().amax(-1)
        tag = str(dtype).split(".")[-1]
        cases.append((f"static random {tag}", "static", x, amax, None, "rne"))
        gam = amax.max() * 0.5  # clipped block scales (saturate at 448)
        cases.append((f"static random {tag} small global", "static", x, amax, gam, "rne"))
        cases.append((f"dynamic random {tag}", "dynamic", x, None, amax.max(), "rne"))
        xd = rnd(37, 1000, dtype=dtype)  # rows not a tile multiple, N not a 64 multiple
        cases.append((f"dynamic ragged {tag}", "dynamic", xd, None, xd.float().abs().max(), "rne"))
    # exact-cast inputs for the stock interpreter: block amax = 6 * e4m3 value, global 2688
    pick = fp8_vals[torch.randint(0, fp8_vals.numel(), (96,), generator=g)]
    xe = torch.cat([_edge_blocks(float(v), g) for v in torch.cat([fp8_vals, pick])])
    amax = xe.abs().amax(-1)
    cases.append(("static edges fp32", "static", xe, amax, torch.tensor(2688.0), "stock"))
    cases.append(("static edges fp32 (rne)", "static", xe, amax, torch.tensor(2688.0), "rne"))
    cases.append(("dynamic edges fp32", "dynamic", xe, None, torch.tensor(2688.0), "stock"))
    cases.append(("dynamic edges fp32 (rne)", "dynamic", xe, None, torch.tensor(2688.0), "rne"))
    xb = xe.to(torch.bfloat16)
    ab = xb.float().abs().amax(-1)
    cases.append(("static edges bf16", "static", xb, ab, torch.tensor(2688.0), "rne"))
    cases.append(("dynamic edges bf16", "dynamic", xb, None, torch.tensor(2688.0), "rne"))
    xs = torch.randn(64, 32, generator=g)  # non-finite inputs, zero / inf / NaN block amax
    xs.view(-1)[::7] = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0]).repeat(74)[
        : xs.view(-1)[::7].numel()
    ]
    am = xs.view(-1, 16).nan_to_num(0.0, 0.0, 0.0).abs().amax(-1)
    am[::5], am[1::5], am[2::5] = 0.0, float("inf"), float("nan")
    gm = torch.tensor(10.0)
    cases.append(("static non-finite fp32", "static", xs, am, gm, "stock"))
    cases.append(("static non-finite bf16", "static", xs.bfloat16(), am, gm, "rne"))
    xz = torch.zeros(64, 32)
    xz[1::2] = torch.randn(32, 32, generator=g)
    cases.append(("static zero blocks", "static", xz, xz.view(-1, 16).abs().amax(-1), None, "rne"))
    cases.append(("dynamic zero blocks", "dynamic", xz, None, xz.abs().max(), "rne"))
    cases.append(("dynamic zero global", "dynamic", xz, None, torch.tensor(0.0), "rne"))
    return cases


# --------------------------------------------------------------------------- the run


def _config(spec: dict, overrides: list[str]) -> dict:
    """The QuantizeConfig dict ModelOpt itself builds from the preset / recipe file
    (``stack``: the first's config with every member's algorithm, in order)."""
    if "stack" in spec:
        parts = [_config(RECIPES[n], overrides) for n in spec["stack"]]
        return {**parts[0], "algorithm": [p["algorithm"] for p in parts]}
    if "preset" in spec:
        from modelopt.torch.quantization.config import _load_quantize_config_dict

        return _load_quantize_config_dict(spec["preset"])
    from modelopt.recipe import load_recipe

    recipe = load_recipe(spec["recipe"], overrides=overrides or None)
    return recipe.quantize.model_dump(exclude_unset=True)


def _resume_layer(ckdir: Path | None) -> int:
    """The layer ModelOpt's layerwise calibration resumes from in ``ckdir`` (0: fresh)."""
    if ckdir is None or not ckdir.is_dir():
        return 0
    from modelopt.torch.quantization.utils.layerwise_calib import detect_resume_point

    info = detect_resume_point(str(ckdir))
    return info[0] if info else 0


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, dst / f)


def _save(pfile: Path, header: dict, name: str, entry: dict) -> None:
    """Merge one recipe into peers.json, re-read just before writing so runs of other
    recipes into the same folder keep theirs (another tool's file is replaced)."""
    record = json.loads(pfile.read_text()) if pfile.is_file() else {}
    if "nvidia-modelopt" not in record.get("versions", {}):
        record = {}
    record.update(header)
    record.setdefault("recipes", {})[name] = entry
    tmp = pfile.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, pfile)


def run(args) -> None:
    torch.set_num_threads(args.threads)
    patched = install_cpu_kernels()
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    ids = torch.load(args.tokens)
    n, t = ids.shape
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pfile = out / "peers.json"
    header = {
        "versions": {
            p: md.version(p) for p in ("nvidia-modelopt", "transformers", "torch", "accelerate")
        },
        "model": args.model,
        "calibration": {"samples": n, "seq_len": t, "tokens_file": args.tokens},
        "forward_loop": "each row alone: model(input_ids=row[None], use_cache=False)",
        "model_dtype": args.dtype,
        "threads": args.threads,
        "patched": patched,
    }

    def forward_loop(model):
        for i in range(n):
            model(input_ids=ids[i : i + 1], use_cache=False)

    for name in args.recipes:
        spec = RECIPES[name]
        t0, c0 = time.perf_counter(), time.process_time()
        cfg, ckdir, overrides = None, None, []
        if spec.get("layerwise_checkpoint_dir"):
            ckdir = out / f"{name}.layerwise_ckpts"
            overrides = [f"quantize.algorithm.layerwise.checkpoint_dir={ckdir}"]
        resumed = _resume_layer(ckdir)
        try:
            cfg = _config(spec, overrides)
            model = AutoModelForCausalLM.from_pretrained(
                args.model, dtype=getattr(torch, args.dtype)
            ).eval()
            with torch.no_grad():
                mtq.quantize(model, cfg, forward_loop)
            t_cal = time.perf_counter() - t0
            if (out / name).exists():
                shutil.rmtree(out / name)
            with torch.no_grad():
                export_hf_checkpoint(model, export_dir=out / name)
            _copy_tokenizer(Path(args.model), out / name)
            if ckdir is not None:
                shutil.rmtree(ckdir, ignore_errors=True)
            status = "ok"
        except Exception as err:  # noqa: BLE001 - record exactly what failed
            t_cal = None
            status = f"failed: {type(err).__name__}: {err}"
        _save(
            pfile,
            header,
            name,
            {
                **spec,
                "overrides": overrides,
                "resumed_from_layer": resumed,
                "config": json.loads(json.dumps(cfg, default=str)) if cfg is not None else None,
                "model_dtype": args.dtype,
                "status": status,
                "seconds": time.perf_counter() - t0,
                "cpu_seconds": time.process_time() - c0,
                "calibration_seconds": t_cal,
            },
        )
        print(name, status, f"{time.perf_counter() - t0:.0f} s", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", help="calibration token ids (.pt, [samples, seq_len])")
    p.add_argument("--model", help="the bf16 HF folder of the model")
    p.add_argument("--out", default="peers")
    p.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--threads", type=int, default=1)
    add_dtype(p)
    p.add_argument(
        "--verify-kernels",
        action="store_true",
        help="compare the CPU kernels with ModelOpt's Triton kernels (TRITON_INTERPRET=1)",
    )
    args = p.parse_args()
    if args.verify_kernels:
        torch.set_num_threads(args.threads)
        report = verify_kernels()
        bad = sum(r["bit_mismatches"] for r in report.values())
        print("all bit-identical" if bad == 0 else f"{bad} mismatching elements")
        return int(bad != 0)
    if not (args.tokens and args.model):
        p.error("--tokens and --model are required")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
