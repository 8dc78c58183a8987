"""Scoring with accelerate's offload (`--device auto --max-memory`): half the blocks on disk, the same scores."""

from __future__ import annotations

import json

import pytest

from shortened.cli import main
from shortened.converter.offload import is_offloaded
from shortened.converter.steps import score
from shortened.data import CalibSpec
from shortened.errors import UsageError
from shortened.model.loading import LoadOptions, load_model, parse_max_memory

BUDGET = {"cpu": "700KB"}  # the 6-block tiny llama is ~1.3 MB in fp32: blocks 3..5, norm and head go to disk


@pytest.fixture(scope="module")
def calib(calib_file):
    return CalibSpec(str(calib_file), num_samples=4, seq_len=32)


def test_half_the_blocks_on_disk(tiny_models, tmp_path):
    loaded = load_model(str(tiny_models["llama"]), LoadOptions(device="auto", max_memory=BUDGET,
                                                               offload_folder=str(tmp_path)))  # fmt: skip
    where = loaded.model.hf_device_map
    on_disk = [i for i in range(6) if where.get(f"model.layers.{i}") == "disk"]
    assert len(on_disk) >= 3, where
    assert is_offloaded(loaded.model)  # (safetensors weights are read from the checkpoint, not copied)
    assert loaded.model.model.layers[on_disk[0]].mlp.up_proj.weight.device.type == "meta"  # not in memory


@pytest.mark.parametrize("criterion", ["ppl", "bi", "taylor", "magnitude"])
def test_offloaded_scores_equal_in_memory(tiny_models, calib, criterion):
    src = str(tiny_models["llama"])
    ref = score(src, calib, criterion=criterion, no_protect=True, progress=False, plot=False)
    off = score(src, calib, criterion=criterion, no_protect=True, load=LoadOptions(device="auto", max_memory=BUDGET),
                progress=False, plot=False)  # fmt: skip
    assert all(s > 0 for s in ref.scores)  # a zero would be an offloaded block's lost gradient
    assert off.scores == pytest.approx(ref.scores, rel=1e-5)
    assert off.removal_order == ref.removal_order


def test_cli_max_memory(tiny_models, calib_file, tmp_path, capsys):
    src = str(tiny_models["llama"])
    args = [
        "score",
        src,
        "--criterion",
        "ppl",
        "--calib",
        str(calib_file),
        "--num-samples",
        "4",
        "--seq-len",
        "32",
        "--no-protect",
    ]
    assert main([*args, "--out", str(tmp_path / "mem.json")]) == 0
    assert main([*args, "--out", str(tmp_path / "off.json"), "--device", "auto", "--max-memory", "cpu=700KB"]) == 0
    a, b = (json.loads((tmp_path / f).read_text())["scores"] for f in ("mem.json", "off.json"))
    assert b == pytest.approx(a, rel=1e-5)
    assert main([*args, "--out", str(tmp_path / "x.json"), "--max-memory", "cpu=1GB"]) == 2  # needs --device auto
    assert "--device auto" in capsys.readouterr().err


def test_parse_max_memory():
    assert parse_max_memory("cpu=2GiB, 0=20GiB") == {"cpu": "2GiB", 0: "20GiB"}
    with pytest.raises(UsageError, match="DEVICE=SIZE"):
        parse_max_memory("cpu")
