"""Perplexity against a hand computation, and zero-shot accuracy through lm-eval on a local task."""

from __future__ import annotations

import json
import math

import pytest
import torch

from shortened.cli import main
from shortened.data import token_windows
from shortened.errors import UsageError
from shortened.validators.quality import evaluate, perplexity

TEXT = "the quick brown fox jumps over the lazy dog. " * 9 + "tail"


def _load(path):
    from shortened.model.loading import load_model

    return load_model(str(path))


@pytest.mark.parametrize("add_bos", [False, True])
def test_perplexity_matches_hand_computation(tiny_models, tmp_path, add_bos):
    src = tmp_path / "text.txt"
    src.write_text(TEXT)
    loaded = _load(tiny_models["llama"])
    tok, model = loaded.tokenizer, loaded.model
    seq = 16
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(TEXT)  # one token per character
    body = seq - 1 if add_bos else seq
    n = len(ids) // body  # the remainder after the last full window is dropped
    nll, count = 0.0, 0
    for w in range(n):  # one window at a time, with a plain log-softmax
        row = ([1] if add_bos else []) + ids[w * body : (w + 1) * body]
        with torch.no_grad():
            logits = model(torch.tensor([row])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        for i in range(len(row) - 1):
            nll -= float(logp[i, row[i + 1]])
            count += 1
    r = perplexity(model, tok, str(src), seq_len=seq, add_bos=add_bos, batch_size=3, progress=False)
    assert (r.windows, r.tokens) == (n, n * (seq - 1))
    assert count == r.tokens
    assert r.nll_mean == pytest.approx(nll / count, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    # max_windows takes the first windows only
    r2 = perplexity(model, tok, str(src), seq_len=seq, add_bos=add_bos, max_windows=2, progress=False)
    assert r2.windows == 2 and r2.tokens == 2 * (seq - 1)


def test_token_windows_exact():
    w = token_windows(list(range(10)), 4)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    w = token_windows(list(range(10)), 4, bos_id=99)
    assert w.tolist() == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]
    with pytest.raises(UsageError, match="fewer than one window"):
        token_windows([1, 2], 4)


def test_evaluate_sources_and_errors(tiny_models, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT)
    b.write_text(TEXT.upper())
    res = evaluate(tiny_models["gemma2"], ppl=f"{a},{b}", seq_len=32, progress=False)
    assert set(res["perplexity"]) == {str(a), str(b)}
    assert res["add_bos"] is True  # Gemma gets BOS on every window by default
    assert res["perplexity"][str(a)]["ppl"] != res["perplexity"][str(b)]["ppl"]
    with pytest.raises(UsageError, match="not found"):
        evaluate(tiny_models["llama"], ppl=str(tmp_path / "missing.txt"))
    with pytest.raises(UsageError, match="nothing to evaluate"):
        evaluate(tiny_models["llama"], ppl=None)


# ---------------------------------------------------------------------------------------------
# zero-shot: a small local multiple-choice task in lm-eval's own format

DOCS = [
    {"question": "What color is the sky", "choices": ["blue", "green"], "label": 0},
    {"question": "How many legs has a cat", "choices": ["four", "two", "ten"], "label": 0},
    {"question": "Water freezes into", "choices": ["steam", "ice"], "label": 1},
    {"question": "The sun rises in the", "choices": ["west", "east"], "label": 1},
    {"question": "A baby dog is a", "choices": ["kitten", "puppy", "calf"], "label": 1},
    {"question": "Fish live in", "choices": ["water", "trees"], "label": 0},
]


@pytest.fixture
def local_task(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\n"
        "output_type: multiple_choice\n"
        "validation_split: validation\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_target: label\n"
        'doc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
        "metadata:\n  version: 1.0\n"
    )
    return tmp_path


def _hand_scores(model, tok):
    """acc and acc_norm by hand: sum of log-probs of " choice" after the prompt; norm divides by len(choice)."""
    acc = acc_norm = 0
    for d in DOCS:
        ctx = tok(f"Question: {d['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
        lls = []
        for c in d["choices"]:
            cont = tok(" " + c, add_special_tokens=False)["input_ids"]
            x = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(x).logits[0].double(), -1)
            lls.append(sum(float(logp[len(ctx) + i - 1, t]) for i, t in enumerate(cont)))
        acc += int(max(range(len(lls)), key=lambda i: lls[i]) == d["label"])
        norm = [ll / len(c) for ll, c in zip(lls, d["choices"])]  # lm-eval: length of the choice text
        acc_norm += int(max(range(len(norm)), key=lambda i: norm[i]) == d["label"])
    return acc / len(DOCS), acc_norm / len(DOCS)


def test_zeroshot_local_task_matches_hand_computation(tiny_models, local_task):
    pytest.importorskip("lm_eval")
    from shortened.validators.zeroshot import zeroshot

    loaded = _load(tiny_models["llama"])
    acc, acc_norm = _hand_scores(loaded.model, loaded.tokenizer)
    res = zeroshot(loaded.model, loaded.tokenizer, ["tiny_mc", "tiny_mc:acc_norm"], include_path=str(local_task))
    # "tiny_mc:acc_norm" overrides the plain entry: one task, reported with acc_norm
    t = res["tasks"]["tiny_mc"]
    assert t["samples"] == len(DOCS)
    assert t["all"]["acc"] == pytest.approx(acc)
    assert t["all"]["acc_norm"] == pytest.approx(acc_norm)
    assert t["metric"] == "acc_norm" and res["average"] == pytest.approx(acc_norm)


def test_zeroshot_task_names():
    from shortened.validators.zeroshot import PAPER_TASKS, parse_tasks

    assert parse_tasks(None) == PAPER_TASKS and parse_tasks("paper") == PAPER_TASKS
    assert parse_tasks("piqa,hellaswag,foo:f1") == {"piqa": "acc", "hellaswag": "acc_norm", "foo": "f1"}
    with pytest.raises(UsageError, match="empty"):
        parse_tasks(",")


def test_eval_cli(tiny_models, local_task, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    src = tmp_path / "t.txt"
    src.write_text(TEXT)
    out = tmp_path / "eval.json"
    argv = [str(tiny_models["llama"]), "--ppl", str(src), "--seq-len", "16", "--add-bos", "--json", str(out)]
    rc = main(["eval", *argv, "--tasks", "tiny_mc", "--include-path", str(local_task), "--limit", "4"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["perplexity"][str(src)]["seq_len"] == 16 and res["add_bos"] is True
    assert res["zeroshot"]["tasks"]["tiny_mc"]["samples"] == 4
    printed = capsys.readouterr().out
    assert "ppl" in printed and "tiny_mc" in printed
    assert main(["eval", str(tiny_models["llama"]), "--ppl", str(tmp_path / "nope.txt")]) == 2
