"""Our AbsMax NVFP4 quantizer against vLLM's CUDA quantizer ``scaled_fp4_quant``.

    python benchmarks/bench_vllm_absmax.py [--rows 4096] [--cols 4096] [--out DIR]

Both pick the block scale by AbsMax, in different fp32 arithmetic:

* ours (``scalesweep_vllm.kernels.quantize(x, G, method="absmax")``): scale
  ``fp8_rne(min((amax / 6) * G, 448))``, element ``E2M1_rne(x * (G / v))``, with
  correctly rounded fp32 division;
* vLLM 0.33 (``vllm/_custom_ops.py::scaled_fp4_quant`` ->
  ``csrc/quantization/fp4/nvfp4_utils.cuh::cvt_warp_fp16_to_fp4``): scale
  ``fp8(G * (amax * rcp.approx.ftz(6)))``, element
  ``cvt.rn.satfinite.e2m1(x * rcp.approx.ftz(v * rcp.approx.ftz(G)))``, and a block whose
  scale rounds to 0 gets scale 0 and codes 0 (ours: the smallest code, 1).

Where the exact value is not on a rounding tie the two agree; on a tie (an FP8
midpoint for the scale, an E2M1 midpoint for an element) the approximate reciprocals
can tip it either way. Cases (bf16 input, as vLLM requires):

* ``gaussian_paper``: N(0, 1), G = 256*6/amax (the paper's global scale);
* ``gaussian_ct``: N(0, 1), G = 448*6/amax (compressed-tensors' global scale);
* ``ties_scale``: G = 1, every block's amax/6 is exactly an FP8 midpoint;
* ``ties_code``: G = 1, every block's amax/6 is exactly an FP8 value v and its other
  15 elements are exactly E2M1 midpoints times v (0.25, 0.75, ..., 5).

Reported per case: the fraction of blocks whose scales differ and the largest
difference in FP8 code; the fraction of elements whose decoded value differs, over all
blocks and over the blocks whose scales agree, with the largest difference in E2M1
steps there; blocks where vLLM wrote scale 0; elements that differ only in the sign of
a zero; and, for each side, the fraction of elements whose value differs from
round-to-nearest-even of ``x * G / v`` in exact arithmetic (v: that side's own scale).
Ours is not exact at ties either: ``G / v`` is a rounded fp32 quotient, so with
``ties_code`` on the CPU reference about 5% of elements of blocks whose scale is not a
power of two land on the other side of the tie. A table on stdout, JSON in
``${OUT:-benchmarks/out}/bench_vllm_absmax.json``.

vLLM 0.33 compiles ``scaled_fp4_quant`` for SM100-SM121 only
(``csrc/quantization/fp4/nvfp4_quant_entry.cu``): without CUDA, without an importable
vLLM, or on a GPU where the kernel does not run, the script prints one line saying so
and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from scalesweep_vllm import nvfp4  # noqa: E402

PREFIX = "bench_vllm_absmax"
CASES = ("gaussian_paper", "gaussian_ct", "ties_scale", "ties_code")
#: E2M1 rounding midpoints (magnitudes): where round-to-nearest-even decides.
E2M1_TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
#: FP8 codes the tie cases draw scales from (normal numbers, 2^-5 .. 448).
TIE_CODES = (16, 126)

#: (x bf16 [M, K], G fp32 [1]) -> (packed uint8 [M, K/2], scales float8_e4m3fn [M, K/16])
Quantizer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------- inputs
def _place_max(rest: torch.Tensor, amax: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blocks [B, 16] = ``rest`` with one random position per block set to +-amax."""
    b = rest.shape[0]
    pos = torch.randint(0, 16, (b, 1), generator=gen, device=rest.device)
    sign = torch.randint(0, 2, (b, 1), generator=gen, device=rest.device) * 2 - 1
    return rest.scatter(1, pos, sign * amax[:, None])


