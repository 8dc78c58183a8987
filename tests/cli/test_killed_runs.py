"""Fault injection: `prune`, `export onnx` and `convert` killed with SIGKILL (and `convert` with SIGINT) at
several points leave nothing half-written at the target, and the next run succeeds (convert reusing the steps
that had finished).

The pause points are set from outside the library: each run is `python -c RUNNER POINT FLAG ARGV...`, where
RUNNER wraps one function of the package so that it touches FLAG and sleeps; the test waits for FLAG, then
kills. All runs start at once (they spend most of their time importing torch), then each is checked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from shortened.cli import main

RUNNER = r"""
import os, sys, time
point, flag, argv = sys.argv[1], sys.argv[2], sys.argv[3:]

def pause():
    open(flag, "w").close()
    time.sleep(600)

def after(mod, name):
    orig = getattr(mod, name)
    def wrapped(*a, **k):
        r = orig(*a, **k)
        pause()
        return r
    setattr(mod, name, wrapped)

if point == "while-loading":
    import transformers
    orig = transformers.AutoModelForCausalLM.from_pretrained
    transformers.AutoModelForCausalLM.from_pretrained = staticmethod(lambda *a, **k: (pause(), orig(*a, **k))[1])
    import shortened.converter.surgery as s  # prune by tensor surgery loads no model: it reads the headers first
    orig_applies = s.applies
    s.applies = lambda *a, **k: (pause(), orig_applies(*a, **k))[1]
elif point == "after-weights":
    import shortened.converter.steps as m
    after(m, "save_checkpoint")
    after(m.surgery, "cut_checkpoint")  # (the weights of prune by tensor surgery)
elif point == "after-graph":
    import shortened.exporters.onnx as m
    after(m, "save_graph")
elif point == "between-steps":
    import shortened.pipeline.build as m
    orig_step = m._run_step
    def step(steps, name, *a, **k):
        if name == "onnx":
            pause()
        return orig_step(steps, name, *a, **k)
    m._run_step = step
from shortened.cli import main
sys.exit(main(argv))
"""

BLOCK = ["--blocks", "1", "--no-protect"]


def _convert_args(model, out):
    return ["convert", "--model", str(model), "--out", str(out), *BLOCK, "--no-speed",
            "--tensorrt", "off", "--parity-batch-sizes", "1", "--parity-new-tokens", "2", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory, make_tiny):
    """A 2-block llama: every run here traces or exports it, and fewer blocks export faster."""
    return make_tiny("llama", tmp_path_factory.mktemp("killed-model") / "llama2", layers=2)


@pytest.fixture(scope="module")
def killed(tiny2, tmp_path_factory, repo):
    """Start every run, wait until each reaches its pause point, kill it; {name: (dir, target, returncode, err)}."""
    src = tiny2
    runs = {
        "prune-while-loading": ("while-loading", lambda o: ["prune", str(src), "--out", str(o), *BLOCK], "o"),
        "prune-after-weights": ("after-weights", lambda o: ["prune", str(src), "--out", str(o), *BLOCK], "o"),
        "export-after-graph": ("after-graph", lambda o: ["export", "onnx", str(src), "--out", str(o), "--no-cache"],
                               "onnx"),
        "convert-kill": ("between-steps", lambda o: _convert_args(src, o), "build"),
        "convert-sigint": ("between-steps", lambda o: _convert_args(src, o), "build"),
    }  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(repo)}
    procs = {}
    for name, (point, argv, target) in runs.items():
        d = tmp_path_factory.mktemp(name)
        flag, errf = d.parent / f"{name}.flag", open(d.parent / f"{name}.err", "w+")
        cmd = [sys.executable, "-c", RUNNER, point, str(flag), *argv(d / target)]
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=errf, start_new_session=True)
        procs[name] = (p, flag, errf, d, d / target)
    results = {}
    deadline = time.monotonic() + 400
    for name, (p, flag, errf, d, target) in procs.items():
        while not flag.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if p.poll() is None:
            p.send_signal(signal.SIGINT if name.endswith("sigint") else signal.SIGKILL)
        try:
            rc = p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
        errf.seek(0)
        results[name] = (d, target, rc, flag.exists(), errf.read())
    return results


def _check_killed(res, signal_rc=-signal.SIGKILL):
    d, target, rc, paused, err = res
    assert paused and rc == signal_rc, err
    assert not target.exists(), sorted(os.listdir(d))
    return d, target, err


def test_prune_killed_while_loading_leaves_nothing(killed, tiny2, capsys):
    d, target, _ = _check_killed(killed["prune-while-loading"])
    assert os.listdir(d) == []
    assert main(["prune", str(tiny2), "--out", str(target), *BLOCK]) == 0
    assert (target / "model.safetensors").is_file()


def test_prune_killed_after_writing_weights_leaves_only_a_hidden_temp_dir(killed, tiny2, capsys):
    d, target, _ = _check_killed(killed["prune-after-weights"])
    temps = [p for p in d.iterdir() if p.name.startswith(".o.tmp-")]
    assert len(temps) == 1 and (temps[0] / "model.safetensors").is_file()  # the half-written output stays hidden
    assert main(["prune", str(tiny2), "--out", str(target), *BLOCK]) == 0
    err = capsys.readouterr().err
    assert f"removed {temps[0]}" in err and not temps[0].exists()
    assert sorted(p.name for p in d.iterdir()) == ["o"]


def test_export_killed_after_writing_the_graph(killed, tiny2, capsys):
    d, target, _ = _check_killed(killed["export-after-graph"])
    temps = [p for p in d.iterdir() if p.name.startswith(".onnx.tmp-")]
    assert len(temps) == 1 and (temps[0] / "model.onnx").is_file()
    assert main(["export", "onnx", str(tiny2), "--out", str(target), "--no-cache"]) == 0
    assert (target / "model.onnx").is_file() and not temps[0].exists()
    assert sorted(p.name for p in d.iterdir()) == ["onnx"]
    capsys.readouterr()


def test_convert_killed_between_steps_resumes(killed, tiny2, capsys):
    d, target, _ = _check_killed(killed["convert-kill"])
    partial = d / ".build.partial"
    done = json.loads((partial / "steps.json").read_text())
    assert "prune" in done and "onnx" not in done
    assert main(_convert_args(tiny2, target)) == 0
    err = capsys.readouterr().err
    assert "resuming the interrupted run" in err and "[prune] reusing the finished step" in err
    assert (target / "manifest.json").is_file() and not partial.exists()


def test_convert_interrupted_says_it_will_resume(killed):
    d, target, err = _check_killed(killed["convert-sigint"], signal_rc=130)
    assert "run the same command again to resume" in err and str(d / ".build.partial") in err
    assert (d / ".build.partial" / "steps.json").is_file()
