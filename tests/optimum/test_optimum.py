"""Tests for the Optimum environment (.venv-optimum: transformers 4.57 + optimum-onnx; `make test` runs them there).

- our exporter works under transformers 4.57, and Optimum's ORTModelForCausalLM runs its output unchanged,
  generating PyTorch's greedy tokens (a left-padded batch included);
- Optimum's own exporter (`--exporter optimum`) agrees with ours on the logits;
- no RoPE drift: a checkpoint saved by transformers 5.x (the main .venv) gives the same logits here under 4.57.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("optimum.onnxruntime", reason="needs optimum-onnx (the .venv-optimum environment)")

import transformers  # noqa: E402

from shortened.exporters.onnx import ONNX_FILE, export_onnx  # noqa: E402
from shortened.runtime.base import position_ids_from_mask  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MAIN_PY = Path(os.environ.get("SHORTENED_MAIN_PYTHON", REPO / ".venv" / "bin" / "python"))
pytestmark = pytest.mark.skipif(
    not transformers.__version__.startswith("4."), reason="the Optimum environment runs transformers 4.57"
)


@pytest.fixture(scope="module")
def ours(tiny_models, tmp_path_factory):
    """Our export of the tiny llama, made here under transformers 4.57."""
    out = tmp_path_factory.mktemp("ours") / "llama"
    export_onnx(str(tiny_models["llama"]), out, progress=False)
    return tiny_models["llama"], out


def test_ort_model_for_causal_lm_generates_pytorch_tokens(ours):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoModelForCausalLM

    src, out = ours
    ort_model = ORTModelForCausalLM.from_pretrained(out, provider="CPUExecutionProvider")
    assert ort_model.can_use_cache and "position_ids" in ort_model.input_names
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    ids = torch.tensor([[0, 0, 0, 7, 9, 11, 13], [5, 6, 7, 8, 9, 10, 11]])
    mask = (torch.arange(7)[None] >= torch.tensor([[3], [0]])).long()
    kw = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = ref.generate(ids, **kw)
    got = ort_model.generate(ids, **kw)
    assert got.tolist() == expected.tolist()


def test_optimum_exporter_agrees_with_ours(ours, tmp_path):
    import onnxruntime as ort

    src, out = ours
    theirs = tmp_path / "optimum"
    summary = export_onnx(str(src), theirs, exporter="optimum", progress=False)
    assert summary["exporter"] == "optimum" and (theirs / ONNX_FILE).is_file()
    assert (theirs / "genai_config.json").is_file() and (theirs / "export.json").is_file()
    sessions = [ort.InferenceSession(str(d / ONNX_FILE), providers=["CPUExecutionProvider"]) for d in (out, theirs)]
    names = [{i.name for i in s.get_inputs()} for s in sessions]
    assert names[0] == names[1]  # same names: the layouts are the same convention
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 250, (2, 9))
    mask = np.ones((2, 9), np.int64)
    mask[1, :4] = 0
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask, 9)}
    kv = sessions[0].get_inputs()[3].shape
    feed.update({n: np.zeros((2, kv[1], 0, kv[3]), np.float32) for n in names[0] if n.startswith("past_")})
    a, b = (s.run(["logits"], feed)[0] for s in sessions)
    assert float(np.abs(a - b)[mask.astype(bool)].max()) < 1e-4


# ---------------------------------------------------------------------------------------------
# RoPE drift between transformers 5.x (saves rope_parameters) and 4.57 (reads rope_theta)

_SAVE_WITH_5X = textwrap.dedent(
    """
    import sys, numpy as np, torch
    sys.path.insert(0, sys.argv[3])
    from conftest import make_tiny
    import transformers
    assert transformers.__version__.startswith("5."), transformers.__version__
    from transformers import AutoModelForCausalLM
    from shortened.model.checkpoint import save_checkpoint
    path = make_tiny("llama", __import__("pathlib").Path(sys.argv[1]))
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    model = AutoModelForCausalLM.from_config(model.config)  # rebuild the rotary tables with the new base
    model.load_state_dict(AutoModelForCausalLM.from_pretrained(path).state_dict())
    model.eval()
    save_checkpoint(model, None, path)
    ids = torch.arange(3, 3 + 40)[None]
    with torch.no_grad():
        np.save(sys.argv[2], model(ids).logits.numpy())
    """
)


@pytest.fixture(scope="module")
def saved_by_5x(tmp_path_factory):
    if not MAIN_PY.is_file():
        pytest.skip(f"no main environment at {MAIN_PY} (transformers 5.x) to save the checkpoint with")
    root = tmp_path_factory.mktemp("drift")
    script = root / "save.py"
    script.write_text(_SAVE_WITH_5X)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [str(MAIN_PY), str(script), str(root / "ckpt"), str(root / "logits.npy"), str(REPO / "tests")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return root / "ckpt", np.load(root / "logits.npy")


def _logits_here(path) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(torch.arange(3, 3 + 40)[None]).logits.numpy()


def test_checkpoint_saved_by_5x_means_the_same_under_457(saved_by_5x):
    from transformers import AutoConfig

    path, logits_5x = saved_by_5x
    assert AutoConfig.from_pretrained(path).rope_theta == 500000.0
    np.testing.assert_allclose(_logits_here(path), logits_5x, atol=1e-5, rtol=0)


def test_the_drift_check_can_fail(saved_by_5x, tmp_path):
    """Without the legacy rope_theta (what transformers 5.x alone writes), 4.57 falls back to 10000: caught."""
    import shutil

    path, logits_5x = saved_by_5x
    bare = tmp_path / "bare"
    shutil.copytree(path, bare)
    cfg = json.loads((bare / "config.json").read_text())
    cfg.pop("rope_theta", None)
    (bare / "config.json").write_text(json.dumps(cfg))
    assert np.abs(_logits_here(bare) - logits_5x).max() > 1e-3
