"""Retraining data: plain text packed into windows, or Alpaca-style instructions with the prompt masked out.

Sources: a local .txt file (plain text), a local .jsonl file (records with a text field, or Alpaca records with
instruction / input / output), or a Hugging Face dataset name (`hf:NAME[:CONFIG]`, or a bare name that is not a
local path). Every example is a dict of input_ids and labels (-100 where the loss must not look).
"""

from __future__ import annotations

import random
from pathlib import Path

from shortened.data import load_hf_dataset
from shortened.errors import UsageError
from shortened.io import read_jsonl, read_text_file, sha256_file

IGNORE = -100  # label value the loss skips (the Hugging Face convention)
FORMATS = ("auto", "text", "alpaca")

# The Alpaca prompts (Stanford Alpaca, also used by LLM-Pruner and Shortened LLaMA for LoRA retraining)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def read_records(source: str, split: str = "train", text_field: str = "text") -> tuple[list, dict]:
    """(records, provenance): records are strings (plain text) or dicts (JSONL rows / dataset rows)."""

    path = Path(source)
    if path.is_file():
        prov = {"file": str(path), "sha256": sha256_file(path)}
        if path.suffix != ".jsonl":
            return [read_text_file(path)], prov
        rows = read_jsonl(path)
        return rows, prov
    looks_local = source.startswith((".", "/", "~")) or path.suffix in (".txt", ".jsonl", ".json")
    if looks_local and not source.startswith("hf:"):
        raise UsageError(f"data file {source} not found; pass a .txt or .jsonl file or a dataset name (hf:NAME)")

    name, _, config = source.removeprefix("hf:").partition(":")
    ds = load_hf_dataset(name, config or None, split)  # offline: a cached copy or one line
    return [dict(r) for r in ds], {"dataset": name, "config": config or None, "split": split}


def check_local_data(source: str | None, data_format: str = "auto", text_field: str = "text") -> None:
    """Read a local data file once before any model loads: not text, bad JSON or non-string text fields fail
    here (one line) instead of after the model and tokenizer are loaded."""
    if not source or not Path(source).is_file():
        return
    records, _ = read_records(source, text_field=text_field)
    fmt = detect_format(records, text_field) if data_format == "auto" else data_format
    if fmt == "text" and not isinstance(records[0], str):
        _check_text_fields(source, records, text_field)


def _check_text_fields(source, records, text_field) -> None:
    if text_field not in records[0]:
        raise UsageError(f"{source} has no field {text_field!r}; set --text-field")
    bad = next((i for i, r in enumerate(records, 1) if not isinstance(r.get(text_field), str)), None)
    if bad is not None:
        kind = type(records[bad - 1].get(text_field)).__name__
        raise UsageError(f"{source}: record {bad} field {text_field!r} is not a string ({kind}); "
                         "every record needs text")  # fmt: skip


def detect_format(records: list, text_field: str = "text") -> str:
    if isinstance(records[0], str):
        return "text"
    if "instruction" in records[0] and "output" in records[0]:
        return "alpaca"
    if text_field in records[0]:
        return "text"
    raise UsageError(
        f"cannot tell the data format: records need {text_field!r} (set --text-field) or instruction/output (Alpaca)"
    )


def pack_text(texts: list[str], tokenizer, seq_len: int, add_bos: bool = False) -> list[dict]:
    """Join the texts (EOS between documents), cut into full windows of seq_len tokens; labels = input_ids."""
    ids: list[int] = []
    for t in texts:
        if not t:
            continue
        ids += tokenizer(t, add_special_tokens=False)["input_ids"]
        if len(texts) > 1 and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    body = seq_len - len(bos)
    n = len(ids) // body
    if n == 0:
        raise UsageError(f"the data has {len(ids)} tokens, fewer than one window of {seq_len}; lower --seq-len")
    out = []
    for i in range(n):
        x = bos + ids[i * body : (i + 1) * body]
        out.append({"input_ids": x, "labels": list(x)})
    return out


def alpaca_example(rec: dict, tokenizer, seq_len: int, add_bos: bool = False, train_on_prompt: bool = False):
    """Prompt + response + EOS, truncated to seq_len; the prompt's labels are IGNORE unless train_on_prompt."""
    tmpl = ALPACA_PROMPT if rec.get("input") else ALPACA_PROMPT_NO_INPUT
    prompt = tmpl.format(instruction=rec["instruction"], input=rec.get("input", ""))
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(str(rec["output"]), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        r = r + [tokenizer.eos_token_id]
    if add_bos and tokenizer.bos_token_id is not None:
        p = [tokenizer.bos_token_id] + p
    ids = (p + r)[:seq_len]
    labels = (list(p) if train_on_prompt else [IGNORE] * len(p)) + r
    return {"input_ids": ids, "labels": labels[:seq_len]}


def build_examples(
    source: str,
    tokenizer,
    seq_len: int = 256,
    data_format: str = "auto",
    text_field: str = "text",
    split: str = "train",
    add_bos: bool = False,
    train_on_prompt: bool = False,
    max_examples: int | None = None,
) -> tuple[list[dict], dict]:
    """Tokenized examples and a description of where they came from."""
    if data_format not in FORMATS:
        raise UsageError(f"unknown data format {data_format!r}; choose one of {', '.join(FORMATS)}")
    if seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2 tokens, got {seq_len}")
    records, prov = read_records(source, split, text_field)
    fmt = detect_format(records, text_field) if data_format == "auto" else data_format
    if fmt == "alpaca":
        if isinstance(records[0], str) or "instruction" not in records[0] or "output" not in records[0]:
            raise UsageError(f"{source} is not Alpaca data: each record needs instruction, (input,) output")
        examples = [alpaca_example(r, tokenizer, seq_len, add_bos, train_on_prompt) for r in records]
        examples = [e for e in examples if any(x != IGNORE for x in e["labels"])]  # prompt filled the window
    else:
        if isinstance(records[0], str):
            texts = records
        else:
            _check_text_fields(source, records, text_field)
            texts = [r[text_field] for r in records]
        examples = pack_text(texts, tokenizer, seq_len, add_bos)
    if max_examples is not None:
        examples = examples[:max_examples]
    if not examples:
        raise UsageError(f"{source} gave no training examples at --seq-len {seq_len}")
    return examples, {"source": source, "format": fmt, "seq_len": seq_len, "examples": len(examples), **prov}


def split_heldout(examples: list[dict], fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A deterministic held-out split (at least one example on each side)."""
    if not 0 < fraction < 1:
        raise UsageError(f"--val-fraction must be between 0 and 1 (exclusive), got {fraction}")
    if len(examples) < 2:
        raise UsageError("the data gives a single example: nothing is left for validation; add data or --val-data")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    val = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [examples[i] for i in sorted(val)]


class ExampleDataset:
    """A list of examples as a map-style dataset the Trainer accepts."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


class Collator:
    """Right-pad a batch: input_ids with pad, labels with IGNORE, attention_mask 0 on padding."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
