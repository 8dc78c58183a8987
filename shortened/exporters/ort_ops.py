"""onnxruntime's GroupQueryAttention as a PyTorch custom op, so the dynamo exporter writes it as one ONNX node:

    shortened::gqa -> com.microsoft GroupQueryAttention: packed QKV in, RoPE from cos/sin tables at the given
                      position_ids, grouped-query attention over the KV cache, which it appends to

The op has a plain PyTorch implementation with the kernel's semantics (used when tracing and in tests), a fake
(shape) implementation for torch.export, and a translation to the onnxruntime node. The graphs that use them run on
onnxruntime only (CPU and CUDA providers), not on other ONNX runtimes or TensorRT.

GroupQueryAttention gets the padding as an additive `attention_bias` [batch, 1, seq, total] and every row's
`seqlens_k` is total - 1, so left-padded batches keep the layout of Hugging Face's cache: the kernel's own causal
mask handles the rest. RoPE takes the position_ids per token (checked on left-padded prompts, where they do not start
at the row's first slot).
"""

from __future__ import annotations

import functools

import torch

DOMAIN = "com.microsoft"


def rotate(x: torch.Tensor, position_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int):
    """Rotate-half RoPE of x [batch, seq, num_heads * head_dim] at position_ids [batch, seq] from cos/sin tables
    [max_pos, head_dim / 2] (what GroupQueryAttention's do_rotary computes)."""
    b, s, d = x.shape
    half = d // num_heads // 2
    xh = x.view(b, s, num_heads, 2 * half)
    c, sn = cos[position_ids][:, :, None, :], sin[position_ids][:, :, None, :]
    x1, x2 = xh[..., :half], xh[..., half:]
    return torch.cat([x1 * c - x2 * sn, x2 * c + x1 * sn], -1).reshape(b, s, d)


@torch.library.custom_op("shortened::gqa", mutates_args=())
def gqa(
    qkv: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    seqlens_k: torch.Tensor,
    total: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor,
    query_seqlens: torch.Tensor,
    bias: torch.Tensor,
    num_heads: int,
    kv_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal attention of packed q|k|v [b, s, (H + 2 Hkv) d], RoPE applied to q and k at position_ids, over the past
    keys/values [b, Hkv, p, d] and the new ones, with an additive bias [b, 1, s, p + s]. Returns (output [b, s, H d],
    present_k, present_v [b, Hkv, p + s, d]). seqlens_k, total and query_seqlens are the kernel's bookkeeping
    (total - 1 per row, total, s per row); the reference implementation does not need them."""
    b, s, _ = qkv.shape
    d = past_k.shape[-1]
    q, k, v = qkv.split([num_heads * d, kv_heads * d, kv_heads * d], -1)
    q, k = rotate(q, position_ids, cos, sin, num_heads), rotate(k, position_ids, cos, sin, kv_heads)
    qh = q.reshape(b, s, num_heads, d).transpose(1, 2)
    kh = torch.cat([past_k, k.reshape(b, s, kv_heads, d).transpose(1, 2)], 2)
    vh = torch.cat([past_v, v.reshape(b, s, kv_heads, d).transpose(1, 2)], 2)
    t = kh.shape[2]
    g = num_heads // kv_heads
    scores = (qh @ kh.repeat_interleave(g, 1).transpose(-1, -2)).float() * scale + bias.float()
    causal = torch.ones(s, t, dtype=torch.bool, device=qkv.device).tril(t - s)
    scores = scores.masked_fill(~causal, torch.finfo(torch.float32).min)
    out = scores.softmax(-1).to(qkv.dtype) @ vh.repeat_interleave(g, 1)
    return out.transpose(1, 2).reshape(b, s, num_heads * d), kh, vh


@gqa.register_fake
def _gqa_fake(qkv, past_k, past_v, seqlens_k, total, cos, sin, position_ids, query_seqlens, bias, num_heads,
              kv_heads, scale):  # fmt: skip
    b, hkv, p, d = past_k.shape
    present = past_k.new_empty(b, hkv, p + qkv.shape[1], d)
    return qkv.new_empty(b, qkv.shape[1], num_heads * d), present, present.clone()


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


def _gqa_onnx(qkv, past_k, past_v, seqlens_k, total, cos, sin, position_ids, query_seqlens, bias, num_heads: int,
              kv_heads: int, scale: float):  # fmt: skip
    return _ops().GroupQueryAttention(
        qkv, None, None, past_k, past_v, seqlens_k, total, cos, sin, position_ids, bias, None, None, None, None, None,
        query_seqlens, num_heads=num_heads, kv_num_heads=kv_heads, scale=scale, do_rotary=1, _outputs=3,
    )  # fmt: skip


def translation_table() -> dict:
    """custom_translation_table for torch.onnx.export."""
    _ops()
    return {torch.ops.shortened.gqa.default: _gqa_onnx}


__all__ = ["gqa", "rotate", "translation_table"]
