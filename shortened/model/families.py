"""What differs per model family, in one declarative table.

Each entry says where the decoder blocks live, which config fields give the model's sizes, which config lists
hold one entry per block, which modules carry a per-block index that must be renumbered after blocks are removed,
and where width pruning finds the projections. `geometry(config)` is the one place sizes are read from a config;
everything else (FLOPs, width pruning, ONNX cache shapes, the fused decoder, benchmarks) takes them from there.
"""

from __future__ import annotations

from dataclasses import dataclass

from shortened.errors import UsageError


@dataclass(frozen=True)
class Width:
    """Where width pruning (converter/width.py) finds a block's projections, as paths relative to the block. The
    MLP's output projection is the family's `mlp_down`; the heads' attributes live on `o_proj`'s parent module."""

    mlp_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")  # rows are MLP channels; one module: [gate | up]
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # one module: [q | k | v]
    o_proj: str = "self_attn.o_proj"
    conv1d: bool = False  # transformers' Conv1D (weight [in, out]) instead of nn.Linear
    heads_refusal: str = ""  # why head groups cannot be dropped (then only the MLP narrows)


@dataclass(frozen=True)
class Family:
    blocks: str  # dotted path from the *ForCausalLM model to the ModuleList of decoder blocks
    final_norm: str  # dotted path to the norm applied after the last block
    num_layers_key: str = "num_hidden_layers"
    # config fields geometry() reads; "" = the family has no such field
    hidden_key: str = "hidden_size"
    heads_key: str = "num_attention_heads"
    kv_heads_key: str = "num_key_value_heads"  # missing or None: as many KV heads as query heads
    head_dim_key: str = "head_dim"  # missing or None: hidden / heads
    intermediate_key: str = "intermediate_size"
    intermediate_default: int = 0  # the MLP width when the config's is None, in multiples of hidden (GPT-2: 4)
    gated_mlp: bool = True  # gate, up and down projections (else in and out: GPT-2's c_fc, c_proj)
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
    width: Width | None = Width()  # None: no width pruning for this family


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
    "phi3": Family(  # packed projections, partial RoPE
        blocks="model.layers",
        final_norm="model.norm",
        width=Width(mlp_in=("mlp.gate_up_proj",), qkv=("self_attn.qkv_proj",)),
    ),
    "gpt2": Family(
        blocks="transformer.h",
        final_norm="transformer.ln_f",
        num_layers_key="n_layer",
        hidden_key="n_embd",
        heads_key="n_head",
        kv_heads_key="",
        head_dim_key="",
        intermediate_key="n_inner",
        intermediate_default=4,
        gated_mlp=False,
        layer_idx_attrs=("attn.layer_idx",),
        mlp_down="mlp.c_proj",  # Conv1D (weight [in, out]), then dropout
        width=Width(mlp_in=("mlp.c_fc",), conv1d=True, heads_refusal="its head size is hidden_size / n_head"),
    ),
}


def family_for(config) -> Family:
    model_type = _field(config, "model_type")
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
    return int(_field(config, family_for(config).num_layers_key))


@dataclass(frozen=True)
class Geometry:
    """A model's sizes, read from its config by `geometry`."""

    layers: int
    hidden: int
    heads: int  # query heads
    kv_heads: int
    head_dim: int
    intermediate: int  # MLP channels
    vocab: int
    gated_mlp: bool


def _field(config, key: str):
    """A config field (a transformers config or the dict of a config.json); None where missing or key is ""."""
    if not key:
        return None
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def geometry(config) -> Geometry:
    """The sizes of a supported family's model, from its config (or config.json as a dict)."""
    fam = family_for(config)
    hidden, heads = int(_field(config, fam.hidden_key)), int(_field(config, fam.heads_key))
    inter = _field(config, fam.intermediate_key) or fam.intermediate_default * hidden
    return Geometry(
        layers=num_blocks(config),
        hidden=hidden,
        heads=heads,
        kv_heads=int(_field(config, fam.kv_heads_key) or heads),
        head_dim=int(_field(config, fam.head_dim_key) or hidden // heads),
        intermediate=int(inter),
        vocab=int(_field(config, "vocab_size")),
        gated_mlp=fam.gated_mlp,
    )
