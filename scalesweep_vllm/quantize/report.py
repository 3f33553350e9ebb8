"""The quantization report: per layer AbsMax vs ScaleSweep weight error, global
scales, totals and timing; printed and saved as ``quantization_report.json`` and
``quantization_report.txt`` beside the checkpoint.

Errors are per weight element: ``mse`` is the plain mean squared error, ``wmse``
weighs each element by its input channel's calibrated E[x^2] (the diagonal
approximation of the output error E||(W - W_hat) x||^2). AbsMax uses the same
global scale as ScaleSweep, so the difference is the block-scale choice alone.

With ``--gptq`` each row also holds the relative layer-output error on the
calibration data, ``||X (W - W_q)^T||^2 / ||X W^T||^2`` (from ``H = X^T X``), of
round-to-nearest (``out_err_rtn``) and of GPTQ (``out_err_gptq``) on the same block
scales, and ``gptq``: "ok" or the reason of an RTN fallback.
"""

from __future__ import annotations

import json
from pathlib import Path

from .weights import QuantizedLinear

__all__ = ["JSON_NAME", "TEXT_NAME", "format_report", "layer_rows", "totals", "write_report"]

JSON_NAME = "quantization_report.json"
TEXT_NAME = "quantization_report.txt"


def _reduction(before: float, after: float) -> float | None:
    return None if before <= 0 else 1.0 - after / before


def layer_rows(quantized: list[QuantizedLinear], shapes: dict[str, tuple[int, int]]) -> list[dict]:
    """One JSON row per quantized Linear."""
    rows = []
    for q in quantized:
        m = q.metrics
        row = {
            "name": q.name,
            "shape": list(shapes[q.name]),
            "fused_group": q.group,
            "weight_global_scale": float(q.weight_global_scale),
            "input_global_scale": None
            if q.input_global_scale is None
            else float(q.input_global_scale),
            "weight_amax": q.weight_amax,
            "input_amax": q.input_amax,
        }
        if m:
            row.update(m)
            row["mse_reduction"] = _reduction(m["mse_absmax"], m["mse_scalesweep"])
            row["wmse_reduction"] = _reduction(m["wmse_absmax"], m["wmse_scalesweep"])
        rows.append(row)
    return rows


def totals(rows: list[dict]) -> dict:
    """Parameter-weighted mean errors over all quantized Linears, and their reductions."""
    n = sum(r["shape"][0] * r["shape"][1] for r in rows)
    out: dict = {"quantized_linears": len(rows), "quantized_params": n}
    if rows and "mse_absmax" in rows[0] and n:
        for k in ("mse_absmax", "mse_scalesweep", "wmse_absmax", "wmse_scalesweep"):
            out[k] = sum(r[k] * r["shape"][0] * r["shape"][1] for r in rows) / n
        out["mse_reduction"] = _reduction(out["mse_absmax"], out["mse_scalesweep"])
        out["wmse_reduction"] = _reduction(out["wmse_absmax"], out["wmse_scalesweep"])
        out["mean_layer_wmse_reduction"] = sum(r["wmse_reduction"] or 0.0 for r in rows) / len(rows)
    done = [r for r in rows if "out_err_gptq" in r]
    if done:
        m = sum(r["shape"][0] * r["shape"][1] for r in done)
        for k in ("out_err_rtn", "out_err_gptq"):
            out[k] = sum(r[k] * r["shape"][0] * r["shape"][1] for r in done) / m
        out["out_err_reduction"] = _reduction(out["out_err_rtn"], out["out_err_gptq"])
        out["gptq_layers"] = len(done)
    fallbacks = [r["name"] for r in rows if str(r.get("gptq", "")).startswith("rtn")]
    if fallbacks:
        out["gptq_rtn_fallbacks"] = fallbacks
    return out


def _pct(x: float | None) -> str:
    return "   n/a" if x is None else f"{100 * x:6.1f}%"


def _objective_note(objective: str | None) -> str:
    """What the sweep minimised, so that a negative reduction in the other column reads right."""
    if objective == "wmse":
        return (
            "objective wmse: the sweep minimises WMSE (error weighted by each input "
            "channel's E[x^2]); plain MSE is shown for reference and may rise (negative red.)"
        )
    if objective == "mse":
        return "objective mse: the sweep minimises plain MSE; WMSE is shown for reference"
    if objective == "hessian":
        return (
            "objective hessian: the sweep minimises e^T H_b e (16x16 blocks of E[x x^T]); "
            "MSE and WMSE are shown for reference and either may rise (negative red.)"
        )
    if objective == "four_over_six":
        return "objective four_over_six: the better of amax/6 and amax/4 per block by MSE"
    return "objective absmax: block scale amax/6 (no sweep); both columns show AbsMax"


