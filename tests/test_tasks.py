"""Zero-shot tasks (issue 24): lm-eval's prompts on the real data, the scorer against an
independent one-request-at-a-time computation, the metrics, and the evaluation's
task path on the tiny model."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from plugin_support import tiny_model_dir

from scalesweep_vllm.evaluate import evaluate, zeroshot
from scalesweep_vllm.evaluate.cli import main as eval_main
from scalesweep_vllm.evaluate.run import prepare
from scalesweep_vllm.evaluate.tasks import TASKS, Item, _hellaswag_clean, load_items, parse_tasks
from scalesweep_vllm.quantize import assets


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.default_model_dir())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


# The first item of every task, as lm-eval builds it (read off the raw rows by hand).
FIRST = {
    "arc_easy": (
        "Question: Which statement best explains why photosynthesis is the foundation of "
        "most food webs?\nAnswer:",
        " Sunlight is the source of energy for nearly all ecosystems.",
        0,
        4,
    ),
    "hellaswag": (
        "Roof shingle removal: A man is sitting on a roof. He",
        " is using wrap to wrap a pair of skis.",
        3,
        4,
    ),
    "piqa": (
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
        " Provide the guinea pig with a cage full of a few inches of bedding made of ripped "
        "paper strips, you will also need to supply it with a water bottle and a food dish.",
        0,
        2,
    ),
    "winogrande": (
        "Sarah was a much better surgeon than Maria so Sarah",
        " always got the easier cases.",
        1,
        2,
    ),
}
SIZES = {"arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "piqa": 1838}


@pytest.mark.parametrize("task", sorted(FIRST))
def test_first_item_is_lm_evals_prompt(task):
    ctx, cont, gold, n = FIRST[task]
    it = load_items(task, 1)[0]
    assert (it.contexts[0], it.continuations[0], it.gold, len(it.contexts)) == (
        ctx,
        cont,
        gold,
        n,
    )
    if task == "winogrande":  # partial evaluation: the option goes in the context
        assert it.contexts[1] == "Sarah was a much better surgeon than Maria so Maria"
        assert it.continuations[1] == cont and it.lengths == (1, 1)
    else:  # acc_norm divides by the choice's characters, without the delimiter
        assert it.lengths[0] == len(cont) - 1


@pytest.mark.parametrize("task", sorted(SIZES))
def test_split_sizes(task):
    items = load_items(task)
    assert len(items) == SIZES[task]
    assert all(0 <= it.gold < len(it.contexts) for it in items)
    want = {"hellaswag": {4}, "piqa": {2}}.get(task, {3, 4, 5})  # ARC: a few 3 and 5
    assert {len(it.contexts) for it in items} == want


def test_winogrande_and_arc_challenge_sizes():
    assert len(load_items("winogrande")) == 1267
    ch = load_items("arc_challenge", 2)
    assert ch[0].contexts[0].startswith("Question: ") and ch[0].contexts[0].endswith("\nAnswer:")


def test_hellaswag_preprocess():
    raw = "Making a cake: [header] How to bake [title] Mix the flour.  [step] Stir  well."
    # " [title]" -> ". ", brackets dropped, then one pass of "  " -> " " (3 spaces leave 2)
    assert _hellaswag_clean(raw) == "Making a cake: How to bake. Mix the flour.  Stir well."
    assert _hellaswag_clean("  plain text ") == "plain text"


def test_parse_tasks_and_limits():
    assert parse_tasks("piqa, arc_easy,piqa") == ["piqa", "arc_easy"]
    assert parse_tasks("all") == list(TASKS)
    with pytest.raises(ValueError, match="unknown task"):
        parse_tasks("mmlu")
    with pytest.raises(ValueError, match="at least 1"):
        load_items("piqa", 0)


def test_encode_pair_moves_trailing_spaces(tok):
    ctx, cont = zeroshot.encode_pair(tok, "Answer: ", "yes")
    assert ctx == tok("Answer:", add_special_tokens=False)["input_ids"]
    assert ctx + cont == tok("Answer: yes", add_special_tokens=False)["input_ids"]


def _pairs(seed: int = 0):
    """Items of 1-4 choices sharing a context, and lone requests, of mixed lengths."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for n_ctx, n_choices in ((3, 4), (17, 1), (9, 2), (1, 3), (30, 1), (12, 4), (5, 2)):
        ctx = torch.randint(0, 1000, (n_ctx,), generator=g).tolist()
        for _ in range(n_choices):
            n = int(torch.randint(1, 7, (), generator=g))
            pairs.append((ctx, torch.randint(0, 1000, (n,), generator=g).tolist()))
    return pairs


def _one_at_a_time(model, pairs):
    out = []
    for ctx, cont in pairs:
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids, use_cache=False).logits[0].double(), -1)
        out.append(sum(float(lp[i - 1, ids[0, i]]) for i in range(len(ctx), ids.shape[1])))
    return out


