"""Compile the NVFP4 quantize kernels for sm_90 (Hopper) and sm_100 (Blackwell) on any
machine (no GPU needed) and count instructions in the ScaleSweep candidate loop.

    python benchmarks/ptx_report.py                # table for sm_90 and sm_100
    python benchmarks/ptx_report.py --arch 100 --method mse --json

The candidate loop is the kernel's only backward branch; its body runs once per
candidate for the thread's ``BM * 16 / (32 * num_warps)`` elements, so "per element
per candidate" = loop-body instructions / elements per thread. SASS counts come from
Triton's bundled nvdisasm when it can read the cubin. Must run without
TRITON_INTERPRET=1 (it is removed from the environment here).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

METHODS = {"absmax": 0, "mse": 1, "wmse": 2}


def compile_quant(
    arch: int,
    method: str,
    hw: bool,
    dtype: str = "bf16",
    bm: int = 128,
    warps: int = 4,
    table: bool = True,
):
    """triton.compile the quantize kernel for ``GPUTarget("cuda", arch, 32)``; returns the
    compiled kernel (``.asm`` holds "ptx" and "cubin")."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from scalesweep_vllm.kernels import nvfp4_triton as k

    signature = {
        "x_ptr": f"*{dtype}",
        "w_ptr": "*fp32",
        "g_ptr": "*fp32",
        "tab_ptr": "*fp32",
        "out_ptr": "*u8",
        "scale_ptr": "*u8",
        "n_blocks": "i32",
        "n_kblocks": "i32",
        "n_wblocks": "i32",
        "stride_m": "i32",
        "stride_k": "i32",
        "kp4": "i32",
        "METHOD": "constexpr",
        "FAKE": "constexpr",
        "ROW_CONTIG": "constexpr",
        "HW_E2M1": "constexpr",
        "USE_TABLE": "constexpr",
        "BM": "constexpr",
        "SWIZZLE": "constexpr",
    }
    constexprs = {
        "METHOD": METHODS[method],
        "FAKE": False,
        "ROW_CONTIG": True,
        "HW_E2M1": hw,
        "USE_TABLE": table,
        "BM": bm,
        "SWIZZLE": False,
    }
    # pointers 16-byte aligned, as torch allocations are (what the JIT specializes on)
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(6)}
    src = ASTSource(fn=k.quant_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    opts = {"num_warps": warps, "enable_fp_fusion": False}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def _loop_body(lines: list[str], label_re: str, branch_re: str) -> list[str]:
    """Instructions between a label and the last backward branch to it."""
    labels = {}
    best = None
    for i, line in enumerate(lines):
        m = re.match(label_re, line)
        if m:
            labels[m.group(1)] = i
        b = re.search(branch_re, line)
        if b and b.group(1) in labels:
            start = labels[b.group(1)]
            if best is None or i - start > best[1] - best[0]:
                best = (start, i)
    if best is None:
        return []
    return lines[best[0] + 1 : best[1] + 1]


def ptx_loop_ops(ptx: str) -> collections.Counter:
    lines = [ln.strip() for ln in ptx.splitlines()]
    body = _loop_body(lines, r"^(\$L__\w+):", r"bra(?:\.uni)?\s+(\$L__\w+);")
    ops = collections.Counter()
    for ln in body:
        if not ln or ln.startswith(("//", "$", "{", "}", ".")):
            continue
        op = ln.split()[0]
        if op.startswith("@"):
            op = ln.split()[1]
        ops[op.rstrip(";")] += 1
    return ops


def _sass_lines(cubin: bytes) -> list[str] | None:
    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    nvdisasm = os.path.join(bindir, "nvdisasm")
    if not os.path.exists(nvdisasm):
        nvdisasm = shutil.which("nvdisasm")
    if not nvdisasm:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True)
    return None if res.returncode else res.stdout.splitlines()


def sass_main_count(cubin: bytes) -> int | None:
    """Static SASS instructions of the kernel body, without the IEEE-division slow-path
    subroutine (taken only for operands near the fp32 range's ends) and NOPs."""
    lines = _sass_lines(cubin)
    if lines is None:
        return None
    n = 0
    for ln in lines:
        if "slowpath:" in ln:
            break
        m = re.match(r"^\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)", ln)
        if m and m.group(2) != "NOP":
            n += 1
    return n


