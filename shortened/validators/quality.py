"""Quality: perplexity with the paper's protocol (text joined, non-overlapping windows, exp of mean token NLL)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import UsageError

NAMED_SOURCES = {
    # name: (Hugging Face dataset, config, split, text field)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "test", "sentence"),
}


@dataclass
class Perplexity:
    ppl: float
    nll_mean: float
    tokens: int  # predicted tokens
    windows: int
    seq_len: int
    source: str

    def to_dict(self) -> dict:
        return dict(vars(self))


def read_text(source: str) -> str:
    """A local text file, or a named source (wikitext2, ptb) through Hugging Face datasets."""
    p = Path(source)
    if p.is_file():
        return p.read_text(encoding="utf-8", errors="replace")
    if source in NAMED_SOURCES:
        try:
            import datasets
        except ImportError as e:
            raise UsageError(
                f"the named source {source} needs `datasets` (pip install datasets), or pass a file"
            ) from e
        name, config, split, field = NAMED_SOURCES[source]
        ds = datasets.load_dataset(name, config, split=split)
        return "\n\n".join(ds[field]) if source == "wikitext2" else " ".join(ds[field])
    raise UsageError(f"text source {source} not found: pass a text file or one of {', '.join(NAMED_SOURCES)}")


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


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    source: str,
    seq_len: int = 128,
    add_bos: bool = False,
    batch_size: int = 8,
    max_windows: int | None = None,
    progress: bool = True,
) -> Perplexity:
    """exp(mean next-token NLL over all windows); every window is scored on its own (no context carry-over)."""
    text = read_text(source)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id if add_bos else None
    if add_bos and bos is None:
        raise UsageError("--add-bos was given but the tokenizer has no BOS token")
    windows = token_windows(ids, seq_len, bos, max_windows)
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for s in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False):
        x = windows[s : s + batch_size].to(dev)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
    return Perplexity(math.exp(total / count), total / count, count, len(windows), seq_len, source)
