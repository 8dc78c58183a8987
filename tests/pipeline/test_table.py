"""The step table on its own (no model): a changed setting or input changes the keys of exactly the steps that
read it and of the steps after those; run with fake step functions, only those run again."""

from __future__ import annotations

import dataclasses

import pytest

from shortened.pipeline.build import Steps, run_steps
from shortened.pipeline.config import ConvertConfig
from shortened.pipeline.table import Ctx, step_keys, table

ALL = {"score", "prune", "onnx", "onnx-int4", "tensorrt", "parity", "parity-int4", "quality", "speed"}
EXPORTS = {"onnx", "onnx-int4", "tensorrt", "parity", "parity-int4", "quality", "speed"}


def _cfg(**kw) -> ConvertConfig:
    base = dict(model="m", out="o", calib="calib.txt", eval_text="eval.txt", ratio=0.25, precisions=["fp32", "int4"])
    return ConvertConfig(**{**base, **kw})


FPS = {"model": {"sha256": "m"}, "calib": {"sha256": "c"}, "recover_calib": None, "eval_text": {"sha256": "e"},
       "retrain_data": "", "parity_prompts": ""}  # fmt: skip


def _keys(cfg: ConvertConfig, fps=FPS, **kw) -> dict:
    return step_keys(table(cfg, **kw), cfg, fps)


def _changed(a: dict, b: dict) -> set:
    assert set(a) == set(b)
    return {k for k in a if a[k] != b[k]}


@pytest.mark.parametrize(
    "setting, value, rerun",
    [
        ("parity_new_tokens", 8, {"parity", "parity-int4"}),
        ("eval_max_windows", 8, {"quality"}),
        ("batch_sizes", [1], {"speed"}),
        ("trt_batch", "1:4:8", {"tensorrt"}),
        ("quant_options", {"block_size": 64}, {"onnx-int4", "parity-int4", "quality", "speed"}),
        ("opset", 18, EXPORTS),
        ("ratio", 0.4, {"prune"} | EXPORTS),  # the scores are not iterative: they do not depend on the count
        ("criterion", "taylor", ALL),
        ("max_ppl_ratio", 1.5, set()),  # a gate: no step reads it (ratio is not auto)
        ("min_speedup", 1.1, set()),
        ("speed_time_budget", 10.0, {"speed"}),
    ],
)
def test_a_setting_changes_exactly_the_keys_of_its_steps_and_theirs(setting, value, rerun):
    before = _keys(_cfg())
    after = _keys(dataclasses.replace(_cfg(), **{setting: value}))
    assert set(before) == ALL
    assert _changed(before, after) == rerun


def test_an_input_file_changes_the_keys_of_the_steps_reading_it():
    assert _changed(_keys(_cfg()), _keys(_cfg(), {**FPS, "eval_text": {"sha256": "e2"}})) == {"quality"}
    assert _changed(_keys(_cfg()), _keys(_cfg(), {**FPS, "model": {"sha256": "m2"}})) == ALL


def test_iterative_scores_depend_on_the_count_and_blocks_need_no_scores():
    assert _changed(_keys(_cfg(), iterative=True), _keys(_cfg(ratio=0.4), iterative=True)) == ALL
    manual = _keys(_cfg(blocks=[2]))
    assert "score" not in manual and manual["prune"] != _keys(_cfg(blocks=[3]))["prune"]


def _dependents(steps, names: set) -> set:
    out = set(names)
    for s in steps:  # the table is in order: a step comes after the steps it names
        if out & set(s.after):
            out.add(s.name)
    return out


def _other(v):
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v + 1
    if isinstance(v, str):
        return v + "x"
    if isinstance(v, dict):
        return {**v, "x": 1}
    return [*(v or []), 1]


@pytest.mark.parametrize(
    "kw", [{}, {"retrain": "lora", "retrain_data": "d.txt"}, {"ratio": "auto", "max_ppl_ratio": 1.5}]
)
def test_every_setting_of_the_table_reruns_its_steps_and_their_dependents(kw):
    cfg = _cfg(**kw)
    steps = table(cfg, trt_skip="")
    base = step_keys(steps, cfg, FPS)
    for setting in sorted({k for s in steps for k in s.settings}):
        other = dataclasses.replace(cfg, **{setting: _other(getattr(cfg, setting))})
        readers = {s.name for s in steps if setting in s.settings}
        assert _changed(base, step_keys(steps, other, FPS)) == _dependents(steps, readers), setting


def _fake(calls: list):
    def run(name, ctx, res):
        calls.append(name)
        return {"name": name, "got": sorted(res), "path": str(ctx.work / name / "model.onnx")}

    return run


def _run(cfg: ConvertConfig, work, calls: list, log: list) -> dict:
    steps = [dataclasses.replace(s, run=lambda ctx, res, n=s.name: _fake(calls)(n, ctx, res)) for s in table(cfg)]
    ledger = Steps(work, cfg.rerun, log.append)
    return run_steps(steps, step_keys(steps, cfg, FPS), Ctx(cfg, work, say=log.append), ledger), ledger


def test_run_steps_reuses_unchanged_steps_and_reruns_the_changed_ones(tmp_path):
    calls, log = [], []
    res, ledger = _run(_cfg(tensorrt="off"), tmp_path, calls, log)
    assert calls == ["score", "prune", "onnx", "onnx-int4", "parity", "parity-int4", "quality", "speed"]
    assert res["tensorrt"] == {"skipped": "tensorrt = off"} and "[tensorrt] skipped: tensorrt = off" in log
    # a step gets the results of the steps it comes after; paths in results are relative to the work directory
    assert res["onnx-int4"]["got"] == ["onnx"] and res["quality"]["got"] == ["onnx", "onnx-int4", "prune"]
    assert res["onnx"]["path"] == "onnx/model.onnx"

    calls.clear()
    res2, ledger = _run(_cfg(tensorrt="off"), tmp_path, calls, log)
    assert calls == [] and res2 == res and all(r["reused"] for r in ledger.log.values())
    assert any(m.startswith("[prune] reusing the finished step") for m in log)

    _run(_cfg(tensorrt="off", eval_max_windows=4), tmp_path, calls, log)
    assert calls == ["quality"]
    calls.clear()
    _run(_cfg(tensorrt="off", eval_max_windows=4, rerun=["onnx"]), tmp_path, calls, log)
    assert calls == ["onnx", "onnx-int4"]  # --rerun onnx: every precision's export (and nothing else)
