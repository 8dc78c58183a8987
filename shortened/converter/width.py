"""Width pruning, the baseline depth pruning is compared against (the paper's central comparison).

Every block keeps its place but gets narrower: fewer MLP channels (a smaller `intermediate_size`) and fewer
attention head groups (`num_key_value_heads` groups, each with its query heads). Which channels and groups stay
is decided per block by weight magnitude (sum of |w| over every weight that reads or writes the channel or the
group). The result is a standard checkpoint of the same architecture with smaller sizes, so plain
`AutoModelForCausalLM.from_pretrained` loads it, and its parameter count is matched to a target (usually the
depth-pruned candidate's count).

Sizing: the number of head groups kept is round(groups * r), r being the fraction of block parameters that must
remain; the MLP width then takes up the rest (the count is affine in intermediate_size, solved exactly).
GPT-2 derives its head size from hidden_size / n_head, so there only the MLP is narrowed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from shortened.errors import UsageError
from shortened.model.cost import count_params, count_params_of_config
from shortened.model.families import blocks_of

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2")


def _dims(config) -> dict:
    if config.model_type == "gpt2":
        h = config.n_embd
        return dict(hidden=h, inter=config.n_inner or 4 * h, heads=config.n_head, kv=config.n_head, head_dim=h)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return dict(hidden=config.hidden_size, inter=config.intermediate_size, heads=heads, kv=kv, head_dim=head_dim)


def _sized_config(config, kv_groups: int, inter: int):
    cfg = config.__class__.from_dict(config.to_dict())
    if cfg.model_type == "gpt2":
        cfg.n_inner = inter
        return cfg
    d = _dims(config)
    cfg.head_dim = d["head_dim"]  # explicit: hidden_size / heads no longer gives it
    cfg.num_key_value_heads = kv_groups
    cfg.num_attention_heads = kv_groups * (d["heads"] // d["kv"])
    cfg.intermediate_size = inter
    return cfg


def plan_width(config, target_params: int, kv_groups: int | None = None, multiple_of: int = 1) -> dict:
    """Choose (kv_groups, intermediate_size) so the narrowed model has about `target_params` parameters."""
    if config.model_type not in SUPPORTED:
        raise UsageError(f"width pruning supports {', '.join(SUPPORTED)}; got model type {config.model_type!r}")
    if multiple_of < 1:
        raise UsageError(f"multiple_of must be at least 1, got {multiple_of}")
    d = _dims(config)
    full = count_params_of_config(config)
    if target_params >= full:
        raise UsageError(f"target of {target_params:,} parameters is not below the model's {full:,}; nothing to prune")
    if config.model_type == "gpt2":
        if kv_groups not in (None, d["kv"]):
            raise UsageError("gpt2 cannot drop attention heads (its head size is hidden_size / n_head); omit kv_groups")
        choices = [d["kv"]]
    elif kv_groups is not None:
        if not 1 <= kv_groups <= d["kv"]:
            raise UsageError(f"kv_groups must be between 1 and {d['kv']} for this model, got {kv_groups}")
        choices = [kv_groups]
    else:
        p11 = count_params_of_config(_sized_config(config, 1, 1))
        per_group = count_params_of_config(_sized_config(config, 2, 1)) - p11  # over all blocks
        per_channel = count_params_of_config(_sized_config(config, 1, 2)) - p11
        fixed = p11 - per_group - per_channel  # embeddings, head, norms: what width pruning does not touch
        r = max(0.0, (target_params - fixed) / (full - fixed))
        first = min(d["kv"], max(1, round(d["kv"] * r)))
        choices = sorted(range(1, d["kv"] + 1), key=lambda g: (abs(g - first), g))  # nearest feasible wins
    for groups in choices:
        p1 = count_params_of_config(_sized_config(config, groups, 1))
        slope = count_params_of_config(_sized_config(config, groups, 2)) - p1  # per MLP channel, all blocks
        inter = int(round((target_params - (p1 - slope)) / slope / multiple_of) * multiple_of)
        if 1 <= inter <= d["inter"]:
            break
    else:
        raise UsageError(
            f"{target_params:,} parameters cannot be reached by narrowing heads ({choices}) and the MLP "
            f"(1..{d['inter']} channels); pass another target or kv_groups"
        )
    cfg = _sized_config(config, groups, inter)
    return {"kv_groups": groups, "intermediate_size": inter, "params": p1 + slope * (inter - 1), "config": cfg}


# ---------------------------------------------------------------------------------------------
# Slicing the weights


def _keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k).indices.sort().values


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    lin.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        lin.bias = torch.nn.Parameter(bias.contiguous(), requires_grad=False)
    return lin


def _rows(lin: torch.nn.Linear, idx: torch.Tensor) -> torch.nn.Linear:
    return _linear(lin.weight[idx], lin.bias[idx] if lin.bias is not None else None)


def _cols(lin: torch.nn.Linear, idx: torch.Tensor) -> torch.nn.Linear:
    return _linear(lin.weight[:, idx], lin.bias)


def _l1_rows(w: torch.Tensor) -> torch.Tensor:
    return w.detach().float().abs().sum(1)


def _head_rows(group_idx: torch.Tensor, per_group: int, head_dim: int) -> torch.Tensor:
    """Row indices of the heads belonging to the kept groups (each group = `per_group` consecutive heads)."""
    heads = (group_idx[:, None] * per_group + torch.arange(per_group)[None, :]).flatten()
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()


def _prune_mlp(mlp, model_type: str, inter: int) -> None:
    if model_type == "gpt2":  # Conv1D: weight [in, out]
        fc, proj = mlp.c_fc, mlp.c_proj
        score = _l1_rows(fc.weight.t()) + _l1_rows(proj.weight)
        idx = _keep_top(score, inter)
        fc.weight = torch.nn.Parameter(fc.weight[:, idx].contiguous(), requires_grad=False)
        fc.bias = torch.nn.Parameter(fc.bias[idx].contiguous(), requires_grad=False)
        fc.nf = inter
        proj.weight = torch.nn.Parameter(proj.weight[idx].contiguous(), requires_grad=False)
        return
    if model_type == "phi3":  # gate_up_proj rows: [gate (I) | up (I)]
        n = mlp.down_proj.weight.shape[1]
        w = mlp.gate_up_proj.weight
        score = _l1_rows(w[:n]) + _l1_rows(w[n:]) + _l1_rows(mlp.down_proj.weight.t())
        idx = _keep_top(score, inter)
        mlp.gate_up_proj = _rows(mlp.gate_up_proj, torch.cat([idx, idx + n]))
        mlp.down_proj = _cols(mlp.down_proj, idx)
        return
    score = _l1_rows(mlp.gate_proj.weight) + _l1_rows(mlp.up_proj.weight) + _l1_rows(mlp.down_proj.weight.t())
    idx = _keep_top(score, inter)
    mlp.gate_proj = _rows(mlp.gate_proj, idx)
    mlp.up_proj = _rows(mlp.up_proj, idx)
    mlp.down_proj = _cols(mlp.down_proj, idx)


def _prune_attention(attn, model_type: str, d: dict, groups: int) -> None:
    hd, kv, per = d["head_dim"], d["kv"], d["heads"] // d["kv"]
    if model_type == "phi3":  # qkv_proj rows: [q (heads*hd) | k (kv*hd) | v (kv*hd)]
        w = attn.qkv_proj.weight
        q, k, v = w[: d["heads"] * hd], w[d["heads"] * hd : (d["heads"] + kv) * hd], w[(d["heads"] + kv) * hd :]
    else:
        q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
    o = attn.o_proj.weight
    score = (
        _l1_rows(q).view(kv, -1).sum(1)
        + _l1_rows(k).view(kv, -1).sum(1)
        + _l1_rows(v).view(kv, -1).sum(1)
        + _l1_rows(o.t()).view(kv, -1).sum(1)
    )
    keep = _keep_top(score, groups)
    q_rows, kv_rows = _head_rows(keep, per, hd), _head_rows(keep, 1, hd)
    if model_type == "phi3":
        rows = torch.cat([q_rows, d["heads"] * hd + kv_rows, (d["heads"] + kv) * hd + kv_rows])
        attn.qkv_proj = _rows(attn.qkv_proj, rows)
    else:
        attn.q_proj, attn.k_proj, attn.v_proj = (
            _rows(attn.q_proj, q_rows),
            _rows(attn.k_proj, kv_rows),
            _rows(attn.v_proj, kv_rows),
        )
    attn.o_proj = _cols(attn.o_proj, q_rows)
    for name in ("num_heads", "num_key_value_heads"):  # attributes some versions keep; harmless elsewhere
        if hasattr(attn, name):
            setattr(attn, name, groups * per if name == "num_heads" else groups)


@torch.no_grad()
def width_prune_model(model, kv_groups: int, intermediate_size: int) -> None:
    """Narrow every block of a loaded model in place and update its config to match."""
    cfg = model.config
    d = _dims(cfg)
    for block in blocks_of(model):
        if cfg.model_type == "gpt2":
            _prune_mlp(block.mlp, "gpt2", intermediate_size)
            continue
        if kv_groups != d["kv"]:
            _prune_attention(block.self_attn, cfg.model_type, d, kv_groups)
        if intermediate_size != d["inter"]:
            _prune_mlp(block.mlp, cfg.model_type, intermediate_size)
    new = _sized_config(cfg, kv_groups, intermediate_size)
    for key in ("head_dim", "num_key_value_heads", "num_attention_heads", "intermediate_size", "n_inner"):
        if hasattr(new, key) and key in new.to_dict():
            setattr(cfg, key, getattr(new, key))


def target_params_of(target) -> int:
    """An int, or a checkpoint directory whose parameter count is the target."""
    if isinstance(target, int):
        return target
    from shortened.model.loading import load_config

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
    from shortened.io import atomic_dir, check_output_dir, output_key, up_to_date, write_json
    from shortened.model.checkpoint import save_checkpoint
    from shortened.model.loading import Loaded, load_config, load_model

    src = model.source if isinstance(model, Loaded) else str(model)
    settings = dict(model=src, target_params=target_params, kv_groups=kv_groups, multiple_of=multiple_of, load=load)
    inputs = {"model": src, "parameter-count model": target_params if isinstance(target_params, (str, Path)) else None}
    key = None if isinstance(model, Loaded) else output_key(inputs, settings)  # a model in memory may differ
    if (done := up_to_date(out, key, force)) is not None:
        return done
    check_output_dir(out, force, inputs)
    target = target_params_of(target_params)
    config = model.model.config if isinstance(model, Loaded) else load_config(src)
    plan = plan_width(config, target, kv_groups, multiple_of)
    loaded = model if isinstance(model, Loaded) else load_model(src, load, tokenizer="optional")
    original = count_params(loaded.model)
    width_prune_model(loaded.model, plan["kv_groups"], plan["intermediate_size"])
    params = count_params(loaded.model)
    d = _dims(config)
    rec = {
        "source_model": src,
        "method": "width (L1 weight magnitude: MLP channels and attention head groups, per block)",
        "original_params": original,
        "target_params": target,
        "params": params,
        "kv_groups": plan["kv_groups"],
        "original_kv_groups": d["kv"],
        "intermediate_size": plan["intermediate_size"],
        "original_intermediate_size": d["inter"],
    }
    log.info("width pruning %s: %s", src, rec)
    with atomic_dir(out, force, inputs, key=key, result={"out": str(out), **rec}) as tmp:
        save_checkpoint(loaded.model, loaded.tokenizer, tmp)
        write_json(tmp / "width_pruning.json", rec)
    return {"out": str(out), **rec}
