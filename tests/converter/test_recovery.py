"""Training-free linear recovery, selection of the removed set, and the sweep/budget, on tiny random models."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from shortened.converter.criteria import score_blocks
from shortened.converter.forward import capture_block_inputs
from shortened.converter.recovery import _mlp_parts, applied, cache_hiddens, fit_maps, fold, runs_of, variant_ppl
from shortened.converter.selection import choose_and_recover, resolve, spans
from shortened.converter.steps import prune
from shortened.converter.sweep import pick_k, sweep
from shortened.data import CalibSpec, load_calibration
from shortened.errors import UsageError
from shortened.model.blocks import remove_blocks
from shortened.model.families import blocks_of
from shortened.model.loading import load_model

RECOVERABLE = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2"]


def _batch(m, calib_file, n=6, seq=32, seed=1):
    return load_calibration(CalibSpec(str(calib_file), num_samples=n, seq_len=seq, seed=seed), m.tokenizer)


def _lstsq_map(model, batch, p, target):
    """The reference: T = lstsq(M, H - Y) on every token, from a plain forward pass of `model`."""
    hs, calls = capture_block_inputs(model, batch.input_ids, batch.attention_mask)
    M, Y = _mlp_parts(model, p, hs[p], calls[p])
    d = M.shape[-1]
    return torch.linalg.lstsq(M.reshape(-1, d).double(), (hs[target] - Y).reshape(-1, d).double()).solution


def test_runs_of():
    assert runs_of([7, 3, 4, 9, 10, 11]) == [[3, 4], [7], [9, 10, 11]]
    assert spans([4, 5, 6, 8, 9], 2) == [[4, 5], [5, 6], [8, 9]]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fitted_map_equals_lstsq(family, tiny_models, calib_file):
    m = load_model(str(tiny_models[family]))
    batch = _batch(m, calib_file)
    cache = cache_hiddens(m.model, batch, micro_batch=4)  # two micro-batches: the float64 sums must add up
    maps = fit_maps(m.model, cache, [2, 3], ridge=0)
    torch.testing.assert_close(maps[1], _lstsq_map(m.model, batch, 1, 4), rtol=1e-6, atol=1e-8)

    # two runs, sequential: the second fit sees the model with the first run removed and its map folded in
    maps = fit_maps(m.model, cache, [1, 4], ridge=0, order="sequential")
    torch.testing.assert_close(maps[0], _lstsq_map(m.model, batch, 0, 2), rtol=1e-6, atol=1e-8)
    work = copy.deepcopy(m.model)
    fold(work, {0: maps[0]})
    remove_blocks(work, [1])  # block 3 is now block 2, block 4 is block 3
    hs, _ = capture_block_inputs(m.model, batch.input_ids, batch.attention_mask)
    hs_w, calls_w = capture_block_inputs(work, batch.input_ids, batch.attention_mask)
    M, Y = _mlp_parts(work, 2, hs_w[2], calls_w[2])
    d = M.shape[-1]
    want = torch.linalg.lstsq(M.reshape(-1, d).double(), (hs[5] - Y).reshape(-1, d).double()).solution
    torch.testing.assert_close(maps[3], want, rtol=1e-4, atol=5e-5)  # float32 inputs: hook vs folded weight
    independent = fit_maps(m.model, cache, [1, 4], ridge=0, order="independent")
    torch.testing.assert_close(independent[3], _lstsq_map(m.model, batch, 3, 5), rtol=1e-6, atol=1e-8)
    assert (independent[3] - maps[3]).abs().max() > 1e-2  # the orders do differ


@pytest.mark.parametrize("family", RECOVERABLE)
def test_folding_equals_applying_the_map(family, tiny_models, calib_file):
    m = load_model(str(tiny_models[family]))
    batch = _batch(m, calib_file, n=4)
    maps = fit_maps(m.model, cache_hiddens(m.model, batch), [2, 3])
    ids, mask = batch.input_ids, batch.attention_mask
    with applied(m.model, maps):
        want = capture_block_inputs(m.model, ids, mask)[0]
    work = copy.deepcopy(m.model)
    fold(work, maps)
    got = capture_block_inputs(work, ids, mask)[0]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[2], capture_block_inputs(m.model, ids, mask)[0][2])  # the map does act
    assert sum(p.numel() for p in work.parameters()) == sum(p.numel() for p in m.model.parameters())


@pytest.mark.parametrize("family", RECOVERABLE)
def test_recovered_checkpoint_reloads_and_generates(family, tiny_models, calib_file, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_models[family]
    out = tmp_path / "pruned"
    calib = CalibSpec(str(calib_file), num_samples=4, seq_len=32)
    res = prune(str(src), out, blocks=[2, 3], protect=[0], calib=calib, recover="linear", recover_samples=16,
                recover_order="sequential", recover_always=True, progress=False)  # fmt: skip
    rec = json.loads((out / "pruning.json").read_text())
    assert res["removed"] == [2, 3] and rec["selection"]["chosen_blocks"] == [2, 3]
    assert rec["recovery"]["calibration"]["num_samples"] == 16 and rec["recovery"]["calibration"]["seed"] == 1

    pruned = AutoModelForCausalLM.from_pretrained(out)  # no code of ours
    # the reference: the original with blocks 2, 3 skipped and the map of the same fit applied explicitly
    m = load_model(str(src))
    maps = fit_maps(m.model, cache_hiddens(m.model, load_calibration(CalibSpec(str(calib_file), 16, 32, 1),
                                                                     m.tokenizer)), [2, 3])  # fmt: skip
    work = copy.deepcopy(m.model)
    remove_blocks(work, [2, 3])
    prompt = torch.tensor([[5, 17, 99, 42, 7, 63, 11, 200]])
    with applied(work, maps):
        want = work(prompt).logits
    assert rec["recovery"]["method"] == "linear"
    torch.testing.assert_close(pruned(prompt).logits, want, rtol=1e-4, atol=1e-4)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = pruned.generate(prompt, use_cache=True, **kw)
    assert torch.equal(with_cache, pruned.generate(prompt, use_cache=False, **kw))
    assert with_cache.shape[1] == prompt.shape[1] + 6


def test_refusals(tiny_models, calib_file, tmp_path):
    calib = CalibSpec(str(calib_file), num_samples=2, seq_len=16)
    with pytest.raises(UsageError, match="post_feedforward_layernorm"):
        prune(str(tiny_models["gemma2"]), tmp_path / "g", blocks=[2], protect=[0], calib=calib, recover="linear",
              progress=False)  # fmt: skip
    with pytest.raises(UsageError, match="block 0 is removed"):
        prune(str(tiny_models["llama"]), tmp_path / "l", blocks=[0, 1], no_protect=True, calib=calib,
              recover="linear", progress=False)  # fmt: skip
    assert not (tmp_path / "g").exists() and not (tmp_path / "l").exists()
    m = load_model(str(tiny_models["gemma2"]))
    assert resolve("auto", "auto", m.model.config, True) == ("auto", "none")  # auto: no recovery where refused
    assert resolve("auto", "auto", m.model.config, False) == ("topk", "none")


def test_iterative_reuse_equals_rescoring(tiny_models, calib_file):
    m = load_model(str(tiny_models["qwen2"]))
    batch = _batch(m, calib_file, n=3, seq=24)
    kw = dict(no_protect=True, iterative=True, num_remove=3, micro_batch=2, progress=False)
    fast = score_blocks(m.model, "ppl", batch, reuse=True, **kw)
    slow = score_blocks(m.model, "ppl", batch, reuse=False, **kw)
    assert fast.removal_order == slow.removal_order
    for a, b in zip(fast.steps, slow.steps):
        assert a["scores"].keys() == b["scores"].keys()
        for i in a["scores"]:
            assert a["scores"][i] == pytest.approx(b["scores"][i], rel=1e-5)


def _with_identity_blocks(path, identity):
    """The tiny model with `identity` blocks made exact identities (attention and MLP outputs zeroed)."""
    m = load_model(str(path))
    with torch.no_grad():
        for i in identity:
            b = blocks_of(m.model)[i]
            b.self_attn.o_proj.weight.zero_()
            b.mlp.down_proj.weight.zero_()
    return m


def _naive_ppl(model, batch, removed, maps=None):
    """The slow reference: a pruned copy (maps folded) and a plain forward pass."""
    work = copy.deepcopy(model)
    fold(work, maps or {})
    remove_blocks(work, removed)
    with torch.no_grad():
        logits = work(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch.input_ids[:, 1:].flatten())
    return float(torch.exp(nll))


def test_span_search_picks_the_known_best_set(calib_file, tmp_path, make_tiny):
    m = _with_identity_blocks(make_tiny("llama", tmp_path / "l8", layers=8), [4, 5])
    batch = _batch(m, calib_file, n=3)
    base = variant_ppl(m.model, cache_hiddens(m.model, batch), [])
    sel = choose_and_recover(m.model, 2, list(range(1, 8)), "span", "none", batch, progress=False)
    assert [c.name for c in sel.candidates] == [f"span {s}-{s + 1}" for s in range(1, 7)]
    naive = {c.name: _naive_ppl(m.model, batch, c.blocks) for c in sel.candidates}
    for c in sel.candidates:
        assert c.calib_ppl_no_recovery == pytest.approx(naive[c.name], rel=1e-5)
    assert sel.chosen == min(naive, key=naive.get)
    assert naive["span 4-5"] == pytest.approx(base, rel=1e-6)  # removing identities costs nothing

    fit = _batch(m, calib_file, 8, 32, 2)
    sel = choose_and_recover(m.model, 2, list(range(1, 8)), "span", "linear", batch, fit, ridge=0, progress=False)
    for c in sel.candidates:  # after recovery: the cached scoring equals the folded, pruned model's perplexity
        assert c.calib_ppl == pytest.approx(_naive_ppl(m.model, batch, c.blocks, c.recovery.maps), rel=1e-4)
    assert sel.best.score == min(c.score for c in sel.candidates)
    eye = torch.eye(64, dtype=torch.float64)  # span 4-5: the map before identities is the identity
    torch.testing.assert_close(sel.candidates[3].recovery.maps[3], eye, atol=1e-5, rtol=0)


def test_budget_picks_largest_k_within_ratio(calib_file, tmp_path, make_tiny):
    rows = [{"k": 1, "heldout_ppl": 11.0}, {"k": 2, "heldout_ppl": 14.0, "recovered": True,
            "heldout_ppl_recovered": 12.0}, {"k": 3, "heldout_ppl": 13.0}, {"k": 4, "heldout_ppl": 30.0}]  # fmt: skip
    assert pick_k(rows, 10.0, 1.25) == 2  # k=3's 13.0 is over 12.5; the recovered 12.0 counts for k=2
    assert pick_k(rows, 10.0, 1.35) == 3
    assert pick_k(rows, 10.0, 1.05) == 0

    src = make_tiny("llama", tmp_path / "l8", layers=8)
    text = tmp_path / "heldout.txt"
    text.write_text(calib_file.read_text()[-6000:])
    calib = CalibSpec(str(calib_file), num_samples=4, seq_len=32)
    kw = dict(eval_seq_len=32, eval_max_windows=6, max_ppl_ratio=1.1, out=tmp_path / "sw", progress=False)
    res = sweep(str(src), str(text), calib, k_max=3, recover="linear", recover_samples=8, protect=[0], **kw)
    assert [r["k"] for r in res["rows"]] == [1, 2, 3]
    within = [r["k"] for r in res["rows"] if r["heldout_ratio"] <= 1.1]
    assert res["picked_k"] == max(within, default=0)
    assert (tmp_path / "sw" / "sweep.md").is_file() and (tmp_path / "sw" / "sweep.png").is_file()
    # the sweep's held-out perplexity is quality.perplexity of the saved model
    from shortened.validators.quality import perplexity

    row = res["rows"][1]
    prune(str(src), tmp_path / "p", blocks=row["blocks"], protect=[0], progress=False, recover="none")
    p = load_model(str(tmp_path / "p"))
    got = perplexity(p.model, p.tokenizer, str(text), 32, max_windows=6, progress=False).ppl
    assert got == pytest.approx(row["heldout_ppl"], rel=1e-4)


def test_ridge_shrinks_the_map_toward_the_identity():
    from shortened.converter.recovery import solve

    g = torch.Generator().manual_seed(0)
    M = torch.randn(200, 6, generator=g, dtype=torch.float64)
    D = M @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    A, B = M.T @ M, M.T @ D
    exact = torch.linalg.lstsq(M, D).solution
    assert torch.allclose(solve(A, B, 0), exact, atol=1e-9)
    assert torch.allclose(solve(A, B, 1e6), torch.eye(6, dtype=torch.float64), atol=1e-4)  # no change to the block
    mid = solve(A, B, 1.0)  # in between: closer to I than the exact fit is
    assert (mid - torch.eye(6, dtype=torch.float64)).norm() < (exact - torch.eye(6, dtype=torch.float64)).norm()
