"""Hub ids and Hugging Face datasets for ``--model`` and ``--calib`` (issue 27).

No network: each test builds a Hugging Face hub cache by hand, in the layout
huggingface_hub writes (``models--owner--name/{refs/main, snapshots/<sha>/...}``),
and runs offline. A hub id must give the same checkpoint as the folder it names, a
dataset the same calibration tokens as the same texts in a file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("datasets")
import datasets  # noqa: E402
from huggingface_hub import constants  # noqa: E402

from scalesweep_vllm.quantize import cli, data, hub  # noqa: E402
from scalesweep_vllm.quantize.dataset import DatasetSource, read_dataset, select  # noqa: E402

SHA = "0123456789abcdef0123456789abcdef01234567"
TEXTS = [
    " ".join([f"Document {i}: the quick brown fox {i} jumps over the lazy dog."] * 3)
    for i in range(30)
]
CHATS = [
    [
        {"role": "user", "content": f"Question {i}?"},
        {"role": "assistant", "content": f"Answer {i}."},
    ]
    for i in range(30)
]
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"


def _cached_repo(cache: Path, repo_id: str, repo_type: str, files: Path) -> Path:
    """``files``' contents as the cached snapshot of ``repo_id`` (huggingface_hub's layout:
    the snapshot's files link to blobs)."""
    kind = {"model": "models", "dataset": "datasets"}[repo_type]
    repo = cache / f"{kind}--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / SHA
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted(p for p in files.rglob("*") if p.is_file())):
        blob = repo / "blobs" / f"blob{i:04d}"
        shutil.copyfile(f, blob)
        dst = snap / f.relative_to(files)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(os.path.relpath(blob, dst.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(SHA)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, offline (huggingface_hub reads both at call time)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    return cache


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _dataset_repo(tmp_path: Path, cache: Path, repo_id: str = "acme/wiki-mini") -> None:
    files = tmp_path / "dataset-files"
    _jsonl(
        files / "data" / "train.jsonl",
        [{"text": t, "messages": c} for t, c in zip(TEXTS, CHATS, strict=True)],
    )
    _jsonl(files / "data" / "test.jsonl", [{"text": "held out"}])
    _cached_repo(cache, repo_id, "dataset", files)


def _quantize(model: str, out: Path, calib: list[str]) -> int:
    return cli.main(
        ["--model", model, "--output", str(out), "--calib", *calib, "--num-samples", "3",
         "--seq-len", "32", "--scheme", "W4A16", "--objective", "wmse", "--quiet"]
    )  # fmt: skip


def test_repo_id_shape():
    assert hub.is_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert hub.is_repo_id("gpt2")
    for not_id in ("./model", "/abs/model", "~/m", "a/b/c", "data.jsonl", "x.gguf", "a--b", ""):
        assert not hub.is_repo_id(not_id), not_id


def test_hub_ids_give_the_same_checkpoint_as_their_files(tiny, tmp_path, offline_cache):
    """``--model owner/name --calib owner/dataset`` from the cache equals ``--model
    FOLDER --calib FILE.jsonl`` holding the same files and texts, tensor for tensor."""
    _cached_repo(offline_cache, "acme/tiny-llama", "model", tiny)
    _dataset_repo(tmp_path, offline_cache)
    calib_file = _jsonl(tmp_path / "calib.jsonl", [{"text": t} for t in TEXTS])
    assert _quantize(str(tiny), tmp_path / "local", [str(calib_file)]) == 0
    assert _quantize("acme/tiny-llama", tmp_path / "from-hub", ["acme/wiki-mini"]) == 0
    a = load_file(tmp_path / "local" / "model.safetensors")
    b = load_file(tmp_path / "from-hub" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rep = json.loads((tmp_path / "from-hub" / "quantization_report.json").read_text())
    assert "dataset acme/wiki-mini, split train, column text" in rep["calibration"]["source"]


def test_save_to_disk_folder_and_split_and_column(tiny, tmp_path):
    """A DatasetDict folder: --calib-split and --calib-column pick what is read."""
    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"body": ["wrong split"] * 4, "id": [1, 2, 3, 4]}),
            "calib": datasets.Dataset.from_dict({"body": TEXTS, "id": list(range(30))}),
        }
    ).save_to_disk(str(folder))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    src = data.as_dataset(folder, split="calib", column="body")
    got, info = data.calibration_tokens(src, tok, 2, 16)
    want, _ = data.calibration_tokens(TEXTS, tok, 2, 16)
    assert torch.equal(got, want)
    assert "split calib, column body" in info
    with pytest.raises(ValueError, match="no split 'validation'; its splits: train, calib"):
        data.calibration_tokens(data.as_dataset(folder, split="validation"), tok, 2, 16)
    with pytest.raises(ValueError, match="no column 'text'; its columns: body, id"):
        data.calibration_tokens(data.as_dataset(folder, split="calib", column="text"), tok, 2, 16)
    with pytest.raises(ValueError, match="column 'id' holds .*int64.*neither text"):
        data.calibration_tokens(data.as_dataset(folder, split="calib", column="id"), tok, 2, 16)


