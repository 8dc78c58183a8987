"""Block-importance criteria. Every criterion returns one score per block: lower = less important.

- ppl:       perplexity of the model with that one block removed (fast: reuses the full model's prefix)
- taylor:    sum over the block's parameters of |w * dL/dw|, L = mean next-token cross-entropy
- magnitude: sum over the block's parameters of |w|
- bi:        Block Influence (ShortGPT): 1 - mean cos(block input, block output) over real tokens

`iterative=True` (SLEB-style) removes the least important block, rescores the rest, and repeats.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from shortened.converter import offload
from shortened.converter.forward import capture_block_inputs, device_of, micro_batches, nll_sum, run_block, tail_logits
from shortened.converter.recovery import cache_hiddens
from shortened.converter.selection import iterative_order
from shortened.errors import UsageError
from shortened.model.blocks import remove_blocks
from shortened.model.families import blocks_of

CRITERIA = ("ppl", "taylor", "magnitude", "bi")
DATA_DRIVEN = ("ppl", "taylor", "bi")


def protected_blocks(num_blocks: int, protect: list[int] | None = None, no_protect: bool = False) -> set[int]:
    """The paper's "+" heuristic by default: the first 4 and the last 2 blocks are never removed."""
    if no_protect:
        return set()
    if protect is None:
        protect = [0, 1, 2, 3, -2, -1]
    out = set()
    for i in protect:
        j = i + num_blocks if i < 0 else i
        if not 0 <= j < num_blocks:
            raise UsageError(f"protected block {i} is out of range for a model with {num_blocks} blocks")
        out.add(j)
    return out


@dataclass
class BlockScores:
    criterion: str
    scores: list  # one per block in the model's original numbering; None where not computed
    candidates: list[int]
    removal_order: list[int]  # least important first
    iterative: bool = False
    steps: list = field(default_factory=list)  # iterative: the scores seen at each step
    base_ppl: float | None = None
    calibration: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    seconds: float = 0.0
    selection: dict = field(default_factory=dict)  # selection.Selection.to_dict(): candidate sets and their scores

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BlockScores:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _ppl(total: float, count: int) -> float:
    return math.exp(total / count)


# ---------------------------------------------------------------------------------------------
# Criteria, each on the current model. `candidates` index the model as it is now.


@torch.no_grad()
def ppl_scores(model, batch, candidates, micro_batch: int = 10, progress: bool = True):
    """Leave-one-out perplexity without recomputing the shared prefix.

    The input of block i in the full model is also its input with block i removed, so removing i only
    changes blocks i+1..L: those run again from the cached input, for all samples of a micro-batch at once.
    """
    blocks = blocks_of(model)
    totals = {i: 0.0 for i in candidates}
    base_total, count = 0.0, 0
    steps = len(candidates) * math.ceil(batch.input_ids.shape[0] / micro_batch)
    bar = tqdm(total=steps, desc="ppl: blocks", disable=not progress, leave=False)
    for ids, mask in micro_batches(batch, micro_batch):
        hiddens, calls = capture_block_inputs(model, ids, mask)
        s, c = nll_sum(tail_logits(model, hiddens[-1]), ids, mask)
        base_total += s
        count += c
        for i in candidates:
            h = hiddens[i]
            for j in range(i + 1, len(blocks)):
                h = run_block(blocks[j], h, calls[j])
            totals[i] += nll_sum(tail_logits(model, h), ids, mask)[0]
            bar.update(1)
        del hiddens, calls
    bar.close()
    return {i: _ppl(totals[i], count) for i in candidates}, _ppl(base_total, count)


@torch.no_grad()
def ppl_scores_naive(model, batch, candidates, micro_batch: int = 10, progress: bool = True):
    """The slow reference: a full forward pass per candidate with that block made an identity."""
    blocks = blocks_of(model)
    out = {}
    dev = device_of(model)
    for i in tqdm(candidates, desc="ppl (naive): blocks", disable=not progress, leave=False):
        handle = blocks[i].register_forward_hook(_identity_hook, with_kwargs=True)
        total, count = 0.0, 0
        try:
            for ids, mask in micro_batches(batch, micro_batch):
                logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
                s, c = nll_sum(logits, ids, mask)
                total, count = total + s, count + c
        finally:
            handle.remove()
        out[i] = _ppl(total, count)
    return out


def _identity_hook(module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def taylor_scores(model, batch, micro_batch: int = 2, progress: bool = True):
    """sum |w * dL/dw| per block; gradients of the mean token NLL over the whole set, in micro-batches."""
    blocks = blocks_of(model)
    block_params = {id(p) for b in blocks for p in b.parameters()}
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in block_params)  # no gradient memory for embeddings and head
        p.grad = None
    total_tokens = int((batch.attention_mask[:, :-1] * batch.attention_mask[:, 1:]).sum())
    dev = device_of(model)
    try:
        for ids, mask in tqdm(
            list(micro_batches(batch, micro_batch)), desc="taylor: micro-batches", disable=not progress, leave=False
        ):
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
            logits = logits[:, :-1].float()
            labels = ids[:, 1:].to(dev)
            valid = (mask[:, :-1] * mask[:, 1:]).to(dev).bool()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
            (nll[valid].sum() / total_tokens).backward()
        with torch.no_grad():
            scores = [
                float(sum((p * p.grad).abs().sum().double() for p in b.parameters() if p.grad is not None))
                for b in blocks
            ]
    finally:
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(saved[n])
    return scores


