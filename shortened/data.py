"""Calibration data: token windows from a text file, a JSONL file, or a Hugging Face dataset.

The paper's protocol is the default: 10 samples of 128 tokens.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from shortened.errors import UsageError
from shortened.io import hub_reachable, read_jsonl, read_text_file, sha256_file


@dataclass
class CalibSpec:
    source: str  # a .txt file, a .jsonl file, or "hf:NAME[:CONFIG]"
    num_samples: int = 10
    seq_len: int = 128
    seed: int = 0
    add_bos: bool = False
    split: str = "train"  # Hugging Face datasets only
    text_field: str = "text"  # JSONL and Hugging Face datasets

    def validate(self) -> None:
        if self.num_samples < 1:
            raise UsageError(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.seq_len < 2:
            raise UsageError(f"--seq-len must be at least 2 tokens, got {self.seq_len}")
        if not self.source.startswith("hf:") and not Path(self.source).is_file():
            raise UsageError(f"calibration file {self.source} not found; pass a .txt or .jsonl file or hf:DATASET")
        if self.source.startswith("hf:"):
            if not hub_reachable():  # only a cached copy can serve: fail now (one line) when there is none
                name, _, config = self.source[3:].partition(":")
                load_hf_dataset(name, config or None, self.split)
        else:
            _read_texts(self)  # not text, bad records: refused before any model is loaded


@dataclass
class CalibBatch:
    input_ids: object  # LongTensor [N, T]
    attention_mask: object  # LongTensor [N, T], 0 on right padding
    description: dict

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def _read_texts(spec: CalibSpec) -> tuple[list[str], bool, dict]:
    """Return (texts, one_sample_per_text, provenance)."""

    if spec.source.startswith("hf:"):
        name, _, config = spec.source[3:].partition(":")
        ds = load_hf_dataset(name, config or None, spec.split)
        if spec.text_field not in ds.column_names:
            raise UsageError(f"dataset {name} has no field {spec.text_field!r}; fields: {', '.join(ds.column_names)}")
        return ["\n\n".join(t for t in ds[spec.text_field] if t)], False, {"dataset": name, "config": config or None}
    path = Path(spec.source)
    prov = {"file": str(path), "sha256": sha256_file(path)}
    if path.suffix == ".jsonl":
        texts = []
        for n, rec in enumerate(read_jsonl(path), 1):
            if spec.text_field not in rec:
                raise UsageError(f"{path}: record {n} has no field {spec.text_field!r}; set --text-field")
            if not isinstance(rec[spec.text_field], str):
                raise UsageError(f"{path}: record {n} field {spec.text_field!r} is not a string "
                                 f"({type(rec[spec.text_field]).__name__}); every record needs text there")  # fmt: skip
            texts.append(rec[spec.text_field])
        return texts, True, prov
    return [read_text_file(path)], False, prov


def load_calibration(spec: CalibSpec, tokenizer) -> CalibBatch:
    """Tokenize the source into `num_samples` windows of `seq_len` tokens (BOS included when add_bos)."""
    import torch

    spec.validate()
    texts, per_record, prov = _read_texts(spec)
    bos = []
    if spec.add_bos:
        if tokenizer.bos_token_id is None:
            raise UsageError("--add-bos was given but the tokenizer has no BOS token")
        bos = [tokenizer.bos_token_id]
    body_len = spec.seq_len - len(bos)
    rows: list[list[int]] = []
    if per_record:
        for text in texts[: spec.num_samples]:
            rows.append(bos + tokenizer(text, add_special_tokens=False)["input_ids"][:body_len])
        if len(rows) < spec.num_samples:
            raise UsageError(f"{spec.source} has {len(rows)} records; --num-samples asks for {spec.num_samples}")
    else:
        ids = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
        if len(ids) < body_len:
            raise UsageError(f"{spec.source} has only {len(ids)} tokens; need at least {body_len} for one window")
        rng = random.Random(spec.seed)
        starts = [rng.randrange(0, len(ids) - body_len + 1) for _ in range(spec.num_samples)]
        rows = [bos + ids[s : s + body_len] for s in starts]
        prov["starts"] = starts
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    desc = {**asdict(spec), **prov, "num_tokens": int(mask.sum())}
    return CalibBatch(input_ids=input_ids, attention_mask=mask, description=desc)


def load_hf_dataset(name: str, config: str | None = None, split: str = "train"):
    """datasets.load_dataset; with the hub unreachable, only a cached copy (offline mode, no retries), else one line."""
    try:
        import datasets
        from datasets import config as dconfig
    except ImportError as e:
        raise UsageError(f"the dataset {name} needs `datasets` (pip install datasets), or pass a local file") from e
    online = hub_reachable()
    before = dconfig.HF_HUB_OFFLINE
    dconfig.HF_HUB_OFFLINE = before or not online
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # unknown name, split or config; offline without a cached copy
        if not online:
            raise UsageError(f"no such file or cached dataset: {name} (and the Hugging Face hub is unreachable); "
                             "pass a local text file") from e  # fmt: skip
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load dataset {name!r} (split {split}): {msg}") from e
    finally:
        dconfig.HF_HUB_OFFLINE = before


NAMED_SOURCES = {
    # name: (Hugging Face dataset, config, split, text field)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "test", "sentence"),
}


def read_text(source: str) -> str:
    """A local text file, or a named source (wikitext2, ptb) through Hugging Face datasets."""

    p = Path(source)
    if p.is_file():
        return read_text_file(p)
    if source in NAMED_SOURCES:
        check_named_source(source)

        name, config, split, field = NAMED_SOURCES[source]
        ds = load_hf_dataset(name, config, split)  # one line on any trouble (offline: a cached copy only)
        return "\n\n".join(ds[field]) if source == "wikitext2" else " ".join(ds[field])
    raise UsageError(f"text source {source} not found: pass a text file or one of {', '.join(NAMED_SOURCES)}")


def check_named_source(source: str) -> None:
    """A named source comes from the hub: refuse at once (not after the hub client's retries) when unreachable."""

    if source in NAMED_SOURCES and not hub_reachable():
        name, config, split, _ = NAMED_SOURCES[source]
        try:
            load_hf_dataset(name, config, split)  # a cached copy serves offline
        except UsageError:
            raise UsageError(
                f"cannot load {source} ({name}): not cached, and the Hugging Face hub is unreachable; "
                "pass a local copy of the text as a file (e.g. --ppl wikitext-2/test.raw.txt)"
            ) from None


def token_windows(ids: list[int], seq_len: int, bos_id: int | None = None, max_windows: int | None = None):
    """Non-overlapping windows of seq_len tokens (seq_len - 1 text tokens after a BOS when bos_id is given)."""
    body = seq_len - (1 if bos_id is not None else 0)
    n = len(ids) // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise UsageError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    rows = [([bos_id] if bos_id is not None else []) + ids[i * body : (i + 1) * body] for i in range(n)]
    return torch.tensor(rows, dtype=torch.long)
