"""Quality: perplexity with the paper's protocol (text joined, non-overlapping windows, exp of mean token NLL).

The same windows can be scored through an exported artifact (`perplexity_onnx`: the onnxruntime runner, one prefill
per window with an empty KV cache), so int4/int8/fp16 exports are judged on what will be deployed. For an fp32
export it equals PyTorch's perplexity to ~1e-6 relative (tests/test_quantized.py holds it to 1e-4)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from shortened.data import NAMED_SOURCES, check_named_source, read_text, token_windows
from shortened.errors import UsageError
from shortened.io import read_text_file
from shortened.model.families import family_for
from shortened.model.loading import Loaded, check_length, load_config, load_model
from shortened.runtime.onnxruntime import find_onnx_model, load_ort_runner
from shortened.validators.zeroshot import zeroshot


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

    check_length(model.config, seq_len, "perplexity window length")
    windows = _windows(tokenizer, source, seq_len, add_bos, max_windows)
    dev = next(model.parameters()).device

    def logits_of(x):
        return model(input_ids=x.to(dev), use_cache=False).logits

    return _score(windows, logits_of, batch_size, "perplexity", progress, seq_len, source)


def _windows(tokenizer, source: str, seq_len: int, add_bos: bool, max_windows: int | None):
    text = read_text(source)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id if add_bos else None
    if add_bos and bos is None:
        raise UsageError("--add-bos was given but the tokenizer has no BOS token")
    return token_windows(ids, seq_len, bos, max_windows)


def _score(windows, logits_of, batch_size: int, desc: str, progress: bool, seq_len: int, source: str) -> Perplexity:
    """exp(mean next-token NLL) of `windows`, with logits_of(batch of token ids) -> logits (a torch tensor)."""
    total, count = 0.0, 0
    for s in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False):
        x = windows[s : s + batch_size]
        logits = logits_of(x)[:, :-1].float()
        target = x[:, 1:].to(logits.device)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
    return Perplexity(math.exp(total / count), total / count, count, len(windows), seq_len, source)


def perplexity_onnx(
    onnx_dir,
    tokenizer,
    source: str,
    seq_len: int = 128,
    add_bos: bool = False,
    batch_size: int = 8,
    max_windows: int | None = None,
    provider: str | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> Perplexity:
    """perplexity() through an ONNX export in onnxruntime (its tokenizer when `tokenizer` is None)."""
    import numpy as np

    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(find_onnx_model(onnx_dir).parent)
    windows = _windows(tokenizer, source, seq_len, add_bos, max_windows)
    runner = load_ort_runner(onnx_dir, provider, threads)

    def logits_of(x):
        x = x.numpy()
        pos = np.broadcast_to(np.arange(x.shape[1]), x.shape).copy()
        logits, _ = runner.step(x, np.ones_like(x), pos, None)
        return torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))

    try:
        return _score(windows, logits_of, batch_size, "perplexity (onnx)", progress, seq_len, source)
    finally:
        runner.close()


def is_onnx_export(path) -> bool:
    p = Path(str(path))
    return p.is_dir() and (p / "model.onnx").is_file()


def evaluate(
    model,
    ppl: str | list[str] | None = ("wikitext2",),
    seq_len: int = 128,
    add_bos: bool | None = None,
    tasks: str | list[str] | None = None,
    limit: int | float | None = None,
    include_path: str | list[str] | None = None,
    batch_size: int = 8,
    max_windows: int | None = None,
    num_fewshot: int = 0,
    load=None,
    progress: bool = True,
) -> dict:
    """Perplexity on each source and, when tasks are given, zero-shot accuracy through lm-eval.

    `model` is a checkpoint path / hub id or a shortened Loaded; add_bos None means "if the family needs it"
    (Gemma). Returns {"model", "seq_len", "add_bos", "perplexity": {source: {...}}, "zeroshot": {...}}.
    """

    if isinstance(ppl, str):
        ppl = [s for s in ppl.split(",") if s]
    ppl = list(ppl or [])
    if not ppl and tasks is None:
        raise UsageError("nothing to evaluate: pass --ppl SOURCE[,SOURCE] and/or --tasks")
    if seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2 tokens, got {seq_len}")
    for s in ppl:
        if s not in NAMED_SOURCES and not Path(s).is_file():
            raise UsageError(f"text source {s} not found: pass a text file or one of {', '.join(NAMED_SOURCES)}")
        check_named_source(s)
        if Path(s).is_file():
            read_text_file(s)  # binary or not UTF-8: refused before the model loads

    config = model.model.config if isinstance(model, Loaded) else load_config(str(model))
    check_length(config, seq_len, "--seq-len")
    if not isinstance(model, Loaded) and is_onnx_export(model):  # the exported artifact, through onnxruntime
        if tasks is not None:
            raise UsageError("zero-shot tasks run on a PyTorch model; pass the checkpoint, or drop --tasks")
        from transformers import AutoConfig, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model))
        add_bos = family_for(AutoConfig.from_pretrained(str(model))).needs_bos if add_bos is None else add_bos
        out = {"model": str(model), "runtime": "onnxruntime", "seq_len": seq_len, "add_bos": add_bos,
               "perplexity": {}}  # fmt: skip
        for s in ppl:
            r = perplexity_onnx(model, tok, s, seq_len, add_bos, batch_size, max_windows, progress=progress)
            out["perplexity"][s] = r.to_dict()
        return out
    loaded = model if isinstance(model, Loaded) else load_model(str(model), load)
    if add_bos is None:
        add_bos = family_for(loaded.model.config).needs_bos
    out = {"model": str(loaded.source), "seq_len": seq_len, "add_bos": add_bos, "perplexity": {}}
    for s in ppl:
        r = perplexity(loaded.model, loaded.tokenizer, s, seq_len, add_bos, batch_size, max_windows, progress)
        out["perplexity"][s] = r.to_dict()
    if tasks is not None:
        out["zeroshot"] = zeroshot(
            loaded.model, loaded.tokenizer, tasks, limit, include_path, batch_size, num_fewshot, add_bos
        )
    return out


_SPLITS = ("train", "valid", "validation", "dev", "test")


def _lines(text: str) -> set[str]:
    return {ln.strip() for ln in text.splitlines() if len(ln.strip()) >= 40}


def overlap_notes(eval_source: str, others: dict[str, str]) -> list[str]:
    """Where the evaluation text is not held out from the calibration / retraining data `others` ({role: source}):
    the same file, a text sharing its lines (a slice of it), another split of the same corpus (a file beside it named
    train/valid/test, or the Hugging Face dataset a named source comes from). One sentence per finding."""
    notes = []
    ep = Path(eval_source)
    e_dataset = NAMED_SOURCES[eval_source][0] if eval_source in NAMED_SOURCES else None
    e_lines = None
    for role, src in others.items():
        if not src:
            continue
        sp = Path(src)
        if src.startswith("hf:"):
            name = src[3:].split(":")[0]
            if e_dataset and name == e_dataset:
                notes.append(f"the evaluation text ({eval_source}) is from the same corpus as the {role} data ({src})")
            continue
        if not (ep.is_file() and sp.is_file()):
            continue
        if ep.resolve() == sp.resolve() or ep.read_bytes() == sp.read_bytes():
            notes.append(f"the evaluation text is the same file as the {role} data ({src})")
            continue
        e_lines = _lines(read_text(str(ep))) if e_lines is None else e_lines
        o_lines = _lines(sp.read_text(encoding="utf-8", errors="replace"))
        shared = len(e_lines & o_lines)
        if shared and shared >= 0.01 * min(len(e_lines), len(o_lines)):
            notes.append(f"the evaluation text shares {shared} lines with the {role} data ({src}): a slice of it")
        elif (
            ep.parent.resolve() == sp.parent.resolve()
            and any(s in ep.name.lower() for s in _SPLITS)
            and any(s in sp.name.lower() for s in _SPLITS)
        ):
            notes.append(f"the evaluation text ({ep.name}) is another split of the same corpus as the {role} data "
                         f"({sp.name}): its perplexity measures domain adaptation too")  # fmt: skip
    return notes