@torch.no_grad()
def magnitude_scores(model):
    return [float(sum(p.detach().abs().sum().double() for p in b.parameters())) for b in blocks_of(model)]


@torch.no_grad()
def bi_scores(model, batch, micro_batch: int = 10, progress: bool = True):
    """1 - mean over real tokens of cos(input of block i, output of block i)."""
    n_blocks = len(blocks_of(model))
    sums = torch.zeros(n_blocks, dtype=torch.float64)
    count = 0
    for ids, mask in micro_batches(batch, micro_batch):
        hiddens, _ = capture_block_inputs(model, ids, mask)
        valid = mask.to(hiddens[0].device).bool()
        for i in range(n_blocks):
            cos = torch.nn.functional.cosine_similarity(hiddens[i].float(), hiddens[i + 1].float(), dim=-1)
            sums[i] += cos[valid].double().sum().cpu()
        count += int(valid.sum())
    return [float(1.0 - s / count) for s in sums]


def _score_current(model, criterion, batch, candidates, micro_batch, progress):
    """Scores on the current model, for every block (None where a criterion skips non-candidates)."""
    n = len(blocks_of(model))
    base = None
    if criterion == "ppl":
        d, base = ppl_scores(model, batch, candidates, micro_batch, progress)
        return [d.get(i) for i in range(n)], base

    if criterion == "taylor":
        taylor = offload.taylor_scores_offloaded if offload.is_offloaded(model) else taylor_scores
        return taylor(model, batch, max(1, micro_batch // 5), progress), base
    if criterion == "magnitude":
        return (offload.magnitude_scores_offloaded if offload.is_offloaded(model) else magnitude_scores)(model), base
    if criterion == "bi":
        return bi_scores(model, batch, micro_batch, progress), base
    raise UsageError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")


def check_criterion(criterion: str, calibrated: bool, iterative: bool = False) -> None:
    """A known criterion, given calibration data where it needs some; iterative removal needs a data-driven one."""
    if criterion not in CRITERIA:
        raise UsageError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if criterion in DATA_DRIVEN and not calibrated:
        raise UsageError(f"criterion {criterion} needs calibration data; pass --calib FILE")
    if iterative and criterion not in DATA_DRIVEN:
        raise UsageError(f"iterative mode needs a data-driven criterion ({', '.join(DATA_DRIVEN)}), not {criterion}")


def score_blocks(
    model,
    criterion: str,
    batch=None,
    protect: list[int] | None = None,
    no_protect: bool = False,
    iterative: bool = False,
    num_remove: int | None = None,
    micro_batch: int = 10,
    progress: bool = True,
    reuse: bool = True,
) -> BlockScores:
    """Score every block of `model`. Iterative mode modifies a copy of the model, never `model` itself; with the
    ppl criterion it reuses cached passes (selection.iterative_order; `reuse=False`: rescore from scratch)."""

    check_criterion(criterion, batch is not None, iterative)
    n = len(blocks_of(model))
    protected = protected_blocks(n, protect, no_protect)
    candidates = [i for i in range(n) if i not in protected]
    if not candidates:
        raise UsageError("every block is protected, so none can be scored for removal; change --protect")
    t0 = time.perf_counter()
    calib = batch.description if batch is not None else {}
    if not iterative:
        scores, base = _score_current(model, criterion, batch, candidates, micro_batch, progress)
        order = sorted(candidates, key=lambda i: scores[i])
        return BlockScores(
            criterion, scores, candidates, order, False, [], base, calib, seconds=time.perf_counter() - t0
        )

    if not num_remove or num_remove < 1:
        raise UsageError("iterative scoring needs the number of blocks to remove (--remove N or --ratio R)")
    if num_remove > len(candidates):
        raise UsageError(f"cannot remove {num_remove} blocks: only {len(candidates)} are not protected")
    if criterion == "ppl" and reuse:
        cache = cache_hiddens(model, batch, micro_batch)
        order, steps, base0 = iterative_order(model, cache, candidates, num_remove, progress)
        first = [steps[0]["scores"].get(i) for i in range(n)]
        secs = time.perf_counter() - t0
        return BlockScores(criterion, first, candidates, order, True, steps, base0, calib, seconds=secs)
    import copy

    work = copy.deepcopy(model)
    alive = list(range(n))  # original index of each block of `work`
    order, steps, first, base0 = [], [], None, None
    for _ in tqdm(range(num_remove), desc=f"iterative {criterion}: removals", disable=not progress):
        cand_now = [k for k, orig in enumerate(alive) if orig in candidates]
        scores, base = _score_current(work, criterion, batch, cand_now, micro_batch, progress)
        if first is None:
            first, base0 = scores, base
        k = min(cand_now, key=lambda k: scores[k])
        steps.append({"removed": alive[k], "scores": {alive[j]: scores[j] for j in cand_now}, "base_ppl": base})
        order.append(alive[k])
        remove_blocks(work, [k])
        del alive[k]
    del work
    return BlockScores(criterion, first, candidates, order, True, steps, base0, calib, seconds=time.perf_counter() - t0)
