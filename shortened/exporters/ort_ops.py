"""Two onnxruntime contrib ops as PyTorch custom ops, so the dynamo exporter writes them as single ONNX nodes.

    shortened::rotary -> com.microsoft RotaryEmbedding   (rotate-half RoPE from cos/sin tables, per-token positions)
    shortened::gqa    -> com.microsoft GroupQueryAttention (grouped-query attention that appends to the KV cache)

Each op has a plain PyTorch implementation with the kernel's semantics (used when tracing and in tests), a fake
(shape) implementation for torch.export, and a translation to the onnxruntime node. The graphs that use them run on
onnxruntime only (CPU and CUDA providers), not on other ONNX runtimes or TensorRT.

GroupQueryAttention gets the padding as an additive `attention_bias` [batch, 1, seq, total] and every row's
`seqlens_k` is total - 1, so left-padded batches keep the layout of Hugging Face's cache: the kernel's own causal
mask handles the rest. RoPE is applied outside the kernel (its built-in rotary takes the first prompt's positions as
contiguous from the first one, which is wrong for left-padded rows).
"""

from __future__ import annotations

import functools

import torch

DOMAIN = "com.microsoft"


@torch.library.custom_op("shortened::rotary", mutates_args=())
def rotary(
    x: torch.Tensor, position_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """x [batch, seq, num_heads * head_dim] rotated at position_ids [batch, seq]; cos/sin [max_pos, head_dim / 2]."""
    b, s, d = x.shape
    half = d // num_heads // 2
    xh = x.view(b, s, num_heads, 2 * half)
    c, sn = cos[position_ids][:, :, None, :], sin[position_ids][:, :, None, :]
    x1, x2 = xh[..., :half], xh[..., half:]
    return torch.cat([x1 * c - x2 * sn, x2 * c + x1 * sn], -1).reshape(b, s, d)


@rotary.register_fake
def _rotary_fake(x, position_ids, cos, sin, num_heads):
    return torch.empty_like(x)


@torch.library.custom_op("shortened::gqa", mutates_args=())
def gqa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    seqlens_k: torch.Tensor,
    total: torch.Tensor,
    query_seqlens: torch.Tensor,
    bias: torch.Tensor,
    num_heads: int,
    kv_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal attention of q [b, s, H*d] over past + new keys/values ([b, Hkv, p, d] + [b, s, Hkv*d]) with an
    additive bias [b, 1, s, p+s]; returns (output [b, s, H*d], present_k, present_v [b, Hkv, p+s, d])."""
    b, s, _ = q.shape
    d = past_k.shape[-1]
    qh = q.view(b, s, num_heads, d).transpose(1, 2)
    kh = torch.cat([past_k, k.view(b, s, kv_heads, d).transpose(1, 2)], 2)
    vh = torch.cat([past_v, v.view(b, s, kv_heads, d).transpose(1, 2)], 2)
    t = kh.shape[2]
    g = num_heads // kv_heads
    scores = (qh @ kh.repeat_interleave(g, 1).transpose(-1, -2)).float() * scale + bias.float()
    causal = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s)
    scores = scores.masked_fill(~causal, torch.finfo(torch.float32).min)
    out = scores.softmax(-1).to(q.dtype) @ vh.repeat_interleave(g, 1)
    return out.transpose(1, 2).reshape(b, s, num_heads * d), kh, vh


@gqa.register_fake
def _gqa_fake(q, k, v, past_k, past_v, seqlens_k, total, query_seqlens, bias, num_heads, kv_heads, scale):
    b, hkv, p, d = past_k.shape
    present = past_k.new_empty(b, hkv, p + q.shape[1], d)
    return q.new_empty(q.shape), present, present.clone()


@functools.cache
def _ops():
    """onnxscript ops for the two contrib nodes (their schemas registered with onnx once per process)."""
    import onnx.defs as D
    import onnxscript

    param, attr, opt = D.OpSchema.FormalParameter, D.OpSchema.Attribute, D.OpSchema.FormalParameterOption
    at = D.OpSchema.AttrType
    types = [
        ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
        ("M", ["tensor(int32)"], ""),
        ("I", ["tensor(int64)"], ""),
        ("F", ["tensor(float)"], ""),
    ]

    def register(name, inputs, outputs, attrs):
        try:
            D.get_schema(name, 1, DOMAIN)
            return
        except D.SchemaError:
            pass
        ins = [param(n, t, "", param_option=opt.Optional if optional else opt.Single) for n, t, optional in inputs]
        schema = D.OpSchema(
            name, DOMAIN, 1, "", inputs=ins, outputs=[param(n, t, "") for n, t in outputs], type_constraints=types,
            attributes=[attr(n, kind, "", required=False) for n, kind in attrs],
        )  # fmt: skip
        D.register_schema(schema)

    register(
        "RotaryEmbedding",
        [("input", "T", False), ("position_ids", "I", False), ("cos_cache", "T", False), ("sin_cache", "T", False)],
        [("output", "T")],
        [("interleaved", at.INT), ("num_heads", at.INT), ("rotary_embedding_dim", at.INT), ("scale", at.FLOAT)],
    )
    register(
        "GroupQueryAttention",
        [("query", "T", False), ("key", "T", True), ("value", "T", True), ("past_key", "T", True),
         ("past_value", "T", True), ("seqlens_k", "M", False), ("total_sequence_length", "M", False),
         ("cos_cache", "T", True), ("sin_cache", "T", True), ("position_ids", "I", True),
         ("attention_bias", "T", True), ("head_sink", "T", True), ("k_scale", "F", True), ("v_scale", "F", True),
         ("q_norm_weight", "T", True), ("k_norm_weight", "T", True), ("query_seqlens", "M", True)],
        [("output", "T"), ("present_key", "T"), ("present_value", "T")],
        [("num_heads", at.INT), ("kv_num_heads", at.INT), ("scale", at.FLOAT), ("do_rotary", at.INT),
         ("local_window_size", at.INT), ("softcap", at.FLOAT)],
    )  # fmt: skip
    return onnxscript.values.Opset(DOMAIN, 1)


def _rotary_onnx(x, position_ids, cos, sin, num_heads: int):
    return _ops().RotaryEmbedding(x, position_ids, cos, sin, num_heads=num_heads, interleaved=0)


def _gqa_onnx(q, k, v, past_k, past_v, seqlens_k, total, query_seqlens, bias, num_heads: int, kv_heads: int,
              scale: float):  # fmt: skip
    return _ops().GroupQueryAttention(
        q, k, v, past_k, past_v, seqlens_k, total, None, None, None, bias, None, None, None, None, None, query_seqlens,
        num_heads=num_heads, kv_num_heads=kv_heads, scale=scale, do_rotary=0, _outputs=3,
    )  # fmt: skip


def translation_table() -> dict:
    """custom_translation_table for torch.onnx.export."""
    _ops()
    return {torch.ops.shortened.rotary.default: _rotary_onnx, torch.ops.shortened.gqa.default: _gqa_onnx}


__all__ = ["gqa", "rotary", "translation_table"]
