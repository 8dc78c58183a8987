"""Pruning by tensor surgery (converter/surgery.py) against the load-prune-save path, and its memory bound."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shortened.converter.steps import prune
from shortened.converter.surgery import block_key_pattern, renamed
from shortened.model.blocks import remove_blocks
from shortened.model.checkpoint import save_checkpoint
from shortened.model.loading import load_model

REPO = Path(__file__).resolve().parents[2]


def tensors_of(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, framework="pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8),
                                                                        b.view(-1).view(torch.uint8))  # fmt: skip


def in_memory_prune(src: Path, out: Path, removed: list[int]) -> None:
    loaded = load_model(str(src))
    remove_blocks(loaded.model, removed)
    save_checkpoint(loaded.model, loaded.tokenizer, out)


def without_version(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k != "transformers_version"}


def test_surgery_matches_load_prune_save(family, tiny_models, tmp_path):
    src = tiny_models[family]
    res = prune(str(src), tmp_path / "cut", blocks=[1, 3, 4], no_protect=True, progress=False)
    assert res["method"] == "surgery" and res["kept"] == 3
    in_memory_prune(src, tmp_path / "ref", [1, 3, 4])
    cut, ref = tensors_of(tmp_path / "cut"), tensors_of(tmp_path / "ref")
    assert sorted(cut) == sorted(ref)
    assert all(same_bytes(cut[k], ref[k]) for k in ref), [k for k in ref if not same_bytes(cut[k], ref[k])]
    for name in ("config.json", "generation_config.json"):
        a, b = (json.loads((tmp_path / d / name).read_text()) for d in ("cut", "ref"))
        assert without_version(a) == without_version(b), name
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "cut" / name).read_text() == (tmp_path / "ref" / name).read_text(), name
    assert json.loads((tmp_path / "cut" / "pruning.json").read_text())["kept_blocks"] == [0, 2, 5]


def test_renaming_rules():
    from transformers import AutoConfig

    pat = block_key_pattern(AutoConfig.for_model("llama"))
    new = {0: 0, 2: 1, 5: 2}
    assert renamed("model.layers.5.mlp.up_proj.weight", pat, new) == "model.layers.2.mlp.up_proj.weight"
    assert renamed("model.layers.1.mlp.up_proj.weight", pat, new) is None
    assert renamed("layers.2.self_attn.q_proj.weight", pat, new) == "layers.1.self_attn.q_proj.weight"  # base model
    assert renamed("model.embed_tokens.weight", pat, new) == "model.embed_tokens.weight"
    assert renamed("model.layers_norm.12.weight", pat, new) == "model.layers_norm.12.weight"


# Peak memory: a LLaMA-shaped fp32 checkpoint of ~370 MB in shards of <= 40 MB, pruned in a fresh process.
PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    from pathlib import Path
    import psutil
    mode, src, out = sys.argv[1:4]
    import torch, transformers, safetensors  # imported before the baseline: only the pruning is measured
    from transformers.models.llama import modeling_llama  # (code, ~70 MB: a constant, whatever the model's size)
    from shortened.converter.steps import prune
    proc, peak, done = psutil.Process(), [0], threading.Event()
    def sample():  # ru_maxrss is useless here: importing torch peaks above what pruning needs
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)
    base = proc.memory_info().rss
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    if mode == "surgery":
        prune(src, out, blocks=[3, 4, 5, 6, 7, 8], no_protect=True, progress=False)
    else:
        from shortened.model.checkpoint import save_checkpoint
        from shortened.model.loading import load_model
        from shortened.model.blocks import remove_blocks
        m = load_model(src)
        remove_blocks(m.model, [3, 4, 5, 6, 7, 8])
        save_checkpoint(m.model, m.tokenizer, Path(out))
    done.set()
    t.join()
    print(json.dumps({"baseline_mb": base / 2**20, "peak_mb": peak[0] / 2**20, "grew_mb": (peak[0] - base) / 2**20}))
""")


def peak_rss(mode: str, src: Path, out: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, mode, str(src), str(out)], capture_output=True,
                       text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory, char_tokenizer) -> tuple[Path, int]:
    """~370 MB fp32 LLaMA (hidden 768, 12 blocks of 28 MB) in shards of <= 40 MB; (dir, largest shard bytes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "llama", hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=4096, tie_word_embeddings=False,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("sharded") / "model"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.save_pretrained(path, max_shard_size="40MB")
    char_tokenizer().save_pretrained(path)
    del model
    largest = max(f.stat().st_size for f in path.glob("*.safetensors"))
    return path, largest


def test_surgery_peak_memory_about_one_shard(sharded_checkpoint, tmp_path):
    src, largest = sharded_checkpoint
    shards = len(list(src.glob("*.safetensors")))
    total = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert shards >= 6 and total > 300e6
    cut = peak_rss("surgery", src, tmp_path / "cut")
    print(f"\nsurgery: {shards} shards, {total / 1e6:.0f} MB, largest {largest / 1e6:.0f} MB: {cut}")
    # the bound: one input shard plus its output copy, plus slack for the allocator; far below the checkpoint
    assert cut["grew_mb"] * 2**20 < 2.5 * largest + 30e6, cut
    ref = peak_rss("in_memory", src, tmp_path / "ref")
    print(f"load-prune-save on the same checkpoint: {ref}")
    assert ref["grew_mb"] * 2**20 > 0.9 * total * 6 / 12  # it holds the whole (kept) model: the bound is real
    kept = tensors_of(tmp_path / "cut")
    assert "model.layers.5.mlp.up_proj.weight" in kept and "model.layers.6.mlp.up_proj.weight" not in kept
    key = "model.layers.10.mlp.up_proj.weight"  # block 10 is block 4 after removing 3..8
    with safe_open(src / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][key],
                   framework="pt") as f:  # fmt: skip
        assert torch.equal(kept["model.layers.4.mlp.up_proj.weight"], f.get_tensor(key))
    index = json.loads((tmp_path / "cut" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == sorted(f.name for f in (tmp_path / "cut").glob("*.safetensors"))
    assert all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files) and len(files) < shards
