"""`shortened convert` end to end on a tiny model: artifacts, manifest consistency, exit codes, step reuse."""

from __future__ import annotations

import json

import pytest

from shortened.cli import main
from shortened.io import sha256_file


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory, make_tiny):
    return make_tiny("llama", tmp_path_factory.mktemp("convert") / "llama8", layers=8)


@pytest.fixture(scope="module")
def texts(tmp_path_factory, corpus, wikitext):
    d = tmp_path_factory.mktemp("texts")
    calib, evalt = d / "calib.txt", d / "eval.txt"
    calib.write_text(corpus.read_text()[:20000] if corpus.is_file() else "the quick brown fox. " * 1000)
    evalt.write_text(wikitext.read_text()[:20000] if wikitext.is_file() else "a lazy dog sleeps. " * 1000)
    return calib, evalt


def _args(model, out, calib, evalt, *extra):
    return [
        "convert", "--model", str(model), "--out", str(out), "--calib", str(calib), "--seq-len", "32",
        "--num-samples", "4", "--protect", "0,-1", "--ratio", "0.25", "--eval-text", str(evalt),
        "--eval-max-windows", "8", "--batch-sizes", "1,2", "--repeats", "1", "--prompt-len", "8", "--new-tokens", "4",
        "--parity-new-tokens", "4", "--speed-backend", "torch", "--speed-ci-target", "0", "--quiet", *extra,
    ]  # fmt: skip


def test_convert_end_to_end_then_reuse_then_gate(tiny8, texts, tmp_path, capsys):
    calib, evalt = texts
    out = tmp_path / "build"
    code = main(_args(tiny8, out, calib, evalt))
    err = capsys.readouterr().err
    assert code == 0, err
    for f in ("pruned/model.safetensors", "pruned/pruning.json", "onnx/model.onnx", "manifest.json", "report.md",
              "scores.json", "scores.png", "parity.json", "quality.json", "speed.json", "speed.png"):  # fmt: skip
        assert (out / f).is_file(), f
    assert not list(tmp_path.glob(".build.partial*"))
    m = json.loads((out / "manifest.json").read_text())
    assert m["passed"] and m["gates"]["parity"]["passed"]
    assert m["pruning"]["removed_blocks"] == json.loads((out / "pruned/pruning.json").read_text())["removed_blocks"]
    assert len(m["pruning"]["removed_blocks"]) == 2 and m["pruning"]["kept"] == 6
    for rel, info in m["artifacts"].items():  # the manifest describes exactly the files that are there
        assert sha256_file(out / rel) == info["sha256"], rel
    assert set(m["artifacts"]) == {
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name not in ("manifest.json", "steps.json")
    }
    assert set(m["quality"]) == {"original", "pruned", "onnx fp32"} and m["quality"]["pruned"]["windows"] == 8
    assert m["tensorrt"]["skipped"]  # no TensorRT here, and the manifest says why
    assert set(m["speed"]["decode_speedup"]["1"]) == {"candidate", "width"}
    assert m["tool"]["torch"] and m["inputs"]["model"]["sha256"]
    assert "blocks removed" in err and "parity" in err

    # same inputs: every step is reused; a gate that cannot pass gives exit code 1 with artifacts kept
    code = main(_args(tiny8, out, calib, evalt, "--force", "--min-speedup", "100"))
    err = capsys.readouterr().err
    assert code == 1 and "min_speedup" in err
    m2 = json.loads((out / "manifest.json").read_text())
    assert all(s["reused"] for s in m2["steps"].values()), m2["steps"]
    assert "reusing the finished step" in err
    assert not m2["passed"] and not m2["gates"]["min_speedup"]["passed"] and m2["gates"]["min_speedup"]["limit"] == 100
    assert (out / "onnx/model.onnx").is_file()

    # a changed input invalidates what depends on it, and only that
    code = main(_args(tiny8, out, calib, evalt, "--force", "--no-speed", "--ratio", "0.4"))
    err = capsys.readouterr().err
    assert code == 0, err
    m3 = json.loads((out / "manifest.json").read_text())
    assert m3["steps"]["score"]["reused"] and not m3["steps"]["prune"]["reused"] and not m3["steps"]["onnx"]["reused"]
    assert len(m3["pruning"]["removed_blocks"]) == 3


