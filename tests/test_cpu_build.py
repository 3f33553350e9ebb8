"""The C++ CPU backend builds for every instruction-set level, and its absence is
never silent where it should exist.

The levels this CPU runs are built and checked bit for bit by test_kernels_cpu.py
(its module fixture runs every test on each). Here: the levels it cannot run, and
aarch64 with Debian's cross compiler, compile to object files (so a construct that
only one level's code generator rejects, like the 64-byte asm constraint GCC 12
refused on AVX2, fails here); the ISA choice; the set-up's and the tests' rules for
a missing backend.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

import pytest

from scalesweep_vllm.kernels import cpu_backend, cpu_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CROSS = {"aarch64": "aarch64-linux-gnu-g++"}

#: /proc/cpuinfo flags of real CPUs (abridged to what matters).
EPYC_ZEN2 = set(
    "fpu sse sse2 ssse3 fma sse4_1 sse4_2 movbe popcnt xsave avx f16c abm bmi1 avx2 bmi2".split()
)
SKYLAKE_SP = EPYC_ZEN2 | {"avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl"}
SANDY_BRIDGE = set("fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt xsave avx".split())


@pytest.mark.parametrize(
    ("flags", "want"),
    [
        (EPYC_ZEN2, ["generic", "avx2"]),
        (SKYLAKE_SP, ["generic", "avx2", "avx512"]),
        (SANDY_BRIDGE, ["generic"]),
        (SKYLAKE_SP - {"bmi2"}, ["generic"]),  # AVX-512 needs the AVX2 level under it
        (set(), ["generic"]),
    ],
)
def test_levels_from_cpu_flags(flags, want, monkeypatch):
    monkeypatch.setattr(cpu_build, "_is_x86", lambda machine=None: True)
    assert cpu_build.cpu_isas(flags) == want


def test_isa_forced_by_environment(monkeypatch):
    monkeypatch.setattr(cpu_build, "cpu_isas", lambda flags=None: ["generic", "avx2"])
    monkeypatch.delenv(cpu_build.ISA_ENV, raising=False)
    assert cpu_build.requested_isa() == "avx2"
    monkeypatch.setenv(cpu_build.ISA_ENV, "generic")
    assert cpu_build.requested_isa() == "generic"
    monkeypatch.setenv(cpu_build.ISA_ENV, "AVX2")
    assert cpu_build.requested_isa() == "avx2"
    monkeypatch.setenv(cpu_build.ISA_ENV, "avx512")
    with pytest.raises(ValueError, match="runs only generic, avx2"):
        cpu_build.requested_isa()
    monkeypatch.setenv(cpu_build.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="choose one of generic, avx2, avx512"):
        cpu_build.requested_isa()
    with pytest.raises(ValueError, match="cannot run the avx512 build"):
        cpu_build.build("avx512")


def test_flags_keep_every_rounding():
    """No fused multiply-add and no fast-math at any level (the bit-exactness rests on it)."""
    for isa in cpu_build.ISAS:
        f = cpu_build.flags(isa, machine="x86_64")
        assert "-ffp-contract=off" in f and "-fno-fast-math" in f
        assert not any("fast-math" in x and x != "-fno-fast-math" for x in f)
    assert cpu_build.flags("generic", machine="x86_64")[-2:] == ["-march=x86-64", "-mtune=generic"]
    assert "-march=x86-64-v3" in cpu_build.flags("avx2", machine="x86_64")
    assert "-march=x86-64-v4" in cpu_build.flags("avx512", machine="x86_64")
    assert not any(x.startswith("-march") for x in cpu_build.flags("generic", machine="aarch64"))
    with pytest.raises(ValueError, match="x86 level"):
        cpu_build.flags("avx2", machine="aarch64")


# -- levels this CPU cannot run, and aarch64: compiled, not run -------------------------


def _targets():
    out = [(isa, "g++", None) for isa in cpu_build.ISAS if isa not in cpu_build.cpu_isas()]
    if cpu_build._is_x86():
        out += [("generic", cxx, machine) for machine, cxx in CROSS.items()]
    return out


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every target compiled at once (two cores: about a minute for all), keyed by target."""
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    out: dict = {}
    d = tmp_path_factory.mktemp("objects")

    def one(target):
        isa, cxx, machine = target
        if shutil.which(cxx) is None:
            out[target] = None
            return
        obj = d / f"{isa}-{machine or 'x86_64'}.o"
        out[target] = (cpu_build.compile_object(isa, obj, cxx=cxx, machine=machine), obj)

    threads = [threading.Thread(target=one, args=(t,)) for t in _targets()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("target", _targets(), ids=lambda t: f"{t[0]}-{t[2] or 'x86_64'}")
def test_levels_this_cpu_cannot_run_compile(target, compiled):
    got = compiled[target]
    if got is None:
        msg = f"{target[1]} not installed (Debian: apt-get install g++-aarch64-linux-gnu)"
        if os.environ.get("CI"):
            pytest.fail(f"{msg}; .ci/run installs it, so CI must have it")
        pytest.skip(msg)
    res, obj = got
    assert res.returncode == 0, res.stderr[-4000:]
    head = obj.read_bytes()[:20]
    assert head[:4] == b"\x7fELF"
    machine = int.from_bytes(head[18:20], "little")  # e_machine: 62 x86-64, 183 aarch64
    assert machine == (183 if target[2] == "aarch64" else 62)


# -- no silent fallback ------------------------------------------------------------------


def test_required_where_ci_or_a_toolchain(monkeypatch):
    monkeypatch.delenv(cpu_backend.DISABLE_ENV, raising=False)
    monkeypatch.setattr(cpu_build, "toolchain", lambda: "a C++ compiler (g++)")
    monkeypatch.delenv("CI", raising=False)
    assert cpu_backend.required() == ""
    monkeypatch.setenv("CI", "true")
    assert cpu_backend.required() == "CI is set"
    monkeypatch.setenv("CI", "false")
    assert cpu_backend.required() == ""
    monkeypatch.setattr(cpu_build, "toolchain", lambda: "")
    assert cpu_backend.required() == "g++ and ninja are installed"
    monkeypatch.setenv(cpu_backend.DISABLE_ENV, "0")  # turned off on purpose
    assert cpu_backend.required() == ""


def test_backend_available_where_required():
    """The check that was missing on the AVX2 machine: 55 tests skipped and CI passed."""
    why = cpu_backend.required()
    if not cpu_backend.available():
        if why:
            pytest.fail(
                f"C++ CPU backend unavailable ({cpu_backend.why()}) although {why}; build log:\n"
                + cpu_backend.build_log()
            )
        pytest.skip(f"no toolchain here: {cpu_build.toolchain()} missing")
    assert cpu_backend.isa() == cpu_build.requested_isa()


def test_setup_fails_only_where_it_could_build(monkeypatch, capsys):
    def broken(isa=None, verbose=False):
        raise RuntimeError("Error building extension 'x': nvfp4_cpu.cpp:1: error: boom")

    monkeypatch.setattr(cpu_build, "build", broken)
    monkeypatch.setattr(cpu_build, "toolchain", lambda: "")
    assert cpu_build.main(["--setup"]) == 1
    assert "error: boom" in capsys.readouterr().err
    monkeypatch.setattr(cpu_build, "toolchain", lambda: "ninja")
    assert cpu_build.main(["--setup"]) == 0
    assert "ninja not found" in capsys.readouterr().err
    assert cpu_build.main([]) == 1  # asked for by hand: always an error


def test_setup_script_stops_on_a_failed_build(tmp_path):
    """scripts/setup.sh's build line, run as it is, exits non-zero on a bad level."""
    if cpu_build.toolchain():
        pytest.skip(f"{cpu_build.toolchain()} missing: set-up may go on without the backend")
    line = next(
        ln for ln in open(os.path.join(ROOT, "scripts", "setup.sh")) if "cpu_build --setup" in ln
    )
    env = dict(os.environ, VENV=os.path.dirname(os.path.dirname(sys.executable)))
    env[cpu_build.ISA_ENV] = "not-a-level"
    res = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + line + "echo REACHED"],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode != 0 and "REACHED" not in res.stdout
    assert "not-a-level" in res.stderr