def make_case(
    case: str, rows: int, cols: int, device: torch.device | str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input x (bf16 [rows, cols]) and global scale G (fp32 [1]) of one case."""
    if cols % 16:
        raise ValueError(f"cols must be a multiple of 16, got {cols}")
    gen = torch.Generator(device=device).manual_seed(seed)
    nb = rows * cols // 16
    if case in ("gaussian_paper", "gaussian_ct"):
        x = torch.randn(rows, cols, generator=gen, device=device).to(torch.bfloat16)
        conv = "paper" if case == "gaussian_paper" else "compressed-tensors"
        g = nvfp4.global_scale(x.abs().amax().float().cpu(), conv).to(device)
        return x, g.reshape(1).to(torch.float32)
    vals = nvfp4.fp8_values(device)
    lo, hi = TIE_CODES
    if case == "ties_scale":
        # amax = 6 * midpoint(v_c, v_{c+1}): at most 7 significant bits, exact in bf16,
        # and fp32 amax / 6 is then exactly the midpoint.
        c = torch.randint(lo, hi, (nb,), generator=gen, device=device)
        amax = 6.0 * (vals[c] + vals[c + 1]) / 2
        u = torch.rand(nb, 16, generator=gen, device=device) * 1.98 - 0.99
        rest = (u * amax[:, None]).to(torch.bfloat16).float()  # |rest| < amax
        blocks = _place_max(rest, amax, gen)
    elif case == "ties_code":
        # amax = 6 v and the rest t * v with t an E2M1 midpoint: all exact in bf16.
        c = torch.randint(lo, hi + 1, (nb,), generator=gen, device=device)
        v = vals[c]
        ties = torch.tensor(E2M1_TIES, dtype=torch.float32, device=device)
        t = ties[torch.randint(0, len(E2M1_TIES), (nb, 16), generator=gen, device=device)]
        sign = torch.randint(0, 2, (nb, 16), generator=gen, device=device) * 2 - 1
        blocks = _place_max(sign * t * v[:, None], 6.0 * v, gen)
    else:
        raise ValueError(f"unknown case {case!r}; choose from {CASES}")
    x = blocks.reshape(rows, cols)
    xb = x.to(torch.bfloat16)
    if not torch.equal(xb.float(), x):  # the construction promises exactness
        raise AssertionError(f"{case}: inputs are not exact in bf16")
    return xb, torch.ones(1, dtype=torch.float32, device=device)


# --------------------------------------------------------------------------- comparison
def _levels(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw 4-bit codes and signed E2M1 levels (-7..7, -0 -> 0) of packed FP4."""
    codes = nvfp4.unpack_fp4(packed).to(torch.int32)
    mag = codes & 7
    return codes, torch.where((codes & 8) != 0, -mag, mag)


def _off_exact(x: torch.Tensor, g: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor):
    """Fraction of elements (in blocks with a nonzero scale) whose value differs from
    round-to-nearest-even of ``x * G / v`` in exact (float64) arithmetic, v being that
    side's own scale: how far each side's fp32 arithmetic strays at ties."""
    v = scales.to(torch.float64).repeat_interleave(16, dim=-1)
    ok = v > 0
    exact = nvfp4.round_e2m1(x.to(torch.float64) * g.to(torch.float64) / v.clamp(min=2.0**-9))
    got = nvfp4.decode_e2m1(nvfp4.unpack_fp4(packed)).to(torch.float64)
    return int(((exact != got) & ok).sum()) / max(int(ok.sum()), 1)


def compare(
    ours: tuple[torch.Tensor, torch.Tensor],
    theirs: tuple[torch.Tensor, torch.Tensor],
    x: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
) -> dict:
    """Differences between two NVFP4 encodings of the same [M, K] input (with x and G:
    also each side's distance from exact-arithmetic rounding, :func:`_off_exact`)."""
    (pa, sa), (pb, sb) = ours, theirs
    if pa.shape != pb.shape or sa.shape != sb.shape:
        raise ValueError(f"shapes differ: {pa.shape}/{sa.shape} vs {pb.shape}/{sb.shape}")
    ca = sa.view(torch.uint8).to(torch.int32)
    cb = sb.view(torch.uint8).to(torch.int32)
    scale_diff = ca != cb
    raw_a, la = _levels(pa)
    raw_b, lb = _levels(pb)
    val_diff = la != lb
    same = (~scale_diff).repeat_interleave(16, dim=-1)
    step_same = ((la - lb).abs() * same).amax() if same.any() else torch.tensor(0)
    n_same = int(same.sum())
    blocks, elements = ca.numel(), la.numel()
    block_code_diff = val_diff.reshape(*ca.shape, 16).any(-1)
    res = {
        "blocks": blocks,
        "elements": elements,
        "scale_diff_frac": int(scale_diff.sum()) / blocks,
        "scale_max_code_step": int((ca - cb).abs().max()) if blocks else 0,
        "vllm_zero_scale_blocks": int((cb == 0).sum()),
        "code_diff_frac": int(val_diff.sum()) / elements,
        "code_diff_frac_same_scale": int((val_diff & same).sum()) / max(n_same, 1),
        "blocks_with_code_diff_same_scale_frac": int((block_code_diff & ~scale_diff).sum())
        / max(int((~scale_diff).sum()), 1),
        "code_max_step_same_scale": int(step_same),
        "signed_zero_only_diffs": int(((raw_a != raw_b) & ~val_diff).sum()),
    }
    if x is not None and g is not None:
        res["ours_off_exact_frac"] = _off_exact(x, g, pa, sa)
        res["vllm_off_exact_frac"] = _off_exact(x, g, pb, sb)
    return res


def ours_absmax(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our AbsMax quantizer: the Triton kernel on CUDA, the torch reference elsewhere."""
    from scalesweep_vllm import kernels

    return kernels.quantize(x, g, method="absmax")


def run(
    vllm_quant: Quantizer,
    device: torch.device | str,
    rows: int,
    cols: int,
    cases: tuple[str, ...] = CASES,
    seed: int = 0,
    ours: Quantizer = ours_absmax,
) -> dict:
    """Every case: inputs, both quantizers, :func:`compare`; results by case."""
    out = {}
    for i, case in enumerate(cases):
        x, g = make_case(case, rows, cols, device, seed + i)
        res = compare(ours(x, g), vllm_quant(x, g), x, g)
        res.update(rows=rows, cols=cols, global_scale=float(g.item()))
        out[case] = res
    return out


# --------------------------------------------------------------------------- vLLM side
def _skip(reason: str) -> int:
    print(f"{PREFIX}: skipped: {reason}")
    return 0


def vllm_scaled_fp4_quant(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's ``scaled_fp4_quant`` with row-major (unswizzled) scales."""
    from vllm import _custom_ops as ops

    m, k = x.shape
    packed, scales = ops.scaled_fp4_quant(x, g, is_sf_swizzled_layout=False)
    return packed.reshape(m, k // 2), scales.view(torch.float8_e4m3fn).reshape(m, k // 16)


def _vllm_unavailable() -> str | None:
    """Why vLLM's quantizer cannot run here, or None. Checks CUDA before importing
    vLLM (a slow import) and probes the kernel on one block."""
    if not torch.cuda.is_available():
        return "no CUDA device (vLLM's scaled_fp4_quant is a CUDA kernel)"
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed here"
    try:
        from vllm import _custom_ops as ops
    except Exception as e:  # a broken vLLM install: say why in one line
        return f"vLLM does not import: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    if not hasattr(ops, "scaled_fp4_quant"):
        return "this vLLM has no scaled_fp4_quant"
    cap = torch.cuda.get_device_capability()
    try:
        probe = torch.ones(1, 16, dtype=torch.bfloat16, device="cuda")
        vllm_scaled_fp4_quant(probe, torch.ones(1, dtype=torch.float32, device="cuda"))
        torch.cuda.synchronize()
    except Exception as e:
        first = str(e).splitlines()[0][:160] if str(e) else ""
        return (
            f"vLLM's scaled_fp4_quant does not run on sm_{cap[0]}{cap[1]} "
            f"(vLLM 0.33 builds it for SM100-SM121): {type(e).__name__}: {first}"
        )
    return None


def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import vllm

        env["vllm"] = vllm.__version__
    except Exception:
        env["vllm"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, capability=f"{p.major}.{p.minor}")
    return env


def table(results: dict) -> str:
    head = (
        f"{'case':<15} {'blocks':>9} {'scale diff':>11} {'max step':>8} "
        f"{'code diff':>10} {'same-scale':>11} {'max step':>8} {'vLLM s=0':>8} "
        f"{'ours~exact':>10} {'vLLM~exact':>10}"
    )
    lines = [head, "-" * len(head)]
    for case, r in results.items():
        lines.append(
            f"{case:<15} {r['blocks']:>9} {r['scale_diff_frac']:>11.2e} "
            f"{r['scale_max_code_step']:>8} {r['code_diff_frac']:>10.2e} "
            f"{r['code_diff_frac_same_scale']:>11.2e} {r['code_max_step_same_scale']:>8} "
            f"{r['vllm_zero_scale_blocks']:>8} {r.get('ours_off_exact_frac', 0):>10.2e} "
            f"{r.get('vllm_off_exact_frac', 0):>10.2e}"
        )
    lines.append(
        "scale diff: fraction of blocks; code diff: fraction of elements whose value "
        "differs (same-scale: among blocks whose scales agree); max step: largest "
        "difference in FP8 code / E2M1 level; ~exact: fraction of elements whose value "
        "differs from exact-arithmetic rounding of x*G/v under that side's own scale"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    args = ap.parse_args(argv)

    reason = _vllm_unavailable()
    if reason is not None:
        return _skip(reason)

    env = environment()
    print(json.dumps(env))
    results = run(vllm_scaled_fp4_quant, "cuda", args.rows, args.cols, tuple(args.cases), args.seed)
    print(table(results))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{PREFIX}.json")
    with open(path, "w") as f:
        json.dump({"environment": env, "results": results}, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
