"""The pruning core on tiny random models of every family: criteria against slow references, pruning, errors."""

from __future__ import annotations

import json

import pytest
import torch

from shortened.converter.criteria import (
    bi_scores,
    magnitude_scores,
    ppl_scores,
    ppl_scores_naive,
    protected_blocks,
    score_blocks,
    taylor_scores,
)
from shortened.converter.steps import prune
from shortened.data import CalibSpec, load_calibration
from shortened.io import fingerprint_path
from shortened.model.families import blocks_of
from shortened.model.loading import load_model


def _load(path):
    return load_model(str(path))


def _batch(loaded, calib_file, n=4, seq=32):
    return load_calibration(CalibSpec(str(calib_file), num_samples=n, seq_len=seq, seed=1), loaded.tokenizer)


class SkipBlocks:
    """The reference for a pruned model: the original model with the removed blocks turned into identities."""

    def __init__(self, model, skip):
        self.handles = [blocks_of(model)[i].register_forward_hook(self._identity, with_kwargs=True) for i in skip]

    @staticmethod
    def _identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def test_pruned_checkpoint_generates_like_skipping_blocks(family, tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_models[family]
    before = fingerprint_path(src)["sha256"]
    out = tmp_path / "pruned"
    res = prune(str(src), out, blocks=[1, 3], protect=[0, -1], progress=False)
    assert res["removed"] == [1, 3] and res["kept"] == 4
    assert fingerprint_path(src)["sha256"] == before  # the input model is never modified

    pruned = AutoModelForCausalLM.from_pretrained(out)  # no code of ours
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("num_hidden_layers", cfg.get("n_layer")) == 4
    if "layer_types" in cfg:
        full = json.loads((src / "config.json").read_text())["layer_types"]
        assert cfg["layer_types"] == [t for i, t in enumerate(full) if i not in (1, 3)]
    record = json.loads((out / "pruning.json").read_text())
    assert record["removed_blocks"] == [1, 3] and record["kept_blocks"] == [0, 2, 4, 5]

    original = AutoModelForCausalLM.from_pretrained(src)
    prompt = torch.tensor([[5, 17, 99, 42, 7, 63, 11, 200]])
    kw = dict(max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    got = pruned.generate(prompt, **kw)
    with SkipBlocks(original, [1, 3]):
        want = original.generate(prompt, **kw)
        want_logits = original(prompt).logits
    assert torch.equal(got, want)
    torch.testing.assert_close(pruned(prompt).logits, want_logits, rtol=1e-4, atol=1e-4)


def test_ppl_fast_equals_naive_leave_one_out(family, tiny_models, calib_file):
    m = _load(tiny_models[family])
    batch = _batch(m, calib_file)
    cands = list(range(6))
    fast, base = ppl_scores(m.model, batch, cands, micro_batch=3, progress=False)
    naive = ppl_scores_naive(m.model, batch, cands, micro_batch=4, progress=False)
    for i in cands:
        assert fast[i] == pytest.approx(naive[i], rel=1e-5)
    with torch.no_grad():
        logits = m.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch.input_ids[:, 1:].reshape(-1)
    )
    assert base == pytest.approx(float(torch.exp(nll)), rel=1e-5)
    assert len(set(round(v, 6) for v in fast.values())) > 1  # the blocks do differ


def test_taylor_equals_autograd_on_whole_loss(tiny_models, calib_file):
    m = _load(tiny_models["llama"])
    batch = _batch(m, calib_file, n=5)
    got = taylor_scores(m.model, batch, micro_batch=2, progress=False)  # 3 micro-batches of unequal size

    model = m.model
    model.zero_grad()
    logits = model(input_ids=batch.input_ids).logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch.input_ids[:, 1:].reshape(-1)
    )
    loss.backward()
    want = [sum(float((p * p.grad).abs().sum().detach()) for p in b.parameters()) for b in blocks_of(model)]
    model.zero_grad()
    assert got == pytest.approx(want, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())  # taylor cleans up after itself


