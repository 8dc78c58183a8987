"""Calibration data: token windows from a text file, a JSONL file, or a Hugging Face dataset.

The paper's protocol is the default: 10 samples of 128 tokens.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UsageError


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
            from .loading import hub_reachable

            if not hub_reachable():  # only a cached copy can serve: fail now (one line) when there is none
                from .loading import load_hf_dataset

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
    from ..io import read_jsonl, read_text_file, sha256_file

    if spec.source.startswith("hf:"):
        from .loading import load_hf_dataset

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
