"""Width pruning, the baseline depth pruning is compared against (the paper's central comparison).

Every block keeps its place but gets narrower: fewer MLP channels (a smaller `intermediate_size`) and fewer
attention head groups (`num_key_value_heads` groups, each with its query heads). Which channels and groups stay
is decided per block by weight magnitude (sum of |w| over every weight that reads or writes the channel or the
group). The result is a standard checkpoint of the same architecture with smaller sizes, so plain
`AutoModelForCausalLM.from_pretrained` loads it, and its parameter count is matched to a target (usually the
depth-pruned candidate's count).

Sizing: the number of head groups kept is round(groups * r), r being the fraction of block parameters that must
remain; the MLP width then takes up the rest (the count is affine in intermediate_size, solved exactly).
GPT-2 derives its head size from hidden_size / n_head, so there only the MLP is narrowed. Where each family keeps
its projections (packed or not, Linear or Conv1D) is its row's `width` in model/families.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from shortened.errors import UsageError
from shortened.io import atomic_dir, check_output_dir, output_key, up_to_date, write_json
from shortened.model.checkpoint import save_checkpoint
from shortened.model.cost import count_params, count_params_of_config
from shortened.model.families import FAMILIES, Family, Geometry, blocks_of, geometry, get_path, set_path
from shortened.model.loading import Loaded, load_config, load_model

log = logging.getLogger(__name__)


def _family(config) -> Family:
    """The config's family, if its row says where width pruning finds the projections (`Family.width`)."""
    model_type = getattr(config, "model_type", None)
    fam = FAMILIES.get(model_type)
    if fam is None or fam.width is None:
        supported = [name for name, f in FAMILIES.items() if f.width is not None]
        raise UsageError(f"width pruning supports {', '.join(supported)}; got model type {model_type!r}")
    return fam


def _size_keys(fam: Family) -> tuple[str, ...]:
    """The config fields width pruning rewrites: the MLP width, and the head counts where heads can be dropped."""
    heads = () if fam.width.heads_refusal else (fam.head_dim_key, fam.kv_heads_key, fam.heads_key)
    return (*heads, fam.intermediate_key)