def test_magnitude_and_bi_against_direct_computation(tiny_models, calib_file):
    m = _load(tiny_models["qwen2"])
    blocks = blocks_of(m.model)
    want = [sum(float(p.detach().abs().sum()) for p in b.parameters()) for b in blocks]
    assert magnitude_scores(m.model) == pytest.approx(want, rel=1e-6)

    batch = _batch(m, calib_file)
    ins, outs = {}, {}

    def record(i):
        def hook(module, args, kwargs, output):
            ins[i], outs[i] = args[0], output

        return hook

    hooks = [b.register_forward_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    with torch.no_grad():
        m.model(input_ids=batch.input_ids)
    for h in hooks:
        h.remove()
    want_bi = [
        1 - float(torch.nn.functional.cosine_similarity(ins[i], outs[i], dim=-1).mean()) for i in range(len(blocks))
    ]
    assert bi_scores(m.model, batch, micro_batch=3, progress=False) == pytest.approx(want_bi, rel=1e-5, abs=1e-7)


def test_padded_calibration_records_match_unpadded(tiny_models, tmp_path):
    """JSONL records of different lengths are right-padded; padding must not change any score."""
    m = _load(tiny_models["mistral"])
    texts = ["a short record about pruning", "a much longer record, about depth pruning of language models and more"]
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    batch = load_calibration(CalibSpec(str(f), num_samples=2, seq_len=64), m.tokenizer)
    assert batch.attention_mask[0].sum() < batch.attention_mask[1].sum()
    together, _ = ppl_scores(m.model, batch, [1, 2], micro_batch=2, progress=False)
    # each record alone (no padding), combined by token counts
    tot = {1: 0.0, 2: 0.0}
    n = 0
    for r in range(2):
        k = int(batch.attention_mask[r].sum())
        one = type(batch)(batch.input_ids[r : r + 1, :k], batch.attention_mask[r : r + 1, :k], {})
        s, _ = ppl_scores(m.model, one, [1, 2], progress=False)
        for i in tot:
            tot[i] += torch.log(torch.tensor(s[i], dtype=torch.float64)).item() * (k - 1)
        n += k - 1
    for i in tot:
        assert together[i] == pytest.approx(float(torch.exp(torch.tensor(tot[i] / n))), rel=1e-5)


def test_protection_defaults_and_options():
    assert protected_blocks(30) == {0, 1, 2, 3, 28, 29}
    assert protected_blocks(30, [0, -1]) == {0, 29}
    assert protected_blocks(30, no_protect=True) == set()


def test_scores_respect_protection_and_order(tiny_models, calib_file):
    m = _load(tiny_models["llama"])
    batch = _batch(m, calib_file)
    res = score_blocks(m.model, "ppl", batch, protect=[0, 5], progress=False)
    assert res.candidates == [1, 2, 3, 4]
    assert res.scores[0] is None and res.scores[5] is None  # protected blocks are not scored by ppl
    assert res.removal_order == sorted(res.candidates, key=lambda i: res.scores[i])
    mag = score_blocks(m.model, "magnitude", protect=[0, 5], progress=False)
    assert all(s is not None for s in mag.scores) and 0 not in mag.removal_order and 5 not in mag.removal_order


def test_iterative_rescores_after_each_removal(tiny_models, calib_file):
    m = _load(tiny_models["llama"])
    batch = _batch(m, calib_file)
    res = score_blocks(m.model, "ppl", batch, protect=[0], iterative=True, num_remove=2, progress=False)
    assert len(blocks_of(m.model)) == 6  # the caller's model is untouched
    one_shot = score_blocks(m.model, "ppl", batch, protect=[0], progress=False)
    first = one_shot.removal_order[0]
    assert res.removal_order[0] == first
    # second pick: naive leave-one-out on the model with `first` already removed
    best, best_ppl = None, float("inf")
    for j in range(1, 6):
        if j == first:
            continue
        with SkipBlocks(m.model, [first, j]):
            p = ppl_scores_naive(m.model, batch, [], progress=False)  # no candidates: just a hook context
            with torch.no_grad():
                logits = m.model(input_ids=batch.input_ids).logits
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch.input_ids[:, 1:].reshape(-1)
            )
        assert p == {}
        if float(nll) < best_ppl:
            best, best_ppl = j, float(nll)
    assert res.removal_order[1] == best
    assert res.steps[1]["scores"][best] == pytest.approx(float(torch.exp(torch.tensor(best_ppl))), rel=1e-4)


def test_iterative_needs_data_driven_criterion(tiny_models):
    from shortened.errors import UsageError

    m = _load(tiny_models["llama"])
    with pytest.raises(UsageError, match="data-driven"):
        score_blocks(m.model, "magnitude", iterative=True, num_remove=1, no_protect=True, progress=False)


def test_calibration_windows_are_seeded(tiny_models, calib_file):
    tok = _load(tiny_models["llama"]).tokenizer
    a = load_calibration(CalibSpec(str(calib_file), 10, 128, seed=3), tok)
    b = load_calibration(CalibSpec(str(calib_file), 10, 128, seed=3), tok)
    c = load_calibration(CalibSpec(str(calib_file), 10, 128, seed=4), tok)
    assert a.input_ids.shape == (10, 128) and a.num_tokens == 1280
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    bos = load_calibration(CalibSpec(str(calib_file), 2, 16, add_bos=True), tok)
    assert (bos.input_ids[:, 0] == tok.bos_token_id).all() and bos.input_ids.shape == (2, 16)
    assert a.description["sha256"] and a.description["num_samples"] == 10
