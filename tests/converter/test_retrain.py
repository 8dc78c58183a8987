"""Retraining: LoRA / full / distill on tiny random models (loss goes down on a fixed batch), LoRA merged into
a plain checkpoint, zero KL against itself, prompt masking, resuming; and a short real run on SmolLM2."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors import safe_open

from shortened.cli import main
from shortened.converter.retrain import RetrainConfig, checkpoints_dir, distill_loss, retrain
from shortened.converter.retrain_data import IGNORE, Collator, alpaca_example, build_examples
from shortened.errors import UsageError

FAST = dict(seq_len=32, batch_size=4, eval_steps=2, logging_steps=1, max_val_examples=4, progress=False)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, corpus):
    p = tmp_path_factory.mktemp("retrain") / "train.txt"
    body = corpus.read_text()[:4000] if corpus.is_file() else "the quick brown fox jumps over the lazy dog. " * 90
    p.write_text(body)
    return p


def _load(path):
    from shortened.model.loading import load_model

    return load_model(str(path))


def _fixed_batch(path, text_file, n=8):
    tok = _load(path).tokenizer
    ex, _ = build_examples(str(text_file), tok, seq_len=32)
    return Collator(tok.pad_token_id)(ex[:n])


@torch.no_grad()
def _ce(model_dir, batch) -> float:
    return float(_load(model_dir).model(**batch).loss)


def _keys(model_dir) -> set[str]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_lora_merged_into_plain_checkpoint(tiny_models, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    src, out = tiny_models["llama"], tmp_path / "lora"
    batch = _fixed_batch(src, text_file)
    rec = retrain(str(src), out, method="lora", data=str(text_file), max_steps=4, lr=1e-2, **FAST)
    assert _ce(out, batch) < _ce(src, batch)
    # merged: the same tensors as the original (no lora_A / lora_B / base_layer keys), loaded by plain transformers
    assert _keys(out) == _keys(src)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert not hasattr(model, "peft_config")
    orig = AutoModelForCausalLM.from_pretrained(src)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, orig.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(model.model.embed_tokens.weight, orig.model.embed_tokens.weight)  # not a LoRA target
    assert rec["method"] == "lora" and rec["hyperparameters"]["lora_rank"] == 8
    assert rec["trainable_parameters"] < rec["total_parameters"] / 5
    assert not checkpoints_dir(out).exists()  # removed after a successful run


def test_full_loss_goes_down_and_record(tiny_models, text_file, tmp_path):
    src, out = tiny_models["qwen2"], tmp_path / "full"
    batch = _fixed_batch(src, text_file)
    rec = retrain(str(src), out, method="full", data=str(text_file), max_steps=4, lr=3e-3, **FAST)
    assert _ce(out, batch) < _ce(src, batch)
    saved = json.loads((out / "retraining.json").read_text())
    assert saved["method"] == "full" and saved["steps"] == 4
    assert [v["step"] for v in saved["losses"]["val"]] == [2, 4]  # every eval_steps and the last step
    assert [t["step"] for t in saved["losses"]["train"]] == [1, 2, 3, 4]
    assert saved["best_val_loss"] == min(v["loss"] for v in saved["losses"]["val"]) < saved["losses"]["initial_val"]
    assert saved["best_step"] in (2, 4) and saved["seconds"] > 0
    assert saved["data"]["format"] == "text" and saved["data"]["val_examples"] == 4
    assert saved["hyperparameters"]["weight_decay"] == 0.1 and rec == saved


def test_max_minutes_stops_and_saves_the_last_step(tiny_models, text_file, tmp_path):
    src, out = tiny_models["llama"], tmp_path / "budget"
    opts = {**FAST, "eval_steps": 100}
    rec = retrain(str(src), out, method="full", data=str(text_file), max_steps=50, max_minutes=1e-9, **opts)
    assert rec["steps"] == 1  # the budget, not max_steps, ended the run
    assert [v["step"] for v in rec["losses"]["val"]] == [1]  # the step it stopped at was validated
    assert _load(out).model.config.num_hidden_layers > 0


def test_distill_teacher_equal_student_gives_zero_kl(tiny_models, text_file, tmp_path):
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[1, 2, 3, 4, 5], [IGNORE, IGNORE, 3, 4, IGNORE]])
    loss, kl, ce = distill_loss(logits, logits.clone(), labels, temperature=2.0)
    assert float(kl) == pytest.approx(0.0, abs=1e-6) and float(loss) == pytest.approx(0.0, abs=1e-6)
    loss2, kl2, _ = distill_loss(logits, torch.randn(2, 5, 11), labels)
    assert float(kl2) > 0.01
    # through the Trainer: the validation loss before training and the first step's KL are zero
    src = tiny_models["llama"]
    rec = retrain(str(src), tmp_path / "d", method="distill", teacher=str(src), data=str(text_file), max_steps=1,
                  **FAST)  # fmt: skip
    assert rec["losses"]["initial_val"] == pytest.approx(0.0, abs=1e-5)
    assert rec["losses"]["train"][0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert rec["teacher"] == str(src)


def test_distill_lora_on_pruned_student(tiny_models, text_file, tmp_path):
    from shortened.converter.steps import prune

    teacher = tiny_models["llama"]
    student = tmp_path / "pruned"
    prune(str(teacher), student, blocks=[2, 3], no_protect=True, progress=False)
    batch = _fixed_batch(teacher, text_file)

    @torch.no_grad()
    def kd(model_dir):
        s = _load(model_dir).model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = _load(teacher).model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return float(distill_loss(s, t, batch["labels"])[1])

    out = tmp_path / "distilled"
    # no teacher given: it is the source_model recorded in the pruned model's pruning.json
    rec = retrain(str(student), out, method="distill", distill_weights="lora", data=str(text_file),
                  max_steps=4, lr=1e-2, **FAST)  # fmt: skip
    assert rec["teacher"] == str(teacher) and rec["weights"] == "lora"
    assert kd(out) < kd(student)
    assert _keys(out) == _keys(student)
    assert json.loads((out / "pruning.json").read_text())["removed_blocks"] == [2, 3]
    assert all("kl" in t and "ce" in t for t in rec["losses"]["train"])


def test_prompt_masking(tiny_models, tmp_path):
    tok = _load(tiny_models["llama"]).tokenizer
    rec = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    ex = alpaca_example(rec, tok, seq_len=512)
    prompt_len = len(ex["input_ids"]) - 2  # response "5" + EOS
    assert ex["labels"][:prompt_len] == [IGNORE] * prompt_len
    assert ex["labels"][prompt_len:] == ex["input_ids"][prompt_len:] == [ord("5"), tok.eos_token_id]
    assert tok.decode(ex["input_ids"][:prompt_len]).endswith("### Input:\n2 and 3\n\n### Response:\n")
    kept = alpaca_example(rec, tok, seq_len=512, train_on_prompt=True)
    assert kept["labels"] == kept["input_ids"]
    # from a JSONL file (format detected), padded by the collator; the model's loss covers only the response
    data = tmp_path / "alpaca.jsonl"
    recs = [rec, {"instruction": "Say hi.", "input": "", "output": "hi there"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    exs, desc = build_examples(str(data), tok, seq_len=512)
    assert desc["format"] == "alpaca" and "### Input" not in tok.decode(exs[1]["input_ids"])
    batch = Collator(tok.pad_token_id)(exs)
    short = int(len(exs[1]["input_ids"]) < len(exs[0]["input_ids"]))
    assert batch["labels"][short, -1] == IGNORE and batch["attention_mask"][short, -1] == 0  # padding is ignored
    model = _load(tiny_models["llama"]).model
    with torch.no_grad():
        loss = float(model(**batch).loss)
        logp = torch.log_softmax(model(**batch).logits.double(), -1)
    nll, n = 0.0, 0
    for b, e in enumerate(exs):
        for i in range(1, len(e["input_ids"])):
            if e["labels"][i] != IGNORE:
                nll -= float(logp[b, i - 1, e["labels"][i]])
                n += 1
    assert n == 2 + len("hi there") + 1 and loss == pytest.approx(nll / n, rel=1e-5)


def test_resume_continues_from_saved_step(tiny_models, text_file, tmp_path):
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise KeyboardInterrupt

    src, out = tiny_models["llama"], tmp_path / "resumed"
    opts = dict(method="full", data=str(text_file), max_steps=4, lr=3e-3, **FAST)
    with pytest.raises(KeyboardInterrupt):
        retrain(str(src), out, callbacks=[Interrupt()], **opts)
    assert not out.exists() and (checkpoints_dir(out) / "checkpoint-2").is_dir()
    with pytest.raises(UsageError, match="--resume"):
        retrain(str(src), out, **opts)
    with pytest.raises(UsageError, match="different options.*lr"):
        retrain(str(src), out, resume=True, **{**opts, "lr": 1e-3})
    rec = retrain(str(src), out, resume=True, **opts)
    assert rec["resumed_from_step"] == 2 and rec["steps"] == 4
    assert [t["step"] for t in rec["losses"]["train"]] == [1, 2, 3, 4]  # steps 1-2 from the checkpoint's log
    # the resumed run ends where an uninterrupted one does (data order, optimizer and scheduler restored)
    ref = tmp_path / "straight"
    retrain(str(src), ref, **opts)
    a, b = _load(out).model.state_dict(), _load(ref).model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_bad_inputs(tiny_models, text_file, tmp_path):
    src = str(tiny_models["llama"])
    with pytest.raises(UsageError, match="unknown method"):
        retrain(src, tmp_path / "a", method="qlora", data=str(text_file))
    with pytest.raises(UsageError, match="needs data"):
        retrain(src, tmp_path / "a")
    with pytest.raises(UsageError, match="not found"):
        retrain(src, tmp_path / "a", data=str(tmp_path / "missing.txt"), **FAST)
    with pytest.raises(UsageError, match="--teacher"):
        retrain(src, tmp_path / "a", method="distill", data=str(text_file), **FAST)
    (tmp_path / "exists").mkdir()
    with pytest.raises(UsageError, match="already exists"):
        retrain(src, tmp_path / "exists", data=str(text_file), **FAST)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(UsageError, match="data format"):
        retrain(src, tmp_path / "a", data=str(bad), **FAST)
    assert RetrainConfig().lora_rank == 8 and RetrainConfig().lora_alpha == 16 and RetrainConfig().lora_dropout == 0.05


def test_retrain_cli(tiny_models, text_file, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["retrain", str(tiny_models["llama"]), "--out", str(out), "--data", str(text_file), "--method", "lora"]
    rc = main([*argv, "--max-steps", "2", "--seq-len", "32", "--eval-steps", "2", "--lora-rank", "4", "--no-progress",
               "--trainer-arg", "max_grad_norm=0.5"])  # fmt: skip
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["steps"] == 2 and printed["method"] == "lora"
    saved = json.loads((out / "retraining.json").read_text())
    assert saved["hyperparameters"]["lora_rank"] == 4 and saved["config"]["extra_args"] == {"max_grad_norm": 0.5}
    assert main([*argv, "--max-steps", "2"]) == 2  # the output exists: exit 2, nothing replaced
    other = ["retrain", str(tiny_models["llama"]), "--out", str(tmp_path / "o2"), "--data", str(text_file)]
    assert main([*other, "--seq-len", "32", "--trainer-arg", "no_such_field=1"]) == 2
    assert main([*other, "--trainer-arg", "novalue"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["retrain", str(tiny_models["llama"]), "--out", str(out), "--method", "qlora"])
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_smollm2_pruned_retrained_lowers_perplexity(smollm2, tmp_path, shared_data):
    from shortened.converter.steps import prune
    from shortened.validators.quality import perplexity

    valid, test = shared_data / "wikitext2" / "valid.tokens.txt", shared_data / "wikitext2" / "test.raw.txt"
    if not (valid.is_file() and test.is_file()):
        pytest.skip("../shared/data/wikitext2 is not here")
    pruned, out = tmp_path / "pruned", tmp_path / "retrained"
    prune(str(smollm2), pruned, blocks=[12, 13, 14, 15, 17, 26], progress=False)

    def ppl(path):
        loaded = _load(path)
        return perplexity(loaded.model, loaded.tokenizer, str(test), 128, max_windows=WINDOWS, progress=False).ppl

    t0 = time.time()
    rec = retrain(str(pruned), out, method="full", data=str(valid), seq_len=128, batch_size=BATCH, max_steps=STEPS,
                  lr=1e-4, eval_steps=STEPS, logging_steps=5, max_val_examples=4, progress=False)  # fmt: skip
    took = time.time() - t0
    res = {"original": ppl(smollm2), "pruned": ppl(pruned), "retrained": ppl(out)}
    print(f"\nWikiText-2 test PPL ({WINDOWS} windows of 128 tokens): "
          + ", ".join(f"{k} {v:.2f}" for k, v in res.items())
          + f"; full retraining {STEPS} steps x {BATCH} x 128 tokens in {took:.0f} s")  # fmt: skip
    assert res["retrained"] < res["pruned"]
    assert rec["best_val_loss"] < rec["losses"]["initial_val"]


WINDOWS = 16  # of the 2,300 in the test split: enough to see the change, cheap on 2 cores
STEPS = 10
BATCH = 2