def _sized_config(config, kv_groups: int, inter: int):
    fam, g = _family(config), geometry(config)
    cfg = config.__class__.from_dict(config.to_dict())
    if not fam.width.heads_refusal:
        setattr(cfg, fam.head_dim_key, g.head_dim)  # explicit: hidden_size / heads no longer gives it
        setattr(cfg, fam.kv_heads_key, kv_groups)
        setattr(cfg, fam.heads_key, kv_groups * (g.heads // g.kv_heads))
    setattr(cfg, fam.intermediate_key, inter)
    return cfg


def plan_width(config, target_params: int, kv_groups: int | None = None, multiple_of: int = 1) -> dict:
    """Choose (kv_groups, intermediate_size) so the narrowed model has about `target_params` parameters."""
    fam = _family(config)
    if multiple_of < 1:
        raise UsageError(f"multiple_of must be at least 1, got {multiple_of}")
    g = geometry(config)
    full = count_params_of_config(config)
    if target_params >= full:
        raise UsageError(f"target of {target_params:,} parameters is not below the model's {full:,}; nothing to prune")
    if fam.width.heads_refusal:
        if kv_groups not in (None, g.kv_heads):
            raise UsageError(
                f"{config.model_type} cannot drop attention heads ({fam.width.heads_refusal}); omit kv_groups"
            )
        choices = [g.kv_heads]
    elif kv_groups is not None:
        if not 1 <= kv_groups <= g.kv_heads:
            raise UsageError(f"kv_groups must be between 1 and {g.kv_heads} for this model, got {kv_groups}")
        choices = [kv_groups]
    else:
        p11 = count_params_of_config(_sized_config(config, 1, 1))
        per_group = count_params_of_config(_sized_config(config, 2, 1)) - p11  # over all blocks
        per_channel = count_params_of_config(_sized_config(config, 1, 2)) - p11
        fixed = p11 - per_group - per_channel  # embeddings, head, norms: what width pruning does not touch
        r = max(0.0, (target_params - fixed) / (full - fixed))
        first = min(g.kv_heads, max(1, round(g.kv_heads * r)))
        choices = sorted(range(1, g.kv_heads + 1), key=lambda n: (abs(n - first), n))  # nearest feasible wins
    for groups in choices:
        p1 = count_params_of_config(_sized_config(config, groups, 1))
        slope = count_params_of_config(_sized_config(config, groups, 2)) - p1  # per MLP channel, all blocks
        inter = int(round((target_params - (p1 - slope)) / slope / multiple_of) * multiple_of)
        if 1 <= inter <= g.intermediate:
            break
    else:
        raise UsageError(
            f"{target_params:,} parameters cannot be reached by narrowing heads ({choices}) and the MLP "
            f"(1..{g.intermediate} channels); pass another target or kv_groups"
        )
    cfg = _sized_config(config, groups, inter)
    return {"kv_groups": groups, "intermediate_size": inter, "params": p1 + slope * (inter - 1), "config": cfg}


# ---------------------------------------------------------------------------------------------
# Slicing the weights


def _keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k).indices.sort().values


def _param(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t.contiguous(), requires_grad=False)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    lin.weight = _param(weight)
    if bias is not None:
        lin.bias = _param(bias)
    return lin


def _l1_rows(w: torch.Tensor) -> torch.Tensor:
    return w.detach().float().abs().sum(1)


def _head_rows(group_idx: torch.Tensor, per_group: int, head_dim: int) -> torch.Tensor:
    """Row indices of the heads belonging to the kept groups (each group = `per_group` consecutive heads)."""
    heads = (group_idx[:, None] * per_group + torch.arange(per_group)[None, :]).flatten()
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()


def _keep_outputs(block, path: str, idx: torch.Tensor, conv1d: bool) -> None:
    """Keep the output features `idx` of the projection at `path` (relative to the block)."""
    m = get_path(block, path)
    if conv1d:  # weight [in, out]
        m.weight, m.bias, m.nf = _param(m.weight[:, idx]), _param(m.bias[idx]), len(idx)
    else:
        set_path(block, path, _linear(m.weight[idx], m.bias[idx] if m.bias is not None else None))


def _keep_inputs(block, path: str, idx: torch.Tensor, conv1d: bool) -> None:
    """Keep the input features `idx` of the projection at `path` (relative to the block)."""
    m = get_path(block, path)
    if conv1d:
        m.weight = _param(m.weight[idx])
    else:
        set_path(block, path, _linear(m.weight[:, idx], m.bias))


def _prune_mlp(block, fam: Family, width: int, inter: int) -> None:
    """Keep the `inter` of `width` MLP channels with the most magnitude. An input projection's rows hold one run of
    `width` channels, or packed runs ([gate | up]); the output projection (`mlp_down`) reads them as columns."""
    conv1d = fam.width.conv1d
    ins = [get_path(block, p).weight for p in fam.width.mlp_in]
    ins = [w.t() if conv1d else w for w in ins]  # [out, in]: channels as rows
    out = get_path(block, fam.mlp_down).weight
    runs = [w[k * width : (k + 1) * width] for w in ins for k in range(w.shape[0] // width)]
    score = sum(_l1_rows(r) for r in runs) + _l1_rows(out if conv1d else out.t())
    idx = _keep_top(score, inter)
    for path, w in zip(fam.width.mlp_in, ins):
        _keep_outputs(block, path, torch.cat([idx + k * width for k in range(w.shape[0] // width)]), conv1d)
    _keep_inputs(block, fam.mlp_down, idx, conv1d)


def _prune_attention(block, fam: Family, g: Geometry, groups: int) -> None:
    """Keep the `groups` KV head groups (each with its query heads) with the most magnitude."""
    w = fam.width
    hd, kv, per = g.head_dim, g.kv_heads, g.heads // g.kv_heads
    qkv = [get_path(block, p).weight for p in w.qkv]
    q, k, v = qkv[0].split([g.heads * hd, kv * hd, kv * hd]) if len(qkv) == 1 else qkv  # packed [q | k | v]
    o = get_path(block, w.o_proj).weight
    score = (
        _l1_rows(q).view(kv, -1).sum(1)
        + _l1_rows(k).view(kv, -1).sum(1)
        + _l1_rows(v).view(kv, -1).sum(1)
        + _l1_rows(o.t()).view(kv, -1).sum(1)
    )
    keep = _keep_top(score, groups)
    q_rows, kv_rows = _head_rows(keep, per, hd), _head_rows(keep, 1, hd)
    if len(w.qkv) == 1:
        rows = torch.cat([q_rows, g.heads * hd + kv_rows, (g.heads + kv) * hd + kv_rows])
        _keep_outputs(block, w.qkv[0], rows, w.conv1d)
    else:
        for path, rows in zip(w.qkv, (q_rows, kv_rows, kv_rows)):
            _keep_outputs(block, path, rows, w.conv1d)
    _keep_inputs(block, w.o_proj, q_rows, w.conv1d)
    attn = get_path(block, w.o_proj.rpartition(".")[0])
    for name in ("num_heads", "num_key_value_heads"):  # attributes some versions keep; harmless elsewhere
        if hasattr(attn, name):
            setattr(attn, name, groups * per if name == "num_heads" else groups)


@torch.no_grad()
def width_prune_model(model, kv_groups: int, intermediate_size: int) -> None:
    """Narrow every block of a loaded model in place and update its config to match."""
    cfg = model.config
    fam, g = _family(cfg), geometry(cfg)
    for block in blocks_of(model):
        if kv_groups != g.kv_heads and not fam.width.heads_refusal:
            _prune_attention(block, fam, g, kv_groups)
        if intermediate_size != g.intermediate:
            _prune_mlp(block, fam, g.intermediate, intermediate_size)
    new = _sized_config(cfg, kv_groups, intermediate_size)
    for key in _size_keys(fam):
        setattr(cfg, key, getattr(new, key))


def target_params_of(target) -> int:
    """An int, or a checkpoint directory whose parameter count is the target."""
    if isinstance(target, int):
        return target

    return count_params_of_config(load_config(str(target)))


def width_prune(
    model,
    target_params,
    out: str | Path,
    kv_groups: int | None = None,
    multiple_of: int = 1,
    load=None,
    force: bool = False,
) -> dict:
    """Save a width-pruned copy of `model` with about `target_params` parameters (an int or a checkpoint dir).

    Returns {"out", "params", "target_params", "original_params", "kv_groups", "intermediate_size"}.
    """

    src = model.source if isinstance(model, Loaded) else str(model)
    settings = dict(model=src, target_params=target_params, kv_groups=kv_groups, multiple_of=multiple_of, load=load)
    inputs = {"model": src, "parameter-count model": target_params if isinstance(target_params, (str, Path)) else None}
    key = None if isinstance(model, Loaded) else output_key(inputs, settings)  # a model in memory may differ
    if (done := up_to_date(out, key, force)) is not None:
        return done
    check_output_dir(out, force, inputs)
    target = target_params_of(target_params)
    config = model.model.config if isinstance(model, Loaded) else load_config(src)
    g = geometry(config)  # before pruning: a Loaded model's config is narrowed in place
    plan = plan_width(config, target, kv_groups, multiple_of)
    loaded = model if isinstance(model, Loaded) else load_model(src, load, tokenizer="optional")
    original = count_params(loaded.model)
    width_prune_model(loaded.model, plan["kv_groups"], plan["intermediate_size"])
    params = count_params(loaded.model)
    rec = {
        "source_model": src,
        "method": "width (L1 weight magnitude: MLP channels and attention head groups, per block)",
        "original_params": original,
        "target_params": target,
        "params": params,
        "kv_groups": plan["kv_groups"],
        "original_kv_groups": g.kv_heads,
        "intermediate_size": plan["intermediate_size"],
        "original_intermediate_size": g.intermediate,
    }
    log.info("width pruning %s: %s", src, rec)
    with atomic_dir(out, force, inputs, key=key, result={"out": str(out), **rec}) as tmp:
        save_checkpoint(loaded.model, loaded.tokenizer, tmp)
        write_json(tmp / "width_pruning.json", rec)
    return {"out": str(out), **rec}