def _private_cache_with_this_build(tmp_path, monkeypatch):
    """A private extension cache holding a copy of this machine's build (no compile)."""
    if not cpu_backend.available():
        pytest.skip(f"no C++ backend here: {cpu_backend.why()}")
    isa = cpu_backend.isa()
    src = cpu_build.build_directory(isa)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    dst = cpu_build.build_directory(isa)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lock", "scalesweep.flock"))
    return isa, dst


def test_a_killed_build_never_blocks_the_next(tmp_path, monkeypatch):
    """Stop 33's CI timeout: a build killed inside torch's lock left ``lock`` behind,
    and the next set-up waited on it until CI's 90 minutes ran out."""
    isa, d = _private_cache_with_this_build(tmp_path, monkeypatch)
    (d / "lock").touch()
    code = f"from scalesweep_vllm.kernels import cpu_build as b; print(b.build({isa!r}).__file__)"
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().startswith(str(d))
    assert "left by a build that was killed" in res.stderr
    assert not (d / "lock").exists()


def test_a_live_build_is_waited_for_and_named(tmp_path, monkeypatch):
    """A build lock held by a live process is waited on (up to the timeout, then an
    error naming it); the kernel frees it the moment its holder dies."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    isa = cpu_build.cpu_isas()[-1]
    d = cpu_build.build_directory(isa)
    d.mkdir(parents=True)
    hold = (
        "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); "
        "fcntl.flock(f, fcntl.LOCK_EX); f.write(str(os.getpid())); f.flush(); "
        "print('held', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(d / "scalesweep.flock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError, match=f"pid {holder.pid}"):
            cpu_build.build(isa, lock_timeout_s=1.0)
    finally:
        holder.kill()
        holder.wait()
    with cpu_build._build_lock(d, timeout_s=5.0):
        assert (d / "scalesweep.flock").read_text() == str(os.getpid())
