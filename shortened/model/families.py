"""What differs per model family, in one declarative table.

Each entry says where the decoder blocks live, which config field counts them, which config lists
hold one entry per block, and which modules carry a per-block index that must be renumbered after
blocks are removed. Everything else in the converter is family-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass

from shortened.errors import UsageError


@dataclass(frozen=True)
class Family:
    blocks: str  # dotted path from the *ForCausalLM model to the ModuleList of decoder blocks
    final_norm: str  # dotted path to the norm applied after the last block
    num_layers_key: str = "num_hidden_layers"
    per_layer_lists: tuple[str, ...] = ("layer_types",)  # config lists with one entry per block
    layer_idx_attrs: tuple[str, ...] = ("self_attn.layer_idx",)  # per-block indices (relative to a block)
    # config fields that count blocks from the bottom (e.g. Qwen2's max_window_layers): remapped on removal
    layer_count_thresholds: tuple[str, ...] = ()
    needs_bos: bool = False  # perplexity windows need a BOS token (Gemma)
    # the decoder layer is pre-norm attention + MLP with q/k/v/o projections and rotate-half RoPE, so the ONNX
    # exporter can write it with onnxruntime's GroupQueryAttention (exporters/fused.py)
    llama_like_layer: bool = False
    # linear recovery (converter/recovery.py): the block's module whose output is the MLP's contribution to the
    # residual stream (a map folds into its weight), or why no such module exists
    mlp_down: str = "mlp.down_proj"
    linear_recovery_refusal: str = ""


_LLAMA_LIKE = Family(blocks="model.layers", final_norm="model.norm", llama_like_layer=True)

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": Family("model.layers", "model.norm", layer_count_thresholds=("max_window_layers",), llama_like_layer=True),
    "qwen3": Family("model.layers", "model.norm", layer_count_thresholds=("max_window_layers",), llama_like_layer=True),
    "gemma2": Family(
        blocks="model.layers",
        final_norm="model.norm",
        needs_bos=True,
        linear_recovery_refusal="Gemma 2 passes the MLP output through post_feedforward_layernorm before the "
        "residual add, so a linear map cannot be folded into the down projection",
    ),
    "phi3": Family(blocks="model.layers", final_norm="model.norm"),  # packed qkv_proj, partial RoPE
    "gpt2": Family(
        blocks="transformer.h",
        final_norm="transformer.ln_f",
        num_layers_key="n_layer",
        layer_idx_attrs=("attn.layer_idx",),
        mlp_down="mlp.c_proj",  # Conv1D (weight [in, out]), then dropout
    ),
}


def family_for(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UsageError(
            f"unsupported architecture {model_type!r}; supported model types: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def get_path(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def set_path(obj, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    for part in head:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def blocks_of(model):
    return get_path(model, family_for(model.config).blocks)


def num_blocks(config) -> int:
    return int(getattr(config, family_for(config).num_layers_key))
