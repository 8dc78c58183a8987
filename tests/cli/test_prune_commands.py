"""The converter's CLI: score and prune end to end, and every bad input gets one clear line and exit code 2."""

from __future__ import annotations

import json

import pytest
import torch

from shortened.cli import main
from shortened.io import fingerprint_path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_score_then_prune_from_scores(tiny_models, calib_file, tmp_path, capsys):
    src = tiny_models["llama"]
    scores = tmp_path / "s" / "scores.json"
    code, out, err = run(capsys, "score", src, "--criterion", "taylor", "--calib", calib_file, "--seq-len", 32,
                         "--num-samples", 4, "--protect", "0,-1", "--out", scores)  # fmt: skip
    assert code == 0, err
    data = json.loads(scores.read_text())
    assert data["criterion"] == "taylor" and len(data["scores"]) == 6 and data["removal_order"]
    assert data["calibration"]["num_samples"] == 4 and data["model"]["sha256"] == fingerprint_path(src)["sha256"]
    assert scores.with_suffix(".png").stat().st_size > 1000
    code, out, err = run(capsys, "score", src, "--criterion", "magnitude", "--out", scores)
    assert code == 2 and "already exists" in err and json.loads(scores.read_text())["criterion"] == "taylor"
    out_dir = tmp_path / "pruned"
    code, out, err = run(capsys, "prune", src, "--scores", scores, "--remove", 2, "--protect", "0,-1", "--out", out_dir)
    assert code == 0, err
    rec = json.loads((out_dir / "pruning.json").read_text())
    assert rec["removed_blocks"] == sorted(data["removal_order"][:2])
    assert (out_dir / "scores.png").is_file() and (out_dir / "model.safetensors").is_file()


def test_prune_with_criterion_and_ratio(tiny_models, calib_file, tmp_path, capsys):
    out_dir = tmp_path / "p"
    code, out, err = run(capsys, "prune", tiny_models["qwen2"], "--criterion", "bi", "--calib", calib_file,
                         "--seq-len", 32, "--num-samples", 2, "--ratio", 0.34, "--no-protect",
                         "--out", out_dir)  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["removed"] and len(json.loads(out)["removed"]) == 2  # round(0.34 * 6)


def test_iterative_cli(tiny_models, calib_file, tmp_path, capsys):
    scores = tmp_path / "it.json"
    code, out, err = run(capsys, "score", tiny_models["mistral"], "--calib", calib_file, "--seq-len", 32,
                         "--num-samples", 2, "--iterative", "--remove", 2, "--protect", "0",
                         "--out", scores)  # fmt: skip
    assert code == 0, err
    data = json.loads(scores.read_text())
    assert data["iterative"] and len(data["removal_order"]) == 2 and len(data["steps"]) == 2


BAD = [
    (["--blocks", "0,1,2,3,4,5", "--no-protect"], "leaves no model"),
    (["--blocks", "1,9", "--no-protect"], "out of range"),
    (["--blocks", "2,2", "--no-protect"], "repeated"),
    (["--ratio", "1.5", "--criterion", "magnitude"], "between 0 and 1"),
    (["--ratio", "0", "--criterion", "magnitude"], "between 0 and 1"),
    (["--blocks", "0,2"], "protected"),
    (["--remove", "2"], "needs scores"),
    (["--remove", "2", "--blocks", "2"], "exactly one"),
    (["--remove", "3", "--criterion", "magnitude", "--protect", "0,1,2,3"], "only 2 are candidates"),
    (["--remove", "1", "--criterion", "ppl", "--no-protect"], "needs calibration data"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[m for _, m in BAD])
def test_bad_prune_inputs_exit_2_with_one_line(extra, message, tiny_models, tmp_path, capsys):
    src = tiny_models["llama"]
    before = fingerprint_path(src)["sha256"]
    out_dir = tmp_path / "o"
    code, out, err = run(capsys, "prune", src, "--out", out_dir, *extra)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out_dir.exists() and not list(tmp_path.glob(".o.tmp-*"))
    assert fingerprint_path(src)["sha256"] == before


def test_output_rules(tiny_models, tmp_path, capsys):
    src = tiny_models["llama"]
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    code, _, err = run(capsys, "prune", src, "--out", out_dir, "--blocks", "2", "--no-protect")
    assert code == 2 and "already exists" in err and "--force" in err
    code, _, err = run(capsys, "prune", src, "--out", out_dir, "--blocks", "2", "--no-protect", "--force")
    assert code == 0, err
    assert json.loads((out_dir / "config.json").read_text())["num_hidden_layers"] == 5
    code, _, err = run(capsys, "prune", src, "--out", src / "inside", "--blocks", "2", "--no-protect")
    assert code == 2 and "inside the input model" in err
    assert not (src / "inside").exists()


def test_unsupported_and_missing_models(tmp_path, capsys):
    from transformers import AutoConfig

    d = tmp_path / "bert"
    AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2).save_pretrained(d)
    code, _, err = run(capsys, "prune", d, "--out", tmp_path / "o", "--blocks", "1", "--no-protect")
    assert code == 2 and "unsupported architecture 'bert'" in err and "llama" in err
    code, _, err = run(capsys, "prune", tmp_path / "nope", "--out", tmp_path / "o", "--blocks", "1")
    assert code == 2 and "not found" in err
    code, _, err = run(capsys, "score", tmp_path / "nope" / "x.gguf")
    assert code == 2 and "GGUF file" in err


def test_pickle_weights_refused_by_default(tiny_models, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    d = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    model.config.save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")  # transformers 5 only writes safetensors
    code, _, err = run(capsys, "prune", d, "--out", tmp_path / "o", "--blocks", "1", "--no-protect")
    assert code == 2 and "safetensors" in err and "--allow-pickle" in err
