"""Choosing the removed set by what it costs: candidate sets scored by calibration perplexity after recovery.

Candidates for k removed blocks: the criterion's top-k, the iterative (SLEB) order's first k, and every
contiguous span of k candidate blocks. Each is scored from a `HiddenCache` of the unpruned model: a set whose
first change is at block s only runs blocks s.. (s-1.. with recovery, whose map sits in block s-1).

The iterative order reuses work between steps too: after removing block r, a candidate i < r's pass is the same
as in the previous step up to the input of r, so it resumes there; the chosen candidate's pass is the new model.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from shortened.converter.forward import nll_sum, run_block, tail_logits
from shortened.converter.recovery import (
    DEFAULT_RIDGE,
    RECOVER,
    HiddenCache,
    cache_hiddens,
    check_recoverable,
    fit_recovery,
    needed_depths,
    variant_ppl,
)
from shortened.data import CalibSpec, load_calibration
from shortened.errors import UsageError
from shortened.model.families import blocks_of, family_for

SELECTIONS = ("topk", "span", "iterative", "best")


def spans(candidates, k: int) -> list[list[int]]:
    """Every run of k consecutive blocks that are all candidates."""
    c = set(candidates)
    return [list(range(s, s + k)) for s in range(min(c, default=0), max(c, default=-1) - k + 2)
            if all(j in c for j in range(s, s + k))]  # fmt: skip


@torch.no_grad()
def iterative_order(model, cache: HiddenCache, candidates, k: int, progress: bool = True) -> tuple[list, list, float]:
    """SLEB-style: remove the block whose removal gives the lowest calibration perplexity, k times.

    Returns (order, steps, base ppl); steps[t] = {"removed", "scores": {block: ppl}, "base_ppl"} as
    criteria.score_blocks(iterative=True) records them, in the original numbering. Equal to rescoring the whole
    model after each removal, but a candidate before the removed block resumes from its stored pass.
    """
    n = len(blocks_of(model))
    blocks = blocks_of(model)
    removed: set[int] = set()
    cur = [dict(h) for h in cache.hiddens]  # per micro-batch: {block: its input in the current model}, n: output
    passes: dict = {}  # (mb, i) -> {j: input of block j (and n: output) with i also removed}
    base_total, count = 0.0, 0
    for mb in range(len(cache)):
        s, c = nll_sum(tail_logits(model, cur[mb][n]), cache.ids[mb], cache.masks[mb])
        base_total, count = base_total + s, count + c
    base = math.exp(base_total / count)
    order, steps, last = [], [], None
    bar = tqdm(total=k, desc="iterative ppl: removals", disable=not progress, leave=False)
    for _ in range(k):
        alive = [i for i in candidates if i not in removed]
        if not alive:
            raise UsageError(f"cannot remove {k} blocks: only {len(candidates)} are not protected")
        totals = dict.fromkeys(alive, 0.0)
        for mb in range(len(cache)):
            for i in alive:
                stored = passes.get((mb, i))
                if stored is not None and last is not None and last > i:
                    h, after = stored[last], last  # identical to last step's pass up to the input of `last`
                else:
                    stored, h, after = {}, cur[mb][i], i
                    passes[(mb, i)] = stored
                for j in range(after + 1, n):
                    if j in removed or j == i:
                        continue
                    stored[j] = h
                    h = run_block(blocks[j], h, cache.calls[mb][j])
                stored[n] = h
                totals[i] += nll_sum(tail_logits(model, h), cache.ids[mb], cache.masks[mb])[0]
        scores = {i: math.exp(totals[i] / count) for i in alive}
        r = min(alive, key=scores.get)
        steps.append({"removed": r, "scores": scores, "base_ppl": base})
        order.append(r)
        for mb in range(len(cache)):  # the chosen pass is the new model
            new = passes.pop((mb, r))
            cur[mb] = {**{j: v for j, v in cur[mb].items() if j < r}, **new}
        removed.add(r)
        passes = {key: v for key, v in passes.items() if key[1] < r}  # later candidates' inputs changed
        base, last = scores[r], r
        bar.update(1)
    bar.close()
    return order, steps, steps[0]["base_ppl"]


@dataclass
class Candidate:
    name: str
    blocks: list
    calib_ppl_no_recovery: float | None  # None: not computed (with recovery, only the winner's is)
    calib_ppl: float | None = None  # after recovery (None: no recovery asked)
    recovery: object = None  # recovery.Recovery (its maps are tensors: kept out of to_dict)
    always: bool = False  # keep the map even where it raises the calibration perplexity

    @property
    def recovered(self) -> bool:
        """The map is kept only where it lowers the calibration perplexity (it can over-fit a small sample)."""
        if self.calib_ppl is None:
            return False
        return self.always or self.calib_ppl_no_recovery is None or self.calib_ppl < self.calib_ppl_no_recovery

    @property
    def score(self) -> float:
        return self.calib_ppl if self.recovered else self.calib_ppl_no_recovery


@dataclass
class Selection:
    mode: str
    k: int
    recover: str
    candidates: list = field(default_factory=list)  # of Candidate
    chosen: str = ""
    seconds: float = 0.0

    @property
    def best(self) -> Candidate:
        return next(c for c in self.candidates if c.name == self.chosen)

    def to_dict(self) -> dict:
        cands = [
            {**{k: v for k, v in asdict(c).items() if k not in ("recovery", "always")},
             "recovery": c.recovery.record() if c.recovery is not None else None, "recovered": c.recovered}
            for c in self.candidates
        ]  # fmt: skip
        return {"mode": self.mode, "k": self.k, "recover": self.recover, "chosen": self.chosen,
                "chosen_blocks": self.best.blocks, "seconds": round(self.seconds, 2), "candidates": cands}  # fmt: skip


def candidate_sets(mode: str, k: int, candidates, topk_order=None, iterative=None) -> dict[str, list[int]]:
    """{name: blocks}. auto = best without the iterative order (which costs about k criterion passes)."""
    if mode not in (*SELECTIONS, "auto"):
        raise UsageError(f"unknown selection {mode!r}; choose one of auto, {', '.join(SELECTIONS)}")
    out = {}
    if mode in ("topk", "best", "auto") and topk_order is not None:
        out["topk"] = sorted(topk_order[:k])
    if mode in ("iterative", "best") and iterative is not None:
        out["iterative"] = sorted(iterative[:k])
    if mode in ("span", "best", "auto"):
        for s in spans(candidates, k):
            out.setdefault(f"span {s[0]}-{s[-1]}", s)
    if not out:
        raise UsageError(f"no candidate set of {k} blocks for --select {mode}: too few unprotected blocks in a row")
    return out


def score_sets(
    model, sets: dict, score_cache: HiddenCache, fit_cache: HiddenCache | None = None, recover: str = "none",
    ridge: float | None = None, order: str = "best", progress: bool = True, mode: str = "best", recovery_calib=None,
    always: bool = False, score_plain: bool = False,
) -> Selection:  # fmt: skip
    """Score every named set by calibration perplexity (after recovery where asked); the lowest wins. With recovery,
    the perplexity without it is computed for the winner only (every set with `score_plain`)."""

    t0 = time.perf_counter()
    k = len(next(iter(sets.values())))
    sel = Selection(mode, k, recover)
    seen: dict = {}
    for name, blocks in tqdm(list(sets.items()), desc="selection: candidate sets", disable=not progress, leave=False):
        key = tuple(blocks)
        if key in seen:  # e.g. top-k equal to the iterative set: scored once
            sel.candidates.append(Candidate(name, blocks, *seen[key], always=always))
            continue
        plain = variant_ppl(model, score_cache, blocks) if recover != "linear" or score_plain else None
        rec, rec_ppl = None, None
        if recover == "linear":
            r = fit_recovery(model, fit_cache, blocks, score_cache, ridge if ridge is not None else DEFAULT_RIDGE,
                             order, recovery_calib)  # fmt: skip
            rec, rec_ppl = r, r.calib_ppl[r.order]
        seen[key] = (plain, rec_ppl, rec)
        sel.candidates.append(Candidate(name, blocks, plain, rec_ppl, rec, always))
    sel.chosen = min(sel.candidates, key=lambda c: c.score).name
    if sel.best.calib_ppl_no_recovery is None:  # without recovery, scored for the winner only (saves a pass per set)
        sel.best.calib_ppl_no_recovery = variant_ppl(model, score_cache, sel.best.blocks)
        if not sel.best.recovered:  # its map does not help: compare every set without recovery too
            for c in sel.candidates:
                if c.calib_ppl_no_recovery is None:
                    c.calib_ppl_no_recovery = variant_ppl(model, score_cache, c.blocks)
            sel.chosen = min(sel.candidates, key=lambda c: c.score).name
    sel.seconds = time.perf_counter() - t0
    return sel


def fit_depths(sets: dict) -> set[int]:
    out = set()
    for b in sets.values():
        out |= needed_depths(b)
    return out


def choose_and_recover(
    model, k: int, candidates, mode: str, recover: str, score_batch, fit_batch=None, topk_order=None,
    iterative=None, blocks=None, micro_batch: int = 10, ridge: float | None = None, order: str = "best",
    progress: bool = True, always: bool = False,
) -> Selection:  # fmt: skip
    """Candidate sets for `mode` (or just `blocks` when given), each scored after recovery; returns the Selection
    whose best candidate carries the fitted maps (Candidate.recovery.maps) to fold before removing its blocks."""

    score_cache = cache_hiddens(model, score_batch, micro_batch, progress=progress)
    if blocks is not None:
        sets = {"given": sorted(blocks)}
    else:
        if mode in ("iterative", "best") and iterative is None:
            iterative = iterative_order(model, score_cache, candidates, k, progress)[0]
        sets = candidate_sets(mode, k, candidates, topk_order, iterative)
    fit_cache = None
    if recover == "linear":
        for b in sets.values():
            check_recoverable(model.config, b)
        fit_cache = cache_hiddens(model, fit_batch, micro_batch, depths=fit_depths(sets), progress=progress)
    calib = fit_batch.description if fit_batch is not None else None
    return score_sets(model, sets, score_cache, fit_cache, recover, ridge, order, progress, mode, calib, always)


def resolve(select: str, recover: str, config, have_calib: bool) -> tuple[str, str]:
    """select auto: top-k and every span (best without the costly iterative order) when there is calibration text,
    else topk; recover auto: linear when there is calibration text and the family can fold a map, else none."""

    if select not in (*SELECTIONS, "auto"):
        raise UsageError(f"unknown selection {select!r}; choose one of auto, {', '.join(SELECTIONS)}")
    if recover not in RECOVER:
        raise UsageError(f"unknown recovery {recover!r}; choose one of {', '.join(RECOVER)}")
    if select == "auto" and not have_calib:
        select = "topk"
    if recover == "auto":
        recover = "linear" if have_calib and not family_for(config).linear_recovery_refusal else "none"
    return select, recover


def check_plan(plan, calib, config, removable=None):
    """Validate the selection/recovery options (steps.PlanOptions) before any weights are read; returns (select,
    recover, fit spec). removable: the blocks that may go; recover auto with block 0 among them is none (no kept
    block before it to fold a map into)."""

    recover = plan.recover
    if recover == "auto" and removable is not None and 0 in removable:
        recover = "none"
    select, recover = resolve(plan.select, recover, config, calib is not None)
    if (select != "topk" or recover != "none") and calib is None:
        raise UsageError(
            f"--select {select} / --recover {recover} score removal sets on calibration text: pass --calib FILE "
            "(or --select topk --recover none)"
        )
    if recover == "none":
        return select, recover, None
    check_recoverable(config, [])
    if isinstance(plan.recover_calib, CalibSpec):
        spec = plan.recover_calib
    else:  # its own windows: another seed, so the sets are scored on windows the maps were not fitted on
        spec = CalibSpec(plan.recover_calib or calib.source, plan.recover_samples, calib.seq_len, calib.seed + 1,
                         calib.add_bos, calib.split, calib.text_field)  # fmt: skip
    spec.validate()
    return select, recover, spec


def plan_removal(loaded, scores, k: int, blocks, select, recover, calib, fit_spec, protected, micro_batch=10,
                 ridge=None, order="best", progress=True, always=False) -> Selection:  # fmt: skip
    """prune()'s planning step: calibration batches, the criterion's orders, then choose_and_recover."""

    n = len(blocks_of(loaded.model))
    candidates = [i for i in range(n) if i not in protected]
    score_batch = load_calibration(calib, loaded.tokenizer)
    fit_batch = load_calibration(fit_spec, loaded.tokenizer) if recover == "linear" else None
    topk, it = None, None
    if scores is not None:
        if scores.iterative and scores.criterion == "ppl" and scores.scores:  # first step = the plain ppl scores
            topk = sorted(candidates, key=lambda i: scores.scores[i])
        else:
            topk = [i for i in scores.removal_order if i not in protected]
        if scores.iterative and len(scores.removal_order) >= k:
            it = [i for i in scores.removal_order if i not in protected]
    return choose_and_recover(loaded.model, k, candidates, select, recover, score_batch, fit_batch, topk,
                              it, blocks, micro_batch, ridge, order, progress, always)  # fmt: skip