def test_chat_messages_use_the_chat_template(tiny, tmp_path, offline_cache):
    _dataset_repo(tmp_path, offline_cache)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    src = DatasetSource("acme/wiki-mini", column="messages")
    with pytest.raises(ValueError, match="no chat template"):
        data.calibration_tokens(src, tok, 2, 16)
    tok.chat_template = TEMPLATE
    got, info = data.calibration_tokens(src, tok, 2, 16)
    rendered = [tok.apply_chat_template(c, tokenize=False) for c in CHATS]
    assert rendered[0] == "<|user|>Question 0?</s><|assistant|>Answer 0.</s>"
    want, _ = data.calibration_tokens(rendered, tok, 2, 16)
    assert torch.equal(got, want)
    assert "chat messages" in info


def test_default_column_prefers_text_then_messages(tmp_path):
    folder = tmp_path / "chat-only"
    datasets.Dataset.from_list(
        [{"id": i, "messages": c} for i, c in enumerate(CHATS)]
    ).save_to_disk(str(folder))
    rows, info = read_dataset(DatasetSource(str(folder)))
    assert "column messages (chat messages" in info
    assert next(iter(rows)) == CHATS[0]
    two = tmp_path / "two-strings"
    datasets.Dataset.from_dict({"a": ["x"], "b": ["y"]}).save_to_disk(str(two))
    with pytest.raises(ValueError, match="several string columns; pick one with --calib-column"):
        read_dataset(DatasetSource(str(two)))


def test_rows_are_read_lazily(tiny, tmp_path):
    """Only as many rows as the tokens need are read (a 200k-row dataset costs what
    its first rows cost)."""
    folder = tmp_path / "big"
    datasets.Dataset.from_dict({"text": TEXTS * 100}).save_to_disk(str(folder))
    rows, _ = read_dataset(DatasetSource(str(folder)))
    seen = []

    class Counting:
        def __iter__(self):
            for r in rows:
                seen.append(r)
                yield r

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    data.calibration_tokens(Counting(), tok, 2, 16, source="big")
    assert 0 < len(seen) <= 256 < len(rows)


def test_empty_split_and_wrong_forms(tmp_path, offline_cache, calib_txt):
    empty = datasets.Dataset.from_dict(
        {"text": []}, features=datasets.Features({"text": datasets.Value("string")})
    )
    with pytest.raises(ValueError, match="split 'train' is empty"):
        select(datasets.DatasetDict({"train": empty}), DatasetSource("x"), "x")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "dataset_info.json").write_text("{not json")
    with pytest.raises(ValueError, match="the datasets library cannot read it"):
        read_dataset(DatasetSource(str(broken)))
    with pytest.raises(ValueError, match="apply to a dataset, and --calib .* is a file"):
        data.as_dataset(calib_txt, split="train")
    assert data.as_dataset(calib_txt) is None
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache .* HF_HUB_OFFLINE"):
        read_dataset(DatasetSource("acme/not-cached"))
    with pytest.raises(FileNotFoundError, match="hf download acme/no-model"):
        hub.snapshot("acme/no-model")


def test_cli_errors_exit_2(tiny, tmp_path, offline_cache, calib_txt, capsys):
    rc = _quantize("acme/not-cached-model", tmp_path / "o1", [str(calib_txt)])
    assert rc == 2
    assert "not in the Hugging Face cache" in capsys.readouterr().err
    rc = _quantize(str(tiny), tmp_path / "o2", [str(calib_txt), "--calib-column", "text"])
    assert rc == 2
    assert "--calib-column apply to a dataset" in capsys.readouterr().err
    rc = _quantize(str(tiny), tmp_path / "o3", ["acme/no-such-dataset"])
    assert rc == 2
    assert "hub dataset acme/no-such-dataset" in capsys.readouterr().err
    for o in ("o1", "o2", "o3"):
        assert not (tmp_path / o).exists()


def test_offline_environment_variable(tiny, tmp_path):
    """The user's way: HF_HUB_OFFLINE=1 and HF_HUB_CACHE in the environment of a fresh
    process (huggingface_hub reads them at import)."""
    cache = tmp_path / "hub"
    _cached_repo(cache, "acme/tiny-llama", "model", tiny)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    code = (
        "from scalesweep_vllm.quantize.pipeline import resolve_model_dir as r; "
        "print(r('acme/tiny-llama')); r('acme/other')"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.stdout.strip() == str(cache / "models--acme--tiny-llama" / "snapshots" / SHA)
    assert "FileNotFoundError" in res.stderr and "HF_HUB_OFFLINE is set" in res.stderr
