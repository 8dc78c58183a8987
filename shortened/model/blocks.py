"""Removing decoder blocks from a loaded model and its config: the one model edit depth pruning needs."""

from __future__ import annotations

import torch

from shortened.model.families import blocks_of, family_for, get_path, set_path


def remove_blocks(model, indices) -> None:
    """Remove blocks (current numbering) in place, and fix the config and per-block indices to match."""
    fam = family_for(model.config)
    blocks = blocks_of(model)
    n = len(blocks)
    drop = set(indices)
    keep = [i for i in range(n) if i not in drop]
    set_path(model, fam.blocks, torch.nn.ModuleList([blocks[i] for i in keep]))
    for new_idx, block in enumerate(blocks_of(model)):
        for attr in fam.layer_idx_attrs:
            owner, _, name = attr.rpartition(".")
            target = get_path(block, owner) if owner else block
            if hasattr(target, name):
                setattr(target, name, new_idx)
    prune_config(model.config, keep, n)


def prune_config(cfg, keep: list[int], n: int) -> None:
    """Fix a config for the kept blocks (original numbering) of n: the layer count, per-block lists, thresholds."""
    fam = family_for(cfg)
    setattr(cfg, fam.num_layers_key, len(keep))
    for key in fam.per_layer_lists:
        value = getattr(cfg, key, None)
        if isinstance(value, (list, tuple)) and len(value) == n:
            setattr(cfg, key, [value[i] for i in keep])
    for key in fam.layer_count_thresholds:
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            setattr(cfg, key, sum(1 for i in keep if i < value))
