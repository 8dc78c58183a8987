"""What a model costs, from its config alone: parameters and forward FLOPs per token, and the ideal speedup
of a pruned model over the original."""

from __future__ import annotations

import torch

from shortened.model.families import geometry
from shortened.model.loading import load_config


def flops_per_token(config, context: int = 0) -> dict:
    """Forward FLOPs of one token, from the config. With h hidden, nh query heads, nkv key/value heads, hd head
    size, I MLP width, V vocabulary, L blocks, and c the context length the token attends to:

        attention projections per block  2 * h * hd * (2*nh + 2*nkv)     (Q and O: nh heads; K and V: nkv heads)
        MLP per block                    2 * k * h * I                    (k = 3 gated: gate, up, down; else 2)
        attention scores per block       2 * 2 * nh * hd * c              (Q.K^T and P.V; only when context > 0)
        head                             2 * h * V
        total                            L * (projections + MLP + scores) + head

    Embedding lookups, norms, activations, rotary and biases are left out (a few per cent at most).
    """
    g = geometry(config)
    h, hd = g.hidden, g.head_dim
    proj = 2 * h * hd * (2 * g.heads + 2 * g.kv_heads)
    mlp = 2 * (3 if g.gated_mlp else 2) * h * g.intermediate
    scores = 2 * 2 * g.heads * hd * int(context)
    block = proj + mlp + scores
    head = 2 * h * g.vocab
    return {"attention_projections": proj, "mlp": mlp, "attention_scores": scores, "block": block,
            "blocks": g.layers * block, "head": head, "total": g.layers * block + head,
            "layers": g.layers, "context": int(context)}  # fmt: skip


def _config(model):
    if hasattr(model, "model_type"):
        return model

    return load_config(str(model))


def ideal_speedup(original, candidate, context: int = 0) -> float:
    """FLOPs(original) / FLOPs(candidate) per token; configs, or model directories to read them from."""
    return flops_per_token(_config(original), context)["total"] / flops_per_token(_config(candidate), context)["total"]


def count_params(model) -> int:
    """Parameters of a model, tied weights counted once (what `sum(p.numel() for p in model.parameters())` says)."""
    return sum(p.numel() for p in model.parameters())


def count_params_of_config(config) -> int:
    """Parameter count of the model a config describes, without allocating its weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return count_params(model)