def sass_loop_ops(cubin: bytes) -> collections.Counter | None:
    sass = _sass_lines(cubin)
    if sass is None:
        return None
    lines = []
    for ln in sass:
        s = ln.strip()
        m = re.match(r"^/\*[0-9a-f]+\*/\s+(.*?);?\s*(/\*.*)?$", s)
        if m:
            lines.append(m.group(1))
        elif re.match(r"^\.L_x_\d+:", s):
            lines.append(s)
    body = _loop_body(lines, r"^(\.L_x_\d+):", r"BRA\s+(?:`\()?(\.L_x_\d+)")
    ops = collections.Counter()
    for ln in body:
        if ln.startswith(".L_x"):
            continue
        toks = ln.split()
        op = toks[1] if toks[0].startswith("@") else toks[0]
        if op == "NOP":
            continue
        ops[op.split(".")[0]] += 1
    return ops


def report(
    arch: int, method: str, hw: bool, bm: int = 128, warps: int = 4, table: bool = True
) -> dict:
    ck = compile_quant(arch, method, hw, bm=bm, warps=warps, table=table)
    ptx = ck.asm["ptx"]
    elems = bm * 16 // (32 * warps)
    p_ops = ptx_loop_ops(ptx)
    s_ops = sass_loop_ops(ck.asm["cubin"]) if "cubin" in ck.asm else None
    out = {
        "arch": f"sm_{arch}",
        "method": method,
        "hw_e2m1": hw,
        "table": table,
        "BM": bm,
        "num_warps": warps,
        "elements_per_thread": elems,
        "ptx_loop_instructions": sum(p_ops.values()),
        "ptx_per_element_candidate": round(sum(p_ops.values()) / elems, 2),
        "ptx_loop_ops": dict(p_ops.most_common()),
        "has_cvt_e2m1x2": "cvt.rn.satfinite.e2m1x2.f32" in ptx,
        "shared_memory_in_loop": sum(
            v for k, v in p_ops.items() if ".shared" in k or k.startswith("bar")
        ),
        "cubin_bytes": len(ck.asm.get("cubin", b"")),
    }
    main = sass_main_count(ck.asm["cubin"]) if "cubin" in ck.asm else None
    if main is not None:
        out["sass_kernel_instructions"] = main
        out["sass_kernel_per_element_static"] = round(main / elems, 2)
    if s_ops is not None:
        out["sass_loop_instructions"] = sum(s_ops.values())
        out["sass_per_element_candidate"] = round(sum(s_ops.values()) / elems, 2)
        out["sass_loop_ops"] = dict(s_ops.most_common())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="*", default=[90, 100])
    ap.add_argument("--method", nargs="*", default=["absmax", "mse", "wmse"], choices=list(METHODS))
    ap.add_argument("--bm", type=int, default=128)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    import triton

    rows = []
    for arch in args.arch:
        for method in args.method:
            for hw in [False, True] if arch >= 100 else [False]:
                rows.append(report(arch, method, hw, args.bm, args.warps))
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"triton {triton.__version__}; BM={args.bm} blocks/program, num_warps={args.warps}")
        print(
            "arch    method hw_e2m1  PTX/elem/cand  SASS/elem/cand  loop shared-mem ops  "
            "kernel SASS/elem (static, loop once)"
        )
        for r in rows:
            sass = r.get("sass_per_element_candidate", "n/a") if r["method"] != "absmax" else "-"
            ptx = r["ptx_per_element_candidate"] if r["method"] != "absmax" else "-"
            print(
                f"{r['arch']:7} {r['method']:6} {str(r['hw_e2m1']):7}  "
                f"{ptx:>13}  {sass:>14}  {r['shared_memory_in_loop']:>19}  "
                f"{r.get('sass_kernel_per_element_static', 'n/a')}"
            )
        for r in rows:
            if r["method"] == "absmax":
                continue
            ops = r.get("sass_loop_ops") or r["ptx_loop_ops"]
            kind = "SASS" if "sass_loop_ops" in r else "PTX"
            top = ", ".join(f"{k} {v}" for k, v in list(ops.items())[:14])
            print(f"{r['arch']} {r['method']} hw={r['hw_e2m1']} {kind} loop ops: {top}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
