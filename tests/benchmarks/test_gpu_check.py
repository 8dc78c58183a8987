"""The GPU check kit's code path on CPU (`--smoke`: tiny configs, eager decode); the real run needs a CUDA GPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _kit():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_report(tmp_path, capsys):
    kit = _kit()
    assert kit.main(["--smoke", "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rep["convert"]["status"] == "skipped" and rep["settings"]["smoke"]
    rows = rep["speed"]
    assert {r["variant"] for r in rows} == {"original", "depth-20%", "depth-35%", "width-20%", "width-35%"}
    assert len(rows) == 5 * 2 and all("ms_per_token" in r and r["tokens_per_s"]["n"] == 2 for r in rows)
    by = {(r["variant"], r["batch"]): r for r in rows}
    for pct, removed in (("20%", 2), ("35%", 3)):  # of 8 blocks
        depth, width = by[(f"depth-{pct}", 1)], by[(f"width-{pct}", 1)]
        assert depth["blocks"] == 8 - removed and width["blocks"] == 8
        assert abs(width["params"] - depth["params"]) / depth["params"] < 0.03  # the same parameter budget
        assert depth["ideal_speedup"] > 1 and width["ideal_speedup"] > 1 and "speedup" in depth
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| tiny | width-35% |" in table and "convert on SmolLM2" in table
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "gpu_check.png").stat().st_size > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_gpu(tmp_path, capsys):
    assert _kit().main(["--out", str(tmp_path)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_convert_step_skips_what_is_absent(tmp_path):
    import argparse

    kit = _kit()
    args = argparse.Namespace(model=str(tmp_path / "no-model"), convert_timeout=10)
    res = kit.run_convert(args, tmp_path)
    assert res["status"] == "skipped" and "no SmolLM2 checkpoint" in res["reason"] and "--model" in res["reason"]
