"""The decoder of LLaMA-like families written for onnxruntime: what `export_onnx(optimize=True)` traces.

Per layer the graph is: RMSNorm -> one packed QKV MatMul -> GroupQueryAttention (RoPE at the given positions,
attention, appending to the KV cache) -> o_proj -> residual -> RMSNorm -> MLP -> residual, with the cos/sin tables
stored once as constants and the padding bias computed once per call: the layout of onnxruntime-genai's builder.
onnxscript's fusions then turn the RMSNorms into (Skip)SimplifiedLayerNormalization. Inputs, outputs and their names
are those of the generic export, so every runner, parity check and onnxruntime-genai config works on both.

The modules are Hugging Face's own (norms, MLP, projections, embeddings, head); only the attention's plumbing is
rewritten. `unsupported_reason` says why a model cannot take this path (the exporter then uses the generic one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shortened.exporters import ort_ops  # noqa: F401  (registers torch.ops.shortened.*)
from shortened.model.families import family_for, geometry

STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # the inverse frequencies do not depend on the length


def unsupported_reason(model) -> str | None:
    """None when `FusedCausalLM` reproduces this model; otherwise why not, in a few words."""
    config = model.config
    if not family_for(config).llama_like_layer:
        return f"{config.model_type} layers are not LLaMA-like"
    inner = getattr(model, "model", None)
    rope = getattr(inner, "rotary_emb", None)
    if rope is None or not hasattr(rope, "inv_freq"):
        return "no rotary embedding module"
    if getattr(rope, "rope_type", "default") not in STATIC_ROPE:
        return f"rope type {rope.rope_type!r} changes with the sequence length"
    g = geometry(config)
    if rope.inv_freq.numel() * 2 != g.head_dim:
        return "partial rotary embedding"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        return f"sliding-window attention (window {window})"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return "layers other than full attention"
    if getattr(config, "attn_logit_softcapping", None):
        return "attention logit soft-capping"
    for layer in inner.layers:
        a = layer.self_attn
        if not all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")):
            return "attention without separate q/k/v/o projections"
        if not all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm", "mlp")):
            return "a decoder layer of another shape"
        if (a.q_proj.bias is None) != (a.k_proj.bias is None) or (a.k_proj.bias is None) != (a.v_proj.bias is None):
            return "bias on some of q/k/v only"
    if g.heads % g.kv_heads:
        return "query heads not a multiple of the KV heads"
    return None


class FusedCausalLM(torch.nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits float32, *present), like the generic
    export's wrapper. Shares the model's parameters; adds packed QKV weights and cos/sin tables as buffers."""

    def __init__(self, model):
        super().__init__()
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"cannot fuse this model: {reason}")
        self.model = model
        config = model.config
        g = geometry(config)
        self.heads, self.kv_heads, self.head_dim = g.heads, g.kv_heads, g.head_dim
        inner = model.model
        rope = inner.rotary_emb
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, rope.inv_freq.float().cpu())
        scaling = float(getattr(rope, "attention_scaling", 1.0))
        self.register_buffer("cos", (freqs.cos() * scaling).to(model.dtype), persistent=False)
        self.register_buffer("sin", (freqs.sin() * scaling).to(model.dtype), persistent=False)
        with torch.no_grad():
            for i, layer in enumerate(inner.layers):
                a = layer.self_attn
                self.register_buffer(f"qkv_weight_{i}", torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
                bias = None
                if a.q_proj.bias is not None:
                    bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
                self.register_buffer(f"qkv_bias_{i}", bias)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        inner = self.model.model
        h = inner.embed_tokens(input_ids)
        b, s = input_ids.shape
        t = attention_mask.shape[1]
        dtype = h.dtype
        # padding as an additive bias [b, 1, s, t]; causality is the kernel's
        bias = ((1 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min).expand(b, 1, s, t)
        seqlens_k = torch.full((b,), t - 1, dtype=torch.int32)
        total = torch.full((), t, dtype=torch.int32)
        query_seqlens = torch.full((b,), s, dtype=torch.int32)  # every row's s tokens are real (no right padding)
        dq, dkv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        presents = []
        for i, layer in enumerate(inner.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            qkv = F.linear(x, getattr(self, f"qkv_weight_{i}"), getattr(self, f"qkv_bias_{i}"))
            if hasattr(a, "q_norm"):  # Qwen3: RMSNorm per head before RoPE
                q, k, v = qkv.split([dq, dkv, dkv], -1)
                q = a.q_norm(q.view(b, s, self.heads, self.head_dim)).reshape(b, s, dq)
                k = a.k_norm(k.view(b, s, self.kv_heads, self.head_dim)).reshape(b, s, dkv)
                qkv = torch.cat([q, k, v], -1)
            o, pk, pv = torch.ops.shortened.gqa(
                qkv, past[2 * i], past[2 * i + 1], seqlens_k, total, self.cos, self.sin, position_ids, query_seqlens,
                bias, self.heads, self.kv_heads, a.scaling,
            )  # fmt: skip
            presents += [pk, pv]
            h = h + a.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = self.model.lm_head(inner.norm(h)).float()
        return (logits, *presents)


__all__ = ["FusedCausalLM", "unsupported_reason"]
