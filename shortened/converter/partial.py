"""Partial retraining (`retrain --method partial`): only the kept blocks next to each removed run learn (and the final
norm and head with partial_head), every other weight frozen; optionally with an MSE term pulling those blocks'
outputs toward the original model's hidden state at the same depth.

Which blocks: from the pruned checkpoint's pruning.json (removed and kept blocks, original numbering). For a run
a..b, the kept blocks a-1 and b+1, in the pruned model's numbering.
"""

from __future__ import annotations

import json
from pathlib import Path

from shortened.converter.recovery import runs_of
from shortened.errors import UsageError
from shortened.model.families import blocks_of, family_for, get_path


def pruning_record(model_dir: str) -> dict:
    p = Path(model_dir) / "pruning.json"
    if not p.is_file():
        raise UsageError(f"--method partial needs {p} (a model pruned by `shortened prune`) to know the removed runs")
    return json.loads(p.read_text())


def neighbour_blocks(record: dict) -> list[tuple[int, int]]:
    """[(pruned index, original index)] of the kept blocks next to each removed run."""
    kept = record["kept_blocks"]
    out = set()
    for run in runs_of(record["removed_blocks"]):
        for o in (run[0] - 1, run[-1] + 1):
            if o in kept:
                out.add((kept.index(o), o))
    return sorted(out)


def freeze_for_partial(model, trained: list[int], head: bool = False) -> list[str]:
    """requires_grad only on the `trained` blocks (and the final norm and lm_head with head); returns their names."""
    for p in model.parameters():
        p.requires_grad_(False)
    mods = [blocks_of(model)[i] for i in trained]
    if head:
        mods += [get_path(model, family_for(model.config).final_norm), model.lm_head]
    for m in mods:
        for p in m.parameters():
            p.requires_grad_(True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise UsageError("--method partial found no block next to a removed run to train")
    return names


def hidden_mse(student_hidden, teacher_hidden, pairs, mask):
    """Mean over `pairs` [(student block, teacher block)] of ||s - t||^2 / ||t||^2 over real tokens, on the
    blocks' outputs (HF hidden_states[i + 1] is block i's output)."""
    keep = mask.bool()
    total = 0.0
    for s, t in pairs:
        a, b = student_hidden[s + 1][keep].float(), teacher_hidden[t + 1][keep].float()
        total = total + ((a - b) ** 2).sum() / (b**2).sum().clamp_min(1e-12)
    return total / len(pairs)


def partial_trainer_class():
    import torch
    from transformers import Trainer

    class PartialTrainer(Trainer):
        """The Trainer's loss (next-token cross-entropy) plus mse_weight * hidden_mse against a frozen teacher."""

        def __init__(self, *args, teacher, pairs, mse_weight, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
            self.pairs, self.mse_weight = pairs, mse_weight
            self.model_accepts_loss_kwargs = False
            self._parts = {"ce": [], "mse": []}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            x = {k: inputs[k] for k in ("input_ids", "attention_mask")}
            out = model(**x, labels=inputs["labels"], use_cache=False, output_hidden_states=True)
            with torch.no_grad():
                t = self.teacher(**x, use_cache=False, output_hidden_states=True).hidden_states
            mse = hidden_mse(out.hidden_states, t, self.pairs, x["attention_mask"])
            loss = out.loss + self.mse_weight * mse
            if model.training:
                self._parts["ce"].append(float(out.loss.detach()))
                self._parts["mse"].append(float(mse.detach()))
            return (loss, out) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if "loss" in logs and self._parts["ce"]:
                for k, v in self._parts.items():
                    logs[k] = round(sum(v) / len(v), 4)
                    v.clear()
            super().log(logs, *args, **kwargs)

    return PartialTrainer
