"""The converter's two user-facing steps, score and prune, and their options (ScoreOptions, PlanOptions: the
same objects the CLI's flags are generated from)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from shortened.converter import surgery
from shortened.converter.criteria import CRITERIA, BlockScores, check_criterion, protected_blocks, score_blocks
from shortened.converter.pruning import (
    blocks_for_ratio,
    check_ratio,
    check_scores_match,
    choose_blocks,
    load_scores,
    write_pruning_record,
)
from shortened.converter.recovery import DEFAULT_RIDGE, ORDERS, RECOVER, RECOVER_SAMPLES, fold
from shortened.converter.selection import SELECTIONS, check_plan, plan_removal
from shortened.data import CalibSpec, load_calibration
from shortened.errors import UsageError
from shortened.io import (
    atomic_dir,
    atomic_file,
    check_output_dir,
    check_output_file,
    fingerprint_path,
    output_key,
    up_to_date,
    write_json,
)
from shortened.model.blocks import remove_blocks
from shortened.model.checkpoint import save_checkpoint
from shortened.model.families import num_blocks
from shortened.model.loading import Loaded, LoadOptions, check_length, load_config, load_model
from shortened.options import apply, option
from shortened.plots import plot_block_scores

log = logging.getLogger(__name__)


@dataclass
class ScoreOptions:
    """How blocks are scored and which may go; shared by score, prune and sweep (and their flags)."""

    criterion: str | None = option(None, "block-importance criterion (prune: scores with it "
                                   "when given no --scores)", choices=CRITERIA)  # fmt: skip
    iterative: bool = option(False, "remove one block at a time and rescore (SLEB-style)")
    protect: list[int] | None = option(None, "blocks never removed (default 0,1,2,3,-2,-1)")
    no_protect: bool = option(False, "every block is a candidate")
    micro_batch: int = option(10, "calibration samples per forward pass", min=1)


@dataclass
class PlanOptions:
    """Which set of k blocks goes (selection.py) and the training-free map that replaces it (recovery.py).
    Defaults: prune's and sweep's (top-k and spans, linear recovery wherever there is calibration text; without it,
    the criterion's top-k); the paper's path is select topk, recover none (score's default, SCORE_PLAN).
    Measured in benchmarks/bench_recovery.py."""

    select: str = option("auto", "topk: the criterion's order; span: best contiguous span; iterative: SLEB order; "
                         "best: all of them, scored by calibration perplexity after recovery; auto: top-k and spans "
                         "with --calib, no iterative order (it costs about k criterion passes)",
                         choices=("auto", *SELECTIONS))  # fmt: skip
    recover: str = option("auto", "linear: a least-squares map per removed run, folded into the kept block before "
                          "it (ReplaceMe); auto: linear with --calib where the family allows",
                          choices=RECOVER)  # fmt: skip
    recover_calib: str | CalibSpec | None = option(None, "fitting text for the recovery (default: the --calib "
                                                   "source, other windows)")  # fmt: skip
    recover_samples: int = option(RECOVER_SAMPLES, "fitting windows of --seq-len tokens", min=1)
    recover_order: str = option("best", "fit the runs front to back on the model being pruned, each on the "
                                "unpruned model, or both and keep the better", choices=ORDERS)  # fmt: skip
    ridge: float = option(DEFAULT_RIDGE, "ridge term toward T = I (no change), relative to mean(diag MᵀM)")
    recover_always: bool = option(False, "prune: fold the map in even where it raises the calibration perplexity "
                                  "(default: where it helps)")  # fmt: skip


SCORE_PLAN = PlanOptions(select="topk", recover="none")  # score only plans when asked


def model_fingerprint(source: str, config) -> dict:
    p = Path(source)
    fp = fingerprint_path(p) if p.exists() else {"hub_id": source}
    return {**fp, "model_type": config.model_type, "num_blocks": num_blocks(config)}


def score(
    model: str | Loaded,
    calib: CalibSpec | None = None,
    *,
    opts: ScoreOptions | None = None,
    plan: PlanOptions | None = None,
    num_remove: int | None = None,
    ratio: float | None = None,
    load: LoadOptions | None = None,
    out: str | Path | None = None,
    plot: bool = True,
    progress: bool = True,
    force: bool = False,
    **settings,
) -> BlockScores:
    """Score every block of a model (criterion default ppl); optionally write scores.json (and scores.png beside
    it). With a selection other than topk (or a recovery), the candidate sets of `num_remove` blocks and their
    scores go in `selection`. settings: ScoreOptions / PlanOptions fields by name (criterion="bi", protect=[0])."""
    opts, plan = apply([opts or ScoreOptions(), plan or SCORE_PLAN], settings, "score")
    criterion = opts.criterion or "ppl"
    src = model.source if isinstance(model, Loaded) else model
    if out is not None:
        inputs = {"model": src, "calibration": calib.source if calib is not None else None}
        check_output_file(out, force, inputs)
        check_output_file(Path(out).with_suffix(".png"), force, inputs) if plot else None
    if calib is not None:
        calib.validate()
    if isinstance(model, Loaded):
        loaded = model
        config = model.model.config
    else:
        config = load_config(model, (load or LoadOptions()).trust_remote_code)
    if calib is not None:
        check_length(config, calib.seq_len, "--seq-len")
    select, recover = plan.select, plan.recover
    planned = select != "topk" or recover != "none"
    if planned:
        select, recover, fit_spec = check_plan(plan, calib, config)
        planned = select != "topk" or recover != "none"
        if planned and not num_remove and not (ratio and 0 < ratio < 1):
            raise UsageError(f"--select {select} scores sets of blocks: say how many with --remove N or --ratio R")
    if not isinstance(model, Loaded):
        loaded = load_model(model, load, tokenizer=True if calib is not None else "optional")
    n = num_blocks(loaded.model.config)
    if opts.iterative and num_remove is None and ratio is not None:
        check_ratio(ratio)
        num_remove = blocks_for_ratio(ratio, n)
    batch = load_calibration(calib, loaded.tokenizer) if calib is not None else None
    result = score_blocks(loaded.model, criterion, batch, opts.protect, opts.no_protect, opts.iterative, num_remove,
                          opts.micro_batch, progress)  # fmt: skip
    result.model = model_fingerprint(loaded.source, loaded.model.config)
    if planned:
        k = num_remove or blocks_for_ratio(ratio, n)
        protected = protected_blocks(n, opts.protect, opts.no_protect)
        sel = plan_removal(loaded, result, k, None, select, recover, calib, fit_spec, protected, opts.micro_batch,
                           plan.ridge, plan.recover_order, progress)  # fmt: skip
        result.selection = sel.to_dict()
    if out is not None:
        save_scores(result, out, plot, force=force)
    return result


def save_scores(result: BlockScores, out: str | Path, plot: bool = True, force: bool = True) -> None:
    """scores.json (and scores.png), each written whole and recorded as this tool's output."""
    out = Path(out)
    with atomic_file(out, force) as tmp:
        write_json(tmp, result.to_dict(), atomic=False)
    if plot:
        with atomic_file(out.with_suffix(".png"), force) as tmp:
            plot_block_scores(result, tmp, removed=None if not result.iterative else result.removal_order)


def _check_prune(src, load_opts, calib, scores, remove, ratio, blocks, opts, plan):
    """Everything prune can check before any weights are read; returns the config, the scores (read from a
    file), the protected blocks and the checked plan (select, recover, fit_spec)."""
    criterion, protect, no_protect = opts.criterion, opts.protect, opts.no_protect
    config = load_config(src, load_opts.trust_remote_code)
    if calib is not None:
        check_length(config, calib.seq_len, "--seq-len")
    n = num_blocks(config)
    protected = protected_blocks(n, protect, no_protect)
    if sum(x is not None for x in (remove, ratio, blocks)) != 1:
        raise UsageError("say how many blocks to remove with exactly one of --remove N, --ratio R or --blocks LIST")
    if blocks is None and scores is None and criterion is None:
        raise UsageError("choosing blocks by count needs scores: pass --scores FILE or --criterion NAME")
    # validate everything before any weights are read
    if blocks is not None:
        choose_blocks(None, n, blocks=blocks, protected=protected)
    else:
        candidates = [i for i in range(n) if i not in protected]
        choose_blocks(candidates, n, remove, ratio, None, protected)  # counts, ranges, protection
    if isinstance(scores, (str, Path)):
        scores = load_scores(scores)
        check_scores_match(scores, config)
    if scores is None and blocks is None:
        check_criterion(criterion, calib is not None, opts.iterative)
    if calib is not None:
        calib.validate()
    removable = set(blocks or []) | (set(range(n)) - protected)
    select, recover, fit_spec = check_plan(plan, calib, config, removable)
    return config, scores, protected, select, recover, fit_spec


def _save_pruned(out, force, inputs, key, res, src, n, removed, scores, selection, loaded, load_opts, progress):
    """The checkpoint (by tensor surgery when `loaded` is None, else the model in memory), pruning.json and
    the scores with their plot, in `out` once complete."""
    by_surgery = loaded is None
    with atomic_dir(out, force, inputs, key=key, result=res) as tmp:
        if by_surgery:
            surgery.cut_checkpoint(src, tmp, removed, load_opts, progress)
        else:
            save_checkpoint(loaded.model, loaded.tokenizer, tmp)
        write_pruning_record(tmp, src, n, removed, scores, selection)
        if scores is not None:
            write_json(tmp / "scores.json", scores.to_dict())

            plot_block_scores(scores, tmp / "scores.png", removed=removed)


def prune(
    model: str,
    out: str | Path,
    *,
    scores: str | Path | BlockScores | None = None,
    calib: CalibSpec | None = None,
    remove: int | None = None,
    ratio: float | None = None,
    blocks: list[int] | None = None,
    opts: ScoreOptions | None = None,
    plan: PlanOptions | None = None,
    load: LoadOptions | None = None,
    force: bool = False,
    progress: bool = True,
    **settings,
) -> dict:
    """Remove blocks and save a standard checkpoint to `out` (which appears only when complete).

    How many: exactly one of remove, ratio or blocks; which: from `scores`, or scored here with opts.criterion.
    plan.select: topk (the criterion's order), span, iterative or best (candidate sets scored by calibration
    perplexity after recovery, selection.py); plan.recover: none or linear (recovery.py), fitted on
    `recover_samples` windows of `recover_calib` (default: the --calib source with seed + 1, so not the scoring
    windows), and folded in only where it lowers the calibration perplexity (`recover_always`: regardless).
    settings: ScoreOptions / PlanOptions fields by name (blocks=[2], no_protect=True, recover="none")."""
    opts, plan = apply([opts or ScoreOptions(), plan or PlanOptions()], settings, "prune")
    key_settings = {k: v for k, v in locals().items() if k not in ("out", "force", "progress", "settings")}
    criterion, micro_batch = opts.criterion, opts.micro_batch
    load_opts = load or LoadOptions()
    src = model
    inputs = {"model": src, "calibration": calib.source if calib is not None else None,
              "scores": scores if isinstance(scores, (str, Path)) else None}  # fmt: skip
    recovery_calib = getattr(plan.recover_calib, "source", plan.recover_calib)
    key = output_key({**inputs, "recovery calibration": recovery_calib}, key_settings)
    if (done := up_to_date(out, key, force)) is not None:
        return done
    check_output_dir(out, force, inputs)
    config, scores, protected, select, recover, fit_spec = _check_prune(src, load_opts, calib, scores, remove, ratio,
                                                                         blocks, opts, plan)  # fmt: skip
    n = num_blocks(config)
    planned = recover != "none" or (select != "topk" and blocks is None)
    loaded = None
    if blocks is None and scores is None:
        loaded = load_model(src, load_opts, tokenizer=True if calib is not None or planned else "optional")
        num = remove if remove is not None else (blocks_for_ratio(ratio, n) if ratio and 0 < ratio < 1 else None)
        it = opts.iterative or (planned and select in ("iterative", "best") and criterion == "ppl")  # step 1 = ppl's
        scores = score(loaded, calib, opts=dataclasses.replace(opts, iterative=it), plan=SCORE_PLAN, num_remove=num,
                       ratio=ratio, progress=progress)  # fmt: skip
    order = [i for i in scores.removal_order if i not in protected] if scores else None
    removed = choose_blocks(order, n, remove, ratio, blocks, protected)
    selection = None
    if planned:  # candidate sets scored after recovery (selection.py); the chosen map folded in before the cut
        loaded = loaded or load_model(src, load_opts, tokenizer=True)
        selection = plan_removal(loaded, scores, len(removed), blocks, select, recover, calib, fit_spec,
                                 protected, micro_batch, plan.ridge, plan.recover_order, progress,
                                 plan.recover_always)  # fmt: skip
        removed = selection.best.blocks
        if selection.best.recovered:
            fold(loaded.model, selection.best.recovery.maps)
        if scores is not None:
            scores.selection = selection.to_dict()
    folded = selection is not None and selection.best.recovered
    # nothing needs the model in memory (any more): cut the safetensors shard by shard (peak memory ~ one shard)
    by_surgery = not folded and surgery.applies(src, load_opts, config)
    log.info("removing blocks %s of %d (%s)", removed, n, "tensor surgery" if by_surgery else "in memory")
    if by_surgery:
        loaded = None  # scored (maybe offloaded) model freed before the copy
    else:
        loaded = loaded or load_model(src, load_opts, tokenizer="optional")
        remove_blocks(loaded.model, removed)
    res = {"out": str(out), "removed": removed, "num_blocks": n, "kept": n - len(removed),
           "method": "surgery" if by_surgery else "in_memory"}  # fmt: skip
    if selection is not None:
        res.update(selected_by=selection.chosen, recovery="linear" if selection.best.recovered else "none")
    _save_pruned(out, force, inputs, key, res, src, n, removed, scores, selection, loaded, load_opts, progress)
    return res
