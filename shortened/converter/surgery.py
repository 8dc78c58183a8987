"""Pruning by tensor surgery: remove blocks from a safetensors checkpoint without building the model.

The way mergekit slices layers: read the checkpoint's index, and for each input shard copy its tensors into one
output shard, dropping the removed blocks' tensors and renaming the kept ones to their new block index
(`model.layers.7.mlp...` -> `model.layers.5.mlp...`). Tensors are read one at a time (`safe_open`), so the
peak memory is about one shard whatever the model's size. Config, generation config and tokenizer are written
by the same code as the load-prune-save path, so both give the same checkpoint (tests/test_surgery.py).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from tqdm.auto import tqdm

from shortened.model.blocks import prune_config
from shortened.model.checkpoint import make_config_portable
from shortened.model.families import family_for, num_blocks
from shortened.model.loading import LoadOptions, load_config, load_tokenizer, torch_dtype
from shortened.model.loading import _check_weight_files as check_weight_files

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def applies(source: str, options: LoadOptions | None = None, config=None) -> bool:
    """True when `source` is a local directory of safetensors weights (sharded or not, not GGUF) holding exactly
    the tensors its config's model has (names and shapes, read from the headers). A checkpoint that does not fit
    its config goes through the load path, whose checks name the problem; broken files are a UsageError here."""
    opts = options or LoadOptions()
    p = Path(source)
    if opts.gguf_file is not None or not p.is_dir() or not ((p / INDEX).is_file() or (p / SINGLE).is_file()):
        return False
    check_weight_files(p, opts.allow_pickle)
    return tensors_fit_config(p, config if config is not None else load_config(source, opts.trust_remote_code))


def tensors_fit_config(source: Path, config) -> bool:
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = model.state_dict(keep_vars=True)
    want = {k: tuple(v.shape) for k, v in params.items()}
    have = {}
    for name in shards_of(source):
        with safe_open(source / name, framework="pt") as f:
            have.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    shared = {}  # tied weights (lm_head = embeddings): one stored name is enough
    for k, v in params.items():
        shared.setdefault(id(v), []).append(k)
    missing = {k for k in set(want) - set(have) if not any(o in have for o in shared[id(params[k])])}
    return not missing and all(k in want and want[k] == shape for k, shape in have.items())


def block_key_pattern(config) -> re.Pattern:
    """`<blocks path>.<index>.<rest>`, also without the leading parts (a base-model checkpoint: `layers.3.`)."""
    parts = family_for(config).blocks.split(".")
    heads = "|".join(re.escape(".".join(parts[i:])) for i in range(len(parts)))
    return re.compile(rf"^({heads})\.(\d+)\.(.+)$")


def renamed(key: str, pattern: re.Pattern, new_index: dict[int, int]) -> str | None:
    """The key in the pruned checkpoint, or None when it belongs to a removed block."""
    m = pattern.match(key)
    if m is None:
        return key
    old = int(m.group(2))
    if old not in new_index:
        return None
    return f"{m.group(1)}.{new_index[old]}.{m.group(3)}"


def shards_of(source: Path) -> list[str]:
    if (source / INDEX).is_file():
        weight_map = json.loads((source / INDEX).read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    return [SINGLE]


def cut_checkpoint(source: str, out_dir: str | Path, removed: list[int], options: LoadOptions | None = None,
                   progress: bool = True) -> dict:  # fmt: skip
    """Write to `out_dir` the checkpoint `source` without blocks `removed` (original numbering).

    Floating-point tensors are cast to `options.dtype` as loading would (float32 by default: pass bfloat16 to
    keep a bf16 checkpoint bf16). Returns {"shards", "tensors", "bytes"} of what was written.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    opts = options or LoadOptions()
    src, out_dir = Path(source), Path(out_dir)
    config = load_config(source, opts.trust_remote_code)
    n = num_blocks(config)
    keep = [i for i in range(n) if i not in set(removed)]
    new_index = {old: new for new, old in enumerate(keep)}
    pattern = block_key_pattern(config)
    dtype = torch_dtype(opts.dtype)

    shards = shards_of(src)
    weight_map, total, count = {}, 0, 0
    for k, name in enumerate(tqdm(shards, desc="pruning shards", disable=not progress or len(shards) < 2)):
        out_name = name if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        with safe_open(src / name, framework="pt") as f:
            for key in f.keys():
                new = renamed(key, pattern, new_index)
                if new is None:
                    continue
                t = f.get_tensor(key)
                if t.is_floating_point() and t.dtype != dtype:
                    t = t.to(dtype)
                tensors[new] = t.contiguous()
        if not tensors:
            continue  # a shard that held only removed blocks
        save_file(tensors, out_dir / out_name, metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = out_name
            total += t.numel() * t.element_size()
        count += len(tensors)
        del tensors
    written = sorted(set(weight_map.values()))
    if len(shards) > 1:
        if len(written) < len(shards):  # shards were skipped: renumber the names so "-of-N" stays true
            names = {old: f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i, old in enumerate(written)}
            for old, new in names.items():
                (out_dir / old).rename(out_dir / new)
            weight_map = {k: names[v] for k, v in weight_map.items()}
            written = sorted(names.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    prune_config(config, keep, n)
    config.dtype = dtype
    if not getattr(config, "architectures", None):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.save_pretrained(out_dir)
    make_config_portable(out_dir)
    try:
        gen = GenerationConfig.from_pretrained(src)
    except OSError:
        gen = GenerationConfig.from_model_config(config)
    gen.save_pretrained(out_dir)
    tok = load_tokenizer(source, opts, "optional")  # as the load path: none where the source has none
    if tok is not None:
        tok.save_pretrained(out_dir)
    log.info("surgery: %d tensors in %d shards (%.1f MB), blocks %s removed", count, len(written), total / 1e6,
             removed)  # fmt: skip
    return {"shards": len(written), "tensors": count, "bytes": total}
