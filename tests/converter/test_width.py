"""Width pruning in every family: the projections come from the family row (Family.width), not from branches."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from shortened.converter.width import plan_width, width_prune_model
from shortened.errors import UsageError
from shortened.model import families
from shortened.model.cost import count_params_of_config
from shortened.model.families import blocks_of, family_for, geometry, get_path


def _as_linear(weight: torch.Tensor, conv1d: bool) -> torch.Tensor:
    return weight.t() if conv1d else weight  # a view [out, in]


def _zero_one_group_and_40_channels(model, rng) -> None:
    """In every block, zero one KV head group (q, k, v rows and o columns) and 40 MLP channels (the rows of every
    run of the input projections and the columns of the output one), wherever the family keeps them."""
    fam, g = family_for(model.config), geometry(model.config)
    w, hd, per = fam.width, g.head_dim, g.heads // g.kv_heads
    for block in blocks_of(model):
        if not w.heads_refusal:
            grp = int(rng.integers(g.kv_heads))
            q = torch.arange(grp * per * hd, (grp + 1) * per * hd)
            kv = torch.arange(grp * hd, (grp + 1) * hd)
            if len(w.qkv) == 1:  # packed [q | k | v]
                rows = {w.qkv[0]: torch.cat([q, g.heads * hd + kv, (g.heads + g.kv_heads) * hd + kv])}
            else:
                rows = dict(zip(w.qkv, (q, kv, kv)))
            for path, r in rows.items():
                _as_linear(get_path(block, path).weight, w.conv1d)[r] = 0
            _as_linear(get_path(block, w.o_proj).weight, w.conv1d)[:, q] = 0
        ch = torch.from_numpy(rng.choice(g.intermediate, 40, replace=False))
        for path in w.mlp_in:
            weight = _as_linear(get_path(block, path).weight, w.conv1d)
            for k in range(weight.shape[0] // g.intermediate):  # [gate | up] packed: two runs
                weight[ch + k * g.intermediate] = 0
        _as_linear(get_path(block, fam.mlp_down).weight, w.conv1d)[:, ch] = 0


def test_width_pruning_drops_exactly_the_least_magnitude_parts(family, tiny_config):
    """The zeroed parts have the least magnitude, so width pruning must drop exactly them: the narrow model
    computes the logits of the zeroed wide one."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    g = geometry(model.config)
    groups = g.kv_heads if family_for(model.config).width.heads_refusal else 1  # GPT-2 keeps its heads
    with torch.no_grad():
        _zero_one_group_and_40_channels(model, np.random.default_rng(0))
        ids = torch.tensor([[5, 9, 30, 41, 7, 100, 3, 60]])
        want = model(ids).logits
        width_prune_model(model, kv_groups=groups, intermediate_size=g.intermediate - 40)
        got = model(ids).logits
    narrow = geometry(model.config)
    assert (narrow.kv_heads, narrow.heads, narrow.intermediate) == (
        groups,
        groups * g.heads // g.kv_heads,
        g.intermediate - 40,
    )
    assert narrow.head_dim == g.head_dim
    assert count_params_of_config(model.config) == sum(p.numel() for p in model.parameters())  # config matches weights
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_family_without_width_layout_is_refused_in_one_line(monkeypatch, tiny_config):
    cfg = tiny_config("phi3")
    monkeypatch.setitem(families.FAMILIES, "phi3", dataclasses.replace(families.FAMILIES["phi3"], width=None))
    with pytest.raises(UsageError) as e:
        plan_width(cfg, 1000)
    assert str(e.value) == "width pruning supports llama, mistral, qwen2, qwen3, gemma2, gpt2; got model type 'phi3'"


def test_gpt2_cannot_drop_heads(tiny_config):
    cfg = tiny_config("gpt2")
    with pytest.raises(
        UsageError, match=r"^gpt2 cannot drop attention heads \(its head size is hidden_size / n_head\)"
    ):
        plan_width(cfg, count_params_of_config(cfg) - 10_000, kv_groups=2)
