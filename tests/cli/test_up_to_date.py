"""Standalone build commands are up to date on their own finished output, as make is: a re-run with the same
inputs and settings exits 0, says so and touches nothing; another setting needs --force (the existing error)."""

from __future__ import annotations

import hashlib
import json

import pytest

from shortened.cli import main
from shortened.runtime.tensorrt import tensorrt_unavailable_reason


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def printed(stdout: str):
    """The JSON result a command printed (one line, or an indented document)."""
    try:
        return json.loads(stdout)
    except ValueError:
        return json.loads(stdout.strip().splitlines()[-1])


def snapshot(d) -> dict:
    """{relative path: (sha256, mtime_ns)} of every file under d, the marker included."""
    return {str(p.relative_to(d)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def work(tiny_models, tmp_path_factory):
    """A pruned tiny llama (5 blocks) and a training text, shared by the commands below."""
    root = tmp_path_factory.mktemp("up_to_date")
    pruned, onnx = root / "pruned", root / "onnx"
    assert main(["prune", str(tiny_models["llama"]), "--blocks", "2", "--no-protect", "--out", str(pruned)]) == 0
    text = root / "train.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return {"root": root, "model": tiny_models["llama"], "pruned": pruned, "onnx": onnx, "text": text}


def commands(w) -> dict:
    """{command: (argv without --out, the same with one setting changed)}."""
    retrain = ["retrain", w["pruned"], "--method", "full", "--data", w["text"], "--max-steps", "1", "--seq-len", "32",
               "--eval-steps", "1", "--no-progress"]  # fmt: skip
    return {
        "prune": (["prune", w["model"], "--blocks", "2", "--no-protect"],
                  ["prune", w["model"], "--blocks", "3", "--no-protect"]),
        "export onnx": (["export", "onnx", w["pruned"], "--no-cache"],  # no cache: a quick trace
                        ["export", "onnx", w["pruned"], "--no-cache", "--opset", "19"]),
        "retrain": (retrain, [*retrain, "--lr", "0.001"]),
        "width-prune": (["width-prune", w["model"], "--match", w["pruned"]],
                        ["width-prune", w["model"], "--match", w["pruned"], "--multiple-of", "8"]),
        "export tensorrt": (["export", "tensorrt", w["onnx"], "--batch", "1:1:2", "--seq", "1:8:16"],
                            ["export", "tensorrt", w["onnx"], "--batch", "1:1:4", "--seq", "1:8:16"]),
    }  # fmt: skip


@pytest.mark.parametrize("command", ["prune", "export onnx", "retrain", "width-prune", "export tensorrt"])
def test_rerun_is_up_to_date_and_other_settings_need_force(work, command, capsys, tmp_path):
    if command == "export tensorrt" and tensorrt_unavailable_reason():
        pytest.skip(f"no engine can be built here ({tensorrt_unavailable_reason()}); --check-only writes no output")
    if command == "export tensorrt" and not work["onnx"].exists():
        assert main(["export", "onnx", str(work["pruned"]), "--out", str(work["onnx"])]) == 0
    same, other = commands(work)[command]
    out = tmp_path / "out"
    code, first, err = run(capsys, *same, "--out", out)
    assert code == 0, err
    before = snapshot(out)

    code, again, err = run(capsys, *same, "--out", out)
    assert code == 0 and f"{out} is up to date" in err, err
    assert snapshot(out) == before
    assert printed(again) == printed(first)

    code, _, err = run(capsys, *other, "--out", out)
    assert code == 2 and "already exists; pass --force" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(out) == before

    code, _, err = run(capsys, *other, "--out", out, "--force")
    assert code == 0 and "up to date" not in err, err
    assert snapshot(out) != before
    code, _, err = run(capsys, *other, "--out", out)  # the rebuilt output is up to date with its own settings
    assert code == 0 and "up to date" in err, err