@pytest.mark.parametrize("budget", [16, 64, 4096])
def test_packed_loglikelihoods_equal_one_at_a_time(tiny, budget):
    """Choices sharing a context in one row under a mask, rows right-padded: each score
    equals a lone forward of ``ctx + cont`` (float32, up to GEMM rounding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    pairs = _pairs()
    got = zeroshot.loglikelihoods(model, pairs, budget=budget, progress=False)
    assert got == pytest.approx(_one_at_a_time(model, pairs), abs=1e-4)


def test_packed_loglikelihoods_through_the_quantized_forward(tmp_path_factory):
    """The same through W4A4KV4Q4 (activations, K, V, Q quantized per token): the other
    choices and the padding do not reach a token. A flip of a 4-bit rounding by GEMM
    rounding would move a score by far more than the tolerance."""
    from plugin_support import tiny_checkpoint

    from scalesweep_vllm.evaluate import Checkpoint, build_model

    ckpt = Checkpoint.from_dir(tiny_checkpoint(tmp_path_factory, "W4A4KV4Q4"))
    model = build_model(ckpt, dtype=torch.float32)
    pairs = _pairs(1)
    got = zeroshot.loglikelihoods(model, pairs, budget=64, progress=False)
    assert got == pytest.approx(_one_at_a_time(model, pairs), abs=1e-3)


def test_requests_are_checked():
    with pytest.raises(ValueError, match="empty"):
        zeroshot._packs([([], [1])], 8)
    with pytest.raises(ValueError, match="exceeds the window"):
        zeroshot._packs([([1], list(range(9)))], 8)
    # a long context is cut on the left to the window, as lm-eval cuts it
    (p,) = zeroshot._packs([(list(range(20)), [7, 8])], 8)
    assert p.ctx == list(range(13, 20)) and len(p) == 8


def _item(gold, lengths):
    n = len(lengths)
    return Item("piqa", 0, ("q",) * n, (" a",) * n, gold, tuple(lengths))


def test_acc_norm_and_stderr():
    items = [_item(0, (1, 10)), _item(1, (1, 10)), _item(1, (10, 1)), _item(0, (2, 2))]
    lls = [[-2.0, -5.0], [-2.0, -5.0], [-4.0, -3.0], [-1.0, -1.0]]
    res = zeroshot.score_items(items, lls)
    # acc: argmax of ll (ties: the first); acc_norm: argmax of ll / length
    assert res["acc_items"] == "1011" and res["acc_norm_items"] == "0101"
    assert res["acc"] == 0.75 and res["acc_norm"] == 0.5
    assert res["acc_stderr"] == pytest.approx(statistics.stdev([1, 0, 1, 1]) / 2)


def test_recovery_and_paired_difference():
    base = {"piqa": {"primary": "acc_norm", "acc_norm": 0.5, "acc_norm_items": "1100"}}
    quant = {"piqa": {"primary": "acc_norm", "acc_norm": 0.25, "acc_norm_items": "0100"}}
    r = zeroshot.compare(quant, base)
    assert r["mean_recovery"] == 0.5
    t = r["tasks"]["piqa"]
    assert t["diff"] == -0.25
    assert t["diff_stderr"] == pytest.approx(statistics.stdev([-1, 0, 0, 0]) / 2)
    with pytest.raises(ValueError, match="items"):
        zeroshot.compare(quant, {"piqa": {**base["piqa"], "acc_norm_items": "11"}})


@pytest.mark.slow
def test_bf16_piqa_slice_against_hand_computation(tok):
    """SmolLM2-135M-Instruct, float32, the first 20 PIQA items. The expected bits were
    computed once by hand-written code independent of the scorer (each choice a single
    forward of ``"Question: {goal}\\nAnswer: {sol}"``, summing the continuation's
    log-probs): acc 14/20, acc_norm 14/20. The closest acc_norm decision is 0.0063 nats
    per character apart, far above float32 rounding."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        assets.default_model_dir(), dtype=torch.float32
    ).eval()
    r = zeroshot.run_tasks(model, tok, ["piqa"], 20, progress=False)["piqa"]
    assert r["acc_items"] == "10011111110010101111"
    assert r["acc_norm_items"] == "00011111110111101110"
    assert r["acc"] == r["acc_norm"] == 0.7
    assert r["acc_norm_stderr"] == pytest.approx(math.sqrt(0.7 * 0.3 / 19))


def test_tasks_in_the_evaluation(tiny, tmp_path, monkeypatch):
    """A few items of every task (and the held-out text) through the quantized forward
    of a GPTQ recipe; the BF16 task results come from the cache on the second run."""
    res = evaluate(
        model=str(tiny),
        recipe="wmse",
        gptq=True,
        tokens=128,
        seq_len=64,
        tasks="all",
        tasks_limit=2,
        settings=["W4A4KV4Q4"],
        progress=False,
        cache=tmp_path,
        num_samples=16,
        calib_seq_len=64,
    )
    assert res["source"]["gptq"] is True
    assert res["tasks"] == {"names": list(TASKS), "limit": 2}
    assert res["environment"]["dtype"] in ("torch.float32", "torch.bfloat16")
    run = res["runs"][0]
    assert run["kld_mean"] > 0
    rec = run["recovery"]
    for task in TASKS:
        q, b = run["tasks"][task], res["bf16_tasks"][task]
        assert q["n"] == b["n"] == 2
        m = TASKS[task].primary
        want = q[m] / b[m] if b[m] else float("nan")
        got = rec["tasks"][task]["recovery"]
        assert got == want or (math.isnan(got) and math.isnan(want))
    assert len(list((tmp_path / "tasks").glob("*.json"))) == len(TASKS)

    def boom(*a, **k):
        raise AssertionError("BF16 task results were recomputed")

    monkeypatch.setattr(zeroshot, "loglikelihoods", boom)
    ctx = prepare(str(tiny), tokens=0, progress=False, cache=tmp_path, tasks="all", tasks_limit=2)
    assert ctx.task_base == res["bf16_tasks"]


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--gptq"], "--gptq needs --recipe"),
        (["--tokens", "0"], "needs --tasks"),
        (["--tasks", "piqa", "--tasks-limit", "0"], "at least 1"),
    ],
)
def test_cli_rejects(argv, msg, capsys):
    with pytest.raises(SystemExit):
        eval_main(argv)
    assert msg in capsys.readouterr().err
