"""Parity validator: runners, metrics, cases, tolerances, CLI exit codes, and real exports that pass or fail."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from shortened.errors import UsageError
from shortened.runtime.base import Generation
from shortened.validators.parity import (
    DEFAULT_TOLERANCES,
    Tolerances,
    compare,
    make_cases,
    read_prompt_ids,
    tolerances_for,
    validate_parity,
)

# ---------------------------------------------------------------------------------------------
# The comparator on hand-made outputs


def _gen(prefill, steps, tokens):
    return Generation(tokens=np.asarray(tokens), prefill_logits=prefill, step_logits=list(steps))


def test_compare_ignores_padding_and_decode_steps_after_divergence():
    rng = np.random.default_rng(0)
    b, s, v, n = 2, 4, 10, 3
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]])
    pre = rng.normal(size=(b, s, v)).astype(np.float32)
    steps = [pre[:, -1]] + [rng.normal(size=(b, v)).astype(np.float32) for _ in range(n - 1)]
    other_pre = pre.copy()
    other_pre[1, :2] += 1000.0  # garbage at padded positions must not count
    other_steps = [s_.copy() for s_ in steps]
    other_steps[2][1] += 50.0  # row 1 step 2 comes after row 1's tokens differ at position 1: not compared
    ref = _gen(pre, steps, [[1, 2, 3], [4, 5, 6]])
    got = _gen(other_pre, other_steps, [[1, 2, 3], [4, 9, 6]])
    m = compare(ref, got, mask, n)
    assert m["max_abs"] == 0.0 and m["kl"] == 0.0 and m["top1"] == 1.0
    assert m["first_diff"] == [None, 1]
    assert m["gen_match"] == pytest.approx((3 + 1) / 6)
    # 6 real prompt positions + row 0 steps 1,2 + row 1 step 1
    assert m["positions"] == 6 + 2 + 1
    other_steps[1][0, 3] += 0.5  # a compared decode step of row 0
    m = compare(ref, _gen(other_pre, other_steps, got.tokens), mask, n)
    assert m["max_abs"] == pytest.approx(0.5) and m["decode_max_abs"] == pytest.approx(0.5)
    assert m["prefill_max_abs"] == 0.0 and m["kl"] > 0


def test_compare_metrics_against_direct_formulas():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(1, 3, 7)).astype(np.float32)
    b = a + rng.normal(scale=0.1, size=a.shape).astype(np.float32)
    mask = np.ones((1, 3), np.int64)
    m = compare(_gen(a, [a[:, -1]], [[0]]), _gen(b, [b[:, -1]], [[0]]), mask, 1)
    x, y = a[0].astype(np.float64), b[0].astype(np.float64)
    p, q = np.exp(x) / np.exp(x).sum(-1, keepdims=True), np.exp(y) / np.exp(y).sum(-1, keepdims=True)
    kl = (p * np.log(p / q)).sum(-1)
    cos = (x * y).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)
    assert m["max_abs"] == pytest.approx(np.abs(x - y).max())
    assert m["mean_abs"] == pytest.approx(np.abs(x - y).mean())
    assert m["max_rel"] == pytest.approx((np.abs(x - y) / np.abs(x)).max())
    assert m["kl"] == pytest.approx(kl.max()) and m["mean_kl"] == pytest.approx(kl.mean())
    assert m["cosine"] == pytest.approx(cos.min())
    assert m["top1"] == pytest.approx((x.argmax(-1) == y.argmax(-1)).mean())
    assert m["top1_gap"] == pytest.approx(max(x[i].max() - x[i, y[i].argmax()] for i in range(3)))


def test_tolerances_fail_on_nan_and_accept_overrides():
    tol = tolerances_for("fp32")
    good = dict(max_abs=1e-6, mean_abs=1e-7, max_rel=1e-3, cosine=1.0, top1=1.0, kl=1e-9, top1_gap=0.0, gen_match=1.0)
    assert tol.check(good) == []
    assert [f.split()[0] for f in tol.check({**good, "max_abs": float("nan"), "cosine": float("nan")})] == [
        "max_abs",
        "cosine",
    ]
    assert tol.check({**good, "top1_gap": 0.5}) == ["top1_gap 0.5 > 0.004"]
    assert tol.check({**good, "top1": 0.5, "gen_match": 0.5}) == []  # raw agreement: reported, gated on request
    strict = tolerances_for("fp32", {"min_gen_match": 1, "min_top1": 1})
    assert strict.check({**good, "top1": 0.5, "gen_match": 0.5}) == ["top1 0.5 < 1", "gen_match 0.5 < 1"]
    loose = tolerances_for("fp32", {"max_abs": 1.0, "min_gen_match": None})
    assert loose.max_abs == 1.0 and loose.min_gen_match is None and loose.max_kl == DEFAULT_TOLERANCES["fp32"].max_kl
    assert tolerances_for("fp16").max_abs is None  # half precision is judged on top-1, KL and generation
    assert tolerances_for("fp32", Tolerances(max_kl=1.0)) == Tolerances(max_kl=1.0)
    with pytest.raises(UsageError, match="unknown tolerance"):
        tolerances_for("fp32", {"atol": 1.0})
    with pytest.raises(UsageError, match="unknown precision"):
        tolerances_for("int2")


def test_cases_are_left_padded_real_text_and_random():
    text = np.arange(100, 160)
    cases = make_cases((1, 3), (1, 9), vocab_size=50, pad_id=0, text_ids=text, seed=0)
    assert [c.name for c in cases] == [
        "text b1 L1", "text b1 L9", "text b3 L1", "text b3 L9",
        "random b1 L1", "random b1 L9", "random b3 L1", "random b3 L9",
    ]  # fmt: skip
    c = cases[3]
    assert c.input_ids.shape == (3, 9)
    lengths = c.attention_mask.sum(1)
    assert lengths[0] == 9 and lengths[1] < 9 and lengths[2] < lengths[1]
    for row, m in zip(c.input_ids, c.attention_mask):
        assert (m == np.sort(m)).all()  # zeros first: left padding
        real = row[m == 1]
        assert (np.diff(real) == 1).all() and real[0] >= 100  # a contiguous slice of the text
        assert (row[m == 0] == 0).all()
    assert all(((c.input_ids >= 0) & (c.input_ids < 50)).all() for c in cases if c.source == "random")
    assert make_cases((2,), (4,), 50, 0, None)[0].source == "random"  # no text: random ids only


def test_prompt_text_errors(tmp_path, char_tokenizer):

    tok = char_tokenizer()
    with pytest.raises(UsageError, match="not found"):
        read_prompt_ids(tok, tmp_path / "missing.txt", 8)
    short = tmp_path / "short.txt"
    short.write_text("abc")
    with pytest.raises(UsageError, match="fewer than the longest case"):
        read_prompt_ids(tok, short, 8)
    ids, note = read_prompt_ids(tok, short, 3)
    assert ids.tolist() == [ord("a"), ord("b"), ord("c")] and str(short) in note


# ---------------------------------------------------------------------------------------------
# Real exports


def export(model_dir, out, cache=True, precision="fp32"):
    from shortened.exporters.onnx import export_onnx

    export_onnx(str(model_dir), out, precision=precision, cache=cache, progress=False)
    return out


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    """Lazily exported tiny models, keyed (family, pruned, cache, precision); each exported once per module."""
    from shortened.converter.steps import prune

    root = tmp_path_factory.mktemp("parity")
    done = {}

    def get(family="llama", pruned=False, cache=True, precision="fp32"):
        key = (family, pruned, cache, precision)
        if key not in done:
            src = tiny_models[family]
            if pruned:
                src = root / f"{family}-pruned"
                if not src.exists():
                    prune(str(tiny_models[family]), src, blocks=[1, 2, 3, 4], no_protect=True, progress=False)
            done[key] = (src, export(src, root / "-".join(map(str, key)), cache, precision))
        return done[key]

    return get


FAST = dict(batch_sizes=(1, 3), seq_lens=(1, 7), new_tokens=5, progress=False)


# pruned models keep blocks 0 and 5 (export time grows with blocks); test_export_onnx.py covers every family's export
@pytest.mark.parametrize("family,pruned", [("llama", False), ("llama", True), ("mistral", True), ("qwen2", True),
                                           ("gemma2", True)])  # fmt: skip
def test_fp32_export_passes(exported, family, pruned):
    ref, onnx_dir = exported(family, pruned)
    r = validate_parity(str(ref), onnx_dir, **FAST)
    assert r.passed, r.table()
    assert r.precision == "fp32" and r.providers == ["CPUExecutionProvider"]
    assert {c.source for c in r.cases} == {"text", "random"}
    assert max(c.max_abs for c in r.cases) < 1e-4
    assert all(c.first_diff == [None] * c.batch for c in r.cases)


def test_export_without_cache_passes(exported):
    ref, onnx_dir = exported("llama", pruned=True, cache=False)
    r = validate_parity(str(ref), onnx_dir, **FAST)
    assert r.passed, r.table()
    assert any("no KV cache" in n for n in r.notes)


def _corrupt(onnx_dir, out):
    """A copy of the export with one weight of the first block changed."""
    import onnx
    from onnx import numpy_helper

    shutil.copytree(onnx_dir, out)
    path = out / "model.onnx"
    model = onnx.load(str(path))
    weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2]
    target = next(t for t in weights if "embed" not in t.name)  # the first block's first projection
    w = numpy_helper.to_array(target).copy()
    w.flat[0] += 5.0
    target.CopyFrom(numpy_helper.from_array(w, target.name))
    for f in out.glob("*.onnx*"):
        f.unlink()
    onnx.save(model, str(path))
    return out


def test_corrupted_export_fails_with_exit_1(exported, tmp_path, capsys):
    from shortened.cli import main

    ref, onnx_dir = exported("llama")
    bad = _corrupt(onnx_dir, tmp_path / "corrupt")
    report = tmp_path / "out" / "parity.json"
    args = ["validate", "parity", "--reference", str(ref), "--onnx", str(bad), "--report", str(report)]
    rc = main([*args, "--batch-sizes", "2", "--seq-lens", "6", "--new-tokens", "3"])
    assert rc == 1
    out, err = capsys.readouterr()
    assert "FAIL" in out and "CPUExecutionProvider" in out
    ours = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("shortened:")]
    assert len(ours) == 1 and ours[0].startswith("shortened: gate failed: parity:")
    data = json.loads(report.read_text())
    assert data["passed"] is False and data["execution_providers"] == ["CPUExecutionProvider"]
    assert data["cases"][0]["max_abs"] > 1e-2 and data["failures"]
    # the same export passes once the gates are loose enough: every tolerance is a CLI flag
    loose = ["--max-abs", "none", "--min-cosine", "0", "--min-top1", "0", "--max-kl", "100", "--max-top1-gap", "none"]
    assert main([*args, "--batch-sizes", "1", "--seq-lens", "3", "--new-tokens", "2", *loose]) == 0
    assert json.loads(report.read_text())["passed"] is True


def test_bad_inputs_exit_2_with_one_line(exported, tiny_models, tmp_path, capsys):
    from shortened.cli import main

    ref, onnx_dir = exported("llama")
    pruned_ref, _ = exported("llama", pruned=True)
    (tmp_path / "empty").mkdir()
    cases = {
        "not found": ["--reference", str(tmp_path / "nope"), "--onnx", str(onnx_dir)],
        "holds no model.onnx": ["--reference", str(ref), "--onnx", str(tmp_path / "empty")],
        "ONNX model .* not found": ["--reference", str(ref), "--onnx", str(tmp_path / "nowhere")],
        "has 6 layers but the reference .* has 2 blocks": ["--reference", str(pruned_ref), "--onnx", str(onnx_dir)],
        "sequence lengths must be": ["--reference", str(ref), "--onnx", str(onnx_dir), "--seq-lens", "0"],
    }
    for message, args in cases.items():
        assert main(["validate", "parity", *args]) == 2, message
        err = capsys.readouterr().err  # (transformers may draw its loading bar above our line)
        ours = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("shortened:")]
        assert len(ours) == 1 and ours[0].startswith("shortened: error:") and re.search(message, ours[0]), err


def test_fp16_export_passes_fp16_tolerances(exported):
    ref, onnx_dir = exported("llama", pruned=True, precision="fp16")
    r = validate_parity(str(ref), onnx_dir, **FAST)
    assert r.precision == "fp16" and r.tolerances == DEFAULT_TOLERANCES["fp16"]
    assert r.passed, r.table()
    assert max(c.max_abs for c in r.cases) > 0  # it really is a different computation


@pytest.mark.integration
def test_smollm2_pruned_to_24_blocks(smollm2_24_onnx, tmp_path, capsys):
    pruned, onnx_dir = smollm2_24_onnx
    r = validate_parity(str(pruned), onnx_dir, batch_sizes=(1, 2), seq_lens=(40,), new_tokens=32, progress=False)
    with capsys.disabled():
        print("\nSmolLM2 pruned to 24 blocks, fp32 ONNX vs PyTorch:\n" + r.table())
    assert r.passed, r.table()
    assert r.precision == "fp32" and r.providers[0] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert {c.source for c in r.cases} == {"text", "random"}
    assert all(c.first_diff == [None] * c.batch and c.new_tokens == 32 for c in r.cases)  # 32 greedy tokens identical


def test_parity_options_make_the_flags_and_check_once(capsys):
    """ParityOptions and Tolerances carry each flag's meaning and choices; 'none' turns a gate off; validate()
    refuses bad values with today's messages and leaves the caller's Tolerances alone."""
    import dataclasses

    from shortened.cli import build_parser, main
    from shortened.cli.args import options_from_args
    from shortened.validators.parity import ParityOptions

    with pytest.raises(SystemExit):
        main(["validate", "parity", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--precision {fp32,fp16,bf16,int4,int8} tolerance set" in text and "--max-kl MAX_KL largest KL" in text
    assert "--provider {auto,cpu,cuda,tensorrt}" in text and "(default 1,16,48)" in text
    args = build_parser().parse_args(["validate", "parity", "--reference", "r", "--onnx", "o", "--max-abs", "none",
                              "--min-cosine", "0.5", "--seq-lens", "3,4", "--prompts", "p.txt"])  # fmt: skip
    tols = {f.name: getattr(args, f.name) for f in dataclasses.fields(Tolerances) if hasattr(args, f.name)}
    assert tols == {"max_abs": None, "min_cosine": 0.5}
    opts = options_from_args(ParityOptions, args, tolerances=tols).validate()
    assert (opts.seq_lens, opts.batch_sizes, opts.prompts_file, opts.provider) == ([3, 4], [1, 2], "p.txt", "auto")
    for bad, message in [
        (dict(seq_lens=[0]), "sequence lengths must be one or more integers >= 1, got [0]"),
        (dict(new_tokens=0), "new tokens must be"),
        (dict(precision="int2"), "unknown precision 'int2'"),
        (dict(threads="2"), "parity option threads must be an integer"),
        (dict(provider="rocm"), "unknown provider 'rocm'; choose one of auto, cpu, cuda, tensorrt"),
    ]:
        with pytest.raises(UsageError, match=re.escape(message)):
            ParityOptions(**bad).validate()
    mine = Tolerances(max_abs=1)
    assert ParityOptions(tolerances=mine).validate().tolerances.max_abs == 1.0 and type(mine.max_abs) is int


def test_runners_close_when_parity_stops_on_an_error(exported, monkeypatch):
    from shortened.runtime.onnxruntime import OrtRunner

    closed = []
    monkeypatch.setattr(OrtRunner, "close", lambda self: closed.append(self))
    _, onnx_dir = exported("llama")
    pruned_ref, _ = exported("llama", pruned=True)
    with pytest.raises(UsageError, match="has 6 layers but the reference"):
        validate_parity(str(pruned_ref), onnx_dir, **FAST)
    assert len(closed) == 1
