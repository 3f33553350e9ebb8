"""Building the C++ CPU backend (``cpu/nvfp4_cpu.cpp``) for an instruction-set level.

One source, three x86-64 builds, each bit-exact with the reference (the source is
portable GCC vector code; the only intrinsics are AVX-512 min/max/sqrt, guarded by
``__AVX512F__``, and they compute what the portable fallbacks do):

- ``generic``: ``-march=x86-64`` (SSE2), no ``-march`` off x86: every x86-64 CPU
  (and aarch64, ...);
- ``avx2``: ``-march=x86-64-v3`` (AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE): Intel
  Haswell and later, AMD Zen 1 and later;
- ``avx512``: ``-march=x86-64-v4 -mprefer-vector-width=512`` (AVX-512 F/BW/CD/DQ/VL):
  Intel Skylake-SP and later, AMD Zen 4 and later.

The x86 levels are the psABI's microarchitecture levels (GCC 11+), so a build uses
nothing beyond the features its level names, and the CPU check below is exactly
those features. ``-ffp-contract=off`` in every build: v3 enables FMA and GCC would
otherwise fuse ``a * b + c`` (one rounding instead of the reference's two); GCC's
default on aarch64 fuses too.

The build is picked from the CPU's flags (the best level it runs), or forced with
``SCALESWEEP_CPU_ISA=generic|avx2|avx512`` (or ``build(isa=...)``); forcing a level the
CPU cannot run is an error, never an illegal instruction later. The module name
carries the machine and the tag, so a shared extension cache never hands one CPU
another's build. :func:`compile_object` compiles the source for any level (or a cross
compiler's target) without linking or loading it: how the tests prove that the
levels this CPU cannot run still build.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import sysconfig

__all__ = [
    "ISAS",
    "ISA_ENV",
    "build",
    "build_directory",
    "compile_object",
    "cpu_isas",
    "flags",
    "main",
    "module_name",
    "requested_isa",
    "toolchain",
]

ISA_ENV = "SCALESWEEP_CPU_ISA"
ISAS = ("generic", "avx2", "avx512")
SOURCE = pathlib.Path(__file__).with_name("cpu") / "nvfp4_cpu.cpp"
#: Every translation unit of the module (the quantizer and the packed GEMMs).
SOURCES = (SOURCE, SOURCE.with_name("nvfp4_gemm.cpp"))
_COMMON = [
    "-O3",
    "-ffp-contract=off",
    "-fno-fast-math",
    "-fno-math-errno",
    "-fopenmp",
    "-Wno-psabi",
]
#: x86 flags each level needs from /proc/cpuinfo (what -march enables and the code uses).
_NEEDS = {
    "generic": set(),
    "avx2": {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"},
    "avx512": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
}


def _is_x86(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64", "i686", "x86")


def _cpu_flags() -> set[str]:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_units(cpu_flags: set[str] | None = None) -> bool:
    """Whether the CPU has bf16 arithmetic (AVX512_BF16 or AMX). Without it torch's bf16
    GEMM is emulated, 10-100x slower than its fp32 GEMM."""
    have = _cpu_flags() if cpu_flags is None else cpu_flags
    return bool(have & {"avx512_bf16", "amx_bf16"})


def cpu_isas(cpu_flags: set[str] | None = None) -> list[str]:
    """The levels this CPU runs, lowest first (``generic`` always; AVX levels on x86)."""
    if not _is_x86():
        return ["generic"]
    have = _cpu_flags() if cpu_flags is None else cpu_flags
    out = ["generic"]
    for tag in ISAS[1:]:  # each level includes the one below
        if not _NEEDS[tag] <= have:
            break
        out.append(tag)
    return out


def requested_isa() -> str:
    """``$SCALESWEEP_CPU_ISA`` if set (checked against this CPU), else the best level
    this CPU runs. ValueError names the problem."""
    runs = cpu_isas()
    want = os.environ.get(ISA_ENV, "").strip().lower()
    if not want or want in ("auto", "native"):
        return runs[-1]
    if want not in ISAS:
        raise ValueError(f"{ISA_ENV}={want!r}: choose one of {', '.join(ISAS)} (or auto)")
    if want not in runs:
        raise ValueError(
            f"{ISA_ENV}={want}: this CPU ({platform.machine()}) runs only {', '.join(runs)}"
        )
    return want


def flags(isa: str, machine: str | None = None) -> list[str]:
    """Compiler flags of a level (``machine`` defaults to this one)."""
    if isa not in ISAS:
        raise ValueError(f"unknown ISA {isa!r}; choose one of {ISAS}")
    if not _is_x86(machine):
        if isa != "generic":
            raise ValueError(
                f"{isa} is an x86 level; {machine or platform.machine()} has generic only"
            )
        return list(_COMMON)
    march = {
        "generic": ["-march=x86-64", "-mtune=generic"],
        "avx2": ["-march=x86-64-v3"],
        "avx512": ["-march=x86-64-v4", "-mprefer-vector-width=512"],
    }[isa]
    return [*_COMMON, *march]


def module_name(isa: str) -> str:
    return f"scalesweep_nvfp4_cpu_{platform.machine().lower()}_{isa}"


def toolchain() -> str:
    """What is missing to build here ('' when g++ and ninja are both found)."""
    from torch.utils import cpp_extension

    missing = []
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        missing.append("a C++ compiler (g++)")
    if not cpp_extension.is_ninja_available():
        missing.append("ninja")
    return " and ".join(missing)


def build_directory(isa: str) -> pathlib.Path:
    """Where ``isa``'s build lives: ``$TORCH_EXTENSIONS_DIR`` (default
    ``~/.cache/torch_extensions``) / ``scalesweep`` / the Python and torch versions /
    :func:`module_name` and a hash of the paths the build commands name (the sources,
    torch's and Python's headers). The torch version is in the path because the
    extension links against torch's C++ ABI, which torch's own cache key does not
    include; the paths because ninja rebuilds when a command changes, so two checkouts
    or two venvs sharing one folder would rebuild it in turns."""
    import sys

    import torch
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
    # what build.ninja's commands name: the sources, torch's headers, Python's headers
    paths = (
        SOURCE.parent.resolve(),
        pathlib.Path(torch.__file__).parent,
        sysconfig.get_paths()["include"],
    )
    where = hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()[:10]
    return pathlib.Path(root) / "scalesweep" / tag / f"{module_name(isa)}-{where}"


@contextlib.contextmanager
def _build_lock(directory: pathlib.Path, timeout_s: float):
    """Hold ``directory``'s build lock: an advisory ``flock``, which the kernel drops
    when its holder dies, so a killed build never blocks the next one.

    torch's own lock (``directory/lock``, a file created with ``O_EXCL`` and waited on
    forever while it exists) is left behind by a build that was killed. Every build of
    this directory goes through this lock first, so a torch lock found while holding
    it is such a leftover: it is removed, with a warning."""
    import fcntl
    import time
    import warnings

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "scalesweep.flock", "a+") as f:
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - start > timeout_s:
                    f.seek(0)
                    holder = f.read().strip() or "unknown"
                    raise TimeoutError(
                        f"another process (pid {holder}) has held the build lock of "
                        f"{directory} for over {timeout_s:.0f} s; if it is gone, this is a bug"
                    ) from None
                time.sleep(0.2)
        try:
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            stale = directory / "lock"
            if stale.exists():
                warnings.warn(f"removing {stale}, left by a build that was killed", stacklevel=3)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(isa: str | None = None, verbose: bool = False, lock_timeout_s: float = 1800.0):
    """Compile (or find in :func:`build_directory`) and import the extension for ``isa``
    (default :func:`requested_isa`). Raises on a level this CPU cannot run, with the
    compiler's output when the build fails, and ``TimeoutError`` when another live
    process holds the build lock for over ``lock_timeout_s``. Processes building at
    once (tensor-parallel workers, test runners) take turns; a killed build's leftovers
    never block (:func:`_build_lock`)."""
    from torch.utils import cpp_extension

    isa = isa or requested_isa()
    if isa not in cpu_isas():
        raise ValueError(f"this CPU cannot run the {isa} build (it runs {', '.join(cpu_isas())})")
    directory = build_directory(isa)
    with _build_lock(directory, lock_timeout_s):
        return cpp_extension.load(
            name=module_name(isa),
            sources=[str(s) for s in SOURCES],
            extra_cflags=flags(isa),
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=verbose,
        )


def compile_object(isa: str, out: pathlib.Path, cxx: str = "g++", machine: str | None = None):
    """Compile the sources to object files for ``isa`` with ``cxx`` (a cross compiler
    such as ``aarch64-linux-gnu-g++`` with ``machine="aarch64"``), without linking or
    loading them: ``out`` for the first, ``out`` with the source's name appended for
    the others. Returns the ``CompletedProcess`` of the first that failed, else of the
    last (check ``returncode``, ``stderr``)."""
    from torch.utils import cpp_extension

    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    res = None
    for i, src in enumerate(SOURCES):
        obj = out if i == 0 else out.with_name(f"{out.stem}-{src.stem}{out.suffix}")
        cmd = [
            cxx,
            "-std=c++20",
            "-fPIC",
            "-c",
            str(src),
            "-o",
            str(obj),
            "-DTORCH_EXTENSION_NAME=" + module_name(isa),
            "-DTORCH_API_INCLUDE_EXTENSION_H",
            *flags(isa, machine),
            *(f"-I{p}" for p in includes),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode:
            return res
    return res


def main(argv: list[str] | None = None) -> int:
    """``python -m scalesweep_vllm.kernels.cpu_build [--isa TAG | --all] [--setup]``.

    Builds ahead and prints the log. Exit status 1 when a build fails, except with
    ``--setup`` on a machine without g++ or ninja: there the backend is optional (the
    reference serves) and a warning says so (exit 0)."""
    import argparse
    import sys
    import time

    p = argparse.ArgumentParser(description="Build the C++ CPU backend ahead (scripts/setup.sh).")
    p.add_argument("--isa", choices=ISAS, help=f"one level (default: ${ISA_ENV} or the best)")
    p.add_argument("--all", action="store_true", help="every level this CPU runs")
    p.add_argument(
        "--setup", action="store_true", help="a failure is fatal only where g++ and ninja exist"
    )
    a = p.parse_args(argv)
    try:
        tags = cpu_isas() if a.all else [a.isa or requested_isa()]
        for tag in tags:
            t = time.perf_counter()
            m = build(tag, verbose=not a.setup)
            dt = time.perf_counter() - t
            print(f"scalesweep CPU backend ready ({tag}, {dt:.1f} s): {m.__file__}")
    except Exception as err:  # noqa: BLE001 - report with the log's tail
        tail = "\n".join(str(err).strip().splitlines()[-30:])
        missing = toolchain()
        if a.setup and missing:
            print(
                f"warning: the C++ CPU backend was not built ({missing} not found); CPU runs "
                "use the torch reference (same results, about 100x slower)",
                file=sys.stderr,
            )
            return 0
        print(f"error: the C++ CPU backend did not build:\n{tail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
