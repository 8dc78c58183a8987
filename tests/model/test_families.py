"""geometry(): the sizes of every family's tiny config, read by hand from tests/conftest.py's tiny_config."""

from __future__ import annotations

import pytest

from shortened.errors import UsageError
from shortened.model.families import FAMILIES, Geometry, geometry

# 6 blocks, hidden 64, 4 query heads, 2 KV heads, MLP 128, vocabulary 256 unless said otherwise
LLAMA_LIKE = Geometry(
    layers=6, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=256, gated_mlp=True
)
BY_HAND = {
    "llama": LLAMA_LIKE,  # head_dim 64 / 4 (LlamaConfig writes it into the config)
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,  # no head_dim field: 64 / 4
    "qwen3": Geometry(6, 64, 4, 2, 128, 128, 256, True),  # Qwen3Config's head_dim defaults to 128, not 64 / 4
    "gemma2": LLAMA_LIKE,  # head_dim=16 given explicitly
    "phi3": LLAMA_LIKE,  # packed qkv_proj and gate_up_proj, but the same sizes; no head_dim field
    # n_embd 64, n_head 4 (MHA: kv = heads), head_dim 64 / 4, n_inner None = 4 * 64, c_fc/c_proj (no gate)
    "gpt2": Geometry(
        layers=6, hidden=64, heads=4, kv_heads=4, head_dim=16, intermediate=256, vocab=256, gated_mlp=False
    ),
}


def test_every_family_has_a_hand_count():
    assert sorted(BY_HAND) == sorted(FAMILIES)


def test_geometry_of_tiny_configs(family, tiny_config):
    cfg = tiny_config(family)
    assert geometry(cfg) == BY_HAND[family]
    assert geometry(cfg.to_dict()) == BY_HAND[family]  # config.json as a dict reads the same


def test_geometry_of_smollm2_shape_and_gpt2_fields():
    from transformers import GPT2Config, LlamaConfig

    smol = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, head_dim=64, vocab_size=49152)  # fmt: skip
    assert geometry(smol) == Geometry(30, 576, 9, 3, 64, 1536, 49152, True)
    gpt2 = GPT2Config(n_embd=96, n_layer=3, n_head=6, n_inner=200, vocab_size=100)
    assert geometry(gpt2) == Geometry(3, 96, 6, 6, 16, 200, 100, False)  # head_dim = n_embd / n_head, not n_embd


def test_geometry_of_unsupported_family_is_a_usage_error():
    from transformers import AutoConfig

    with pytest.raises(UsageError, match="unsupported architecture 'bert'"):
        geometry(AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2))