def test_invalid_config_fails_before_any_work(tiny8, texts, tmp_path, capsys):
    calib, evalt = texts
    out = tmp_path / "o"
    cases = [
        (["--ratio", "1.5"], "between 0 and 1"),
        (["--calib", str(tmp_path / "missing.txt")], "not found"),
        (["--criterion", "nope"], "unknown criterion"),
        (["--speed-backend", "tpu"], "unknown speed_backend 'tpu'; choose one of torch"),
        (["--rerun", "everything"], "unknown rerun 'everything'; choose one of score"),
    ]
    for extra, message in cases:
        code = main(_args(tiny8, out, calib, evalt, *extra))
        err = capsys.readouterr().err
        assert code == 2 and message in err, (extra, err)
        assert len(err.strip().splitlines()) == 1, err
    toml = tmp_path / "convert.toml"
    toml.write_text(f'model = "{tiny8}"\n[pruning]\nratio = 0.2\nbogus = 1\n')
    code = main(["convert", "--config", str(toml), "--out", str(out)])
    assert code == 2 and "unknown setting(s) bogus" in capsys.readouterr().err
    toml.write_text(f'model = "{tiny8}"\ncalib = "{calib}"\n[pruning]\nratio = "a lot"\n')
    code = main(["convert", "--config", str(toml), "--out", str(out)])
    assert code == 2 and "must be a number" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".o.partial*"))


def test_example_config_sections_only_group_keys(repo):
    from shortened.pipeline import load_config_file, make_config

    cfg = make_config(load_config_file(repo / "examples" / "smollm2.toml"))
    assert cfg.criterion == "ppl" and cfg.ratio == 0.2 and cfg.num_samples == 10 and cfg.seq_len == 128
    assert cfg.speed is True and cfg.batch_sizes == [1, 8] and cfg.width_baseline is True and cfg.optimize is True


def _snapshot(out):
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, sha256_file(p)) for p in out.rglob("*") if p.is_file()}


def test_convert_on_its_own_finished_output_is_up_to_date(tmp_path, capsys, make_tiny):
    """Like make: the same inputs and settings again need no --force and rewrite nothing; other settings need it."""
    model = make_tiny("llama", tmp_path / "llama2", layers=2)
    out = tmp_path / "build"
    args = ["convert", "--model", str(model), "--out", str(out), "--blocks", "1", "--no-protect", "--no-speed",
            "--tensorrt", "off", "--parity-batch-sizes", "1", "--parity-new-tokens", "2", "--quiet"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    capsys.readouterr()
    before = _snapshot(out)
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "is up to date" in err and "running" not in err and "reusing" not in err, err
    assert _snapshot(out) == before

    code = main([*args, "--parity-new-tokens", "3"])  # other settings: the output is not replaced without --force
    err = capsys.readouterr().err
    assert code == 2 and "already exists; pass --force" in err and len(err.strip().splitlines()) == 1, err
    assert _snapshot(out) == before

    # a failed gate stays failed when the output is up to date (exit code 1 again, nothing run)
    assert main([*args, "--force", "--max-ppl-ratio", "1.5"]) == 1
    assert "[parity] reusing the finished step" in capsys.readouterr().err
    assert main([*args, "--max-ppl-ratio", "1.5"]) == 1
    err = capsys.readouterr().err
    assert "is up to date" in err and "max_ppl_ratio: no perplexity measured" in err
    (out / "parity.txt").unlink()  # a missing artifact: not up to date
    assert main([*args, "--max-ppl-ratio", "1.5"]) == 2 and "already exists" in capsys.readouterr().err
