"""retrain --method partial: only the blocks next to each removed run change, with an optional hidden-state MSE."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from shortened.converter.partial import neighbour_blocks
from shortened.converter.retrain import retrain
from shortened.converter.steps import prune

FAST = dict(seq_len=32, batch_size=4, eval_steps=2, logging_steps=1, max_val_examples=4, progress=False)


def test_neighbour_blocks():
    rec = {"removed_blocks": [2, 3, 7], "kept_blocks": [0, 1, 4, 5, 6, 8, 9]}
    assert neighbour_blocks(rec) == [(1, 1), (2, 4), (4, 6), (5, 8)]


def test_partial_trains_only_the_neighbours(tiny_models, tmp_path, corpus):
    text = tmp_path / "train.txt"
    text.write_text(corpus.read_text()[:4000] if corpus.is_file() else "the quick brown fox jumps. " * 150)
    pruned = tmp_path / "pruned"
    prune(str(tiny_models["llama"]), pruned, blocks=[2, 3], protect=[0], progress=False)  # kept 0 1 4 5
    out = tmp_path / "partial"
    rec = retrain(str(pruned), out, method="partial", data=str(text), max_steps=2, lr=3e-3, partial_mse=1.0,
                  **FAST)  # fmt: skip
    assert rec["trained_blocks"] == [{"pruned": 1, "original": 1}, {"pruned": 2, "original": 4}]
    assert rec["teacher"] == str(tiny_models["llama"]) and "mse" in rec["losses"]["train"][0]
    before, after = load_file(str(pruned / "model.safetensors")), load_file(str(out / "model.safetensors"))
    layers = [k for k in before if k.startswith("model.layers.")]
    changed = {k.split(".")[2] for k in layers if not torch.equal(before[k], after[k])}
    assert changed == {"1", "2"}
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("model.layers."))
    assert json.loads((out / "retraining.json").read_text())["hyperparameters"]["partial_mse"] == 1.0