def format_report(report: dict) -> str:
    """A readable table of the report."""
    lines = []
    hdr = report.get("header", {})
    title = "DRY RUN: nothing written" if report.get("dry_run") else "NVFP4 quantization report"
    lines.append(title)
    for k in ("model", "output", "scheme", "objective", "global_scale_convention", "device"):
        if k in hdr:
            lines.append(f"  {k:<24}{hdr[k]}")
    if hdr.get("gptq"):
        g = hdr["gptq"]
        lines.append(
            f"  {'gptq':<24}damp {g['damp']}, block {g['block_size']}, inputs {g['inputs']}, "
            f"actorder {'on' if g['actorder'] else 'off'}, H {g['hessian_dtype']}"
        )
    cal = report.get("calibration")
    if cal:
        lines.append(
            f"  {'calibration':<24}{cal.get('num_samples')} x {cal.get('seq_len')} tokens "
            f"from {cal.get('source')}"
        )
        for note in cal.get("warnings", []):
            lines.append(f"  warning: {note}")
    lines.append("")
    rows = report.get("layers", [])
    if rows and "mse_absmax" in rows[0]:
        lines.append(_objective_note(hdr.get("objective")))
        lines.append(
            f"{'layer':<44}{'shape':>12}{'G_w':>10}{'G_a':>10}"
            f"{'MSE absmax':>12}{'MSE sweep':>11}{'red.':>8}"
            f"{'WMSE absmax':>13}{'WMSE sweep':>12}{'red.':>8}"
        )
        for r in rows:
            ga = "-" if r["input_global_scale"] is None else f"{r['input_global_scale']:.4g}"
            lines.append(
                f"{r['name'][-44:]:<44}{'x'.join(map(str, r['shape'])):>12}"
                f"{r['weight_global_scale']:>10.4g}{ga:>10}"
                f"{r['mse_absmax']:>12.3e}{r['mse_scalesweep']:>11.3e}{_pct(r['mse_reduction']):>8}"
                f"{r['wmse_absmax']:>13.3e}{r['wmse_scalesweep']:>12.3e}"
                f"{_pct(r['wmse_reduction']):>8}"
            )
        if any("gptq" in r for r in rows):
            lines.append("")
            lines.append(
                "layer-output error on the calibration data, ||X(W-Wq)^T||^2 / ||XW^T||^2, "
                "same block scales"
            )
            lines.append(f"{'layer':<44}{'RTN':>12}{'GPTQ':>12}{'red.':>8}")
            for r in rows:
                if "out_err_gptq" in r:
                    red = _reduction(r["out_err_rtn"], r["out_err_gptq"])
                    lines.append(
                        f"{r['name'][-44:]:<44}{r['out_err_rtn']:>12.3e}"
                        f"{r['out_err_gptq']:>12.3e}{_pct(red):>8}"
                    )
                elif "gptq" in r:
                    lines.append(f"{r['name'][-44:]:<44}  {r['gptq']}")
    elif rows:
        lines.append(f"{'layer (would be quantized)':<56}{'shape':>14}  fused group")
        for r in rows:
            lines.append(
                f"{r['name'][-56:]:<56}{'x'.join(map(str, r['shape'])):>14}  "
                f"{'+'.join(n.rpartition('.')[2] for n in r['fused_group'])}"
            )
    ign = report.get("ignored", {})
    if ign:
        lines.append("")
        lines.append(f"left in bf16 ({len(ign)}):")
        for name, why in ign.items():
            lines.append(f"  {name}: {why}")
    att = report.get("attention", {})
    if att:
        lines.append("")
        lines.append(f"attention (post-rotary amax -> global scale), {len(att)} modules; first:")
        name, a = next(iter(att.items()))
        lines.append(
            f"  {name}: q {a['q_amax']:.3g}->{a['q_global_scale']:.4g}  "
            f"k {a['k_amax']:.3g}->{a['k_global_scale']:.4g}  "
            f"v {a['v_amax']:.3g}->{a['v_global_scale']:.4g}"
        )
    t = report.get("totals", {})
    lines.append("")
    lines.append(
        f"totals: {t.get('quantized_linears', 0)} Linears, "
        f"{t.get('quantized_params', 0) / 1e6:.2f}M quantized of "
        f"{report.get('total_params', 0) / 1e6:.2f}M parameters"
    )
    if "mse_absmax" in t:
        lines.append(
            f"  weight MSE   absmax {t['mse_absmax']:.4e}  scalesweep "
            f"{t['mse_scalesweep']:.4e}  reduction {_pct(t['mse_reduction']).strip()}"
        )
        lines.append(
            f"  weight WMSE  absmax {t['wmse_absmax']:.4e}  scalesweep "
            f"{t['wmse_scalesweep']:.4e}  reduction {_pct(t['wmse_reduction']).strip()}"
        )
    if "out_err_gptq" in t:
        lines.append(
            f"  output error RTN {t['out_err_rtn']:.4e}  GPTQ {t['out_err_gptq']:.4e}  "
            f"reduction {_pct(t['out_err_reduction']).strip()}"
        )
    if t.get("gptq_rtn_fallbacks"):
        lines.append(f"  GPTQ fell back to RTN on: {', '.join(t['gptq_rtn_fallbacks'])}")
    tm = report.get("timing", {})
    if tm:
        lines.append(
            f"time: {tm.get('wall_s', 0):.1f} s wall (load {tm.get('load_s', 0):.1f}, calibrate+"
            f"quantize {tm.get('calibrate_quantize_s', 0):.1f}, write {tm.get('write_s', 0):.1f}); "
            f"{tm.get('s_per_billion_params', 0):.1f} s per billion parameters"
        )
        lines.append(
            f"      {tm.get('cpu_s', 0):.1f} s process CPU time (all threads), "
            f"{tm.get('cpu_s_per_billion_params', 0):.1f} CPU s per billion parameters"
        )
    return "\n".join(lines) + "\n"


def write_report(report: dict, directory: Path) -> None:
    """Save ``quantization_report.json`` and ``quantization_report.txt``."""
    (directory / JSON_NAME).write_text(json.dumps(report, indent=2) + "\n")
    (directory / TEXT_NAME).write_text(format_report(report))
