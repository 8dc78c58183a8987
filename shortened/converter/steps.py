"""The converter's two user-facing steps, callable from Python with the CLI's options: score and prune."""

from __future__ import annotations

import logging
from pathlib import Path

from shortened.converter import surgery
from shortened.converter.criteria import BlockScores, check_criterion, protected_blocks, score_blocks
from shortened.converter.pruning import (
    blocks_for_ratio,
    check_ratio,
    check_scores_match,
    choose_blocks,
    load_scores,
    write_pruning_record,
)
from shortened.converter.recovery import DEFAULT_RIDGE, RECOVER_SAMPLES, fold
from shortened.converter.selection import check_plan, plan_removal
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

log = logging.getLogger(__name__)
# prune's defaults: selection (top-k and spans) and linear recovery wherever there is --calib; without it, as before.
# The paper's path: --select topk --recover none. Measured in benchmarks/bench_recovery.py.
PRUNE_SELECT, PRUNE_RECOVER = "auto", "auto"


def model_fingerprint(source: str, config) -> dict:
    p = Path(source)
    fp = fingerprint_path(p) if p.exists() else {"hub_id": source}
    return {**fp, "model_type": config.model_type, "num_blocks": num_blocks(config)}


def score(
    model: str | Loaded,
    criterion: str = "ppl",
    calib: CalibSpec | None = None,
    protect: list[int] | None = None,
    no_protect: bool = False,
    iterative: bool = False,
    num_remove: int | None = None,
    ratio: float | None = None,
    micro_batch: int = 10,
    load: LoadOptions | None = None,
    out: str | Path | None = None,
    plot: bool = True,
    progress: bool = True,
    force: bool = False,
    select: str = "topk",
    recover: str = "none",
    recover_calib: str | CalibSpec | None = None,
    recover_samples: int = RECOVER_SAMPLES,
    recover_order: str = "best",
    ridge: float = DEFAULT_RIDGE,
) -> BlockScores:
    """Score every block of a model; optionally write scores.json (and scores.png beside it). With a selection
    other than topk (or a recovery), the candidate sets of `num_remove` blocks and their scores go in `selection`."""
    src = model.source if isinstance(model, Loaded) else model
    if out is not None:
        inputs = {"model": src, "calibration": calib.source if calib is not None else None}
        check_output_file(out, force, inputs)
        check_output_file(Path(out).with_suffix(".png"), force, inputs) if plot else None
    if calib is not None:
        calib.validate()
    check_micro_batch(micro_batch)
    if isinstance(model, Loaded):
        loaded = model
        config = model.model.config
    else:
        config = load_config(model, (load or LoadOptions()).trust_remote_code)
    if calib is not None:
        check_length(config, calib.seq_len, "--seq-len")
    planned = select != "topk" or recover != "none"
    if planned:
        select, recover, fit_spec = check_plan(select, recover, calib, recover_calib, recover_samples,
                                               recover_order, config)  # fmt: skip
        planned = select != "topk" or recover != "none"
        if planned and not num_remove and not (ratio and 0 < ratio < 1):
            raise UsageError(f"--select {select} scores sets of blocks: say how many with --remove N or --ratio R")
    if not isinstance(model, Loaded):
        loaded = load_model(model, load, tokenizer=True if calib is not None else "optional")
    n = num_blocks(loaded.model.config)
    if iterative and num_remove is None and ratio is not None:
        check_ratio(ratio)
        num_remove = blocks_for_ratio(ratio, n)
    batch = load_calibration(calib, loaded.tokenizer) if calib is not None else None
    result = score_blocks(
        loaded.model, criterion, batch, protect, no_protect, iterative, num_remove, micro_batch, progress
    )
    result.model = model_fingerprint(loaded.source, loaded.model.config)
    if planned:
        k = num_remove or blocks_for_ratio(ratio, n)
        protected = protected_blocks(n, protect, no_protect)
        sel = plan_removal(loaded, result, k, None, select, recover, calib, fit_spec, protected, micro_batch, ridge,
                           recover_order, progress)  # fmt: skip
        result.selection = sel.to_dict()
    if out is not None:
        save_scores(result, out, plot, force=force)
    return result


def check_micro_batch(micro_batch: int) -> None:
    if not isinstance(micro_batch, int) or micro_batch < 1:
        raise UsageError(f"--micro-batch must be at least 1, got {micro_batch}")


def save_scores(result: BlockScores, out: str | Path, plot: bool = True, force: bool = True) -> None:
    """scores.json (and scores.png), each written whole and recorded as this tool's output."""
    out = Path(out)
    with atomic_file(out, force) as tmp:
        write_json(tmp, result.to_dict(), atomic=False)
    if plot:
        from shortened.plots import plot_block_scores

        with atomic_file(out.with_suffix(".png"), force) as tmp:
            plot_block_scores(result, tmp, removed=None if not result.iterative else result.removal_order)


def prune(
    model: str,
    out: str | Path,
    scores: str | Path | BlockScores | None = None,
    criterion: str | None = None,
    calib: CalibSpec | None = None,
    remove: int | None = None,
    ratio: float | None = None,
    blocks: list[int] | None = None,
    protect: list[int] | None = None,
    no_protect: bool = False,
    iterative: bool = False,
    micro_batch: int = 10,
    load: LoadOptions | None = None,
    force: bool = False,
    progress: bool = True,
    select: str = PRUNE_SELECT,
    recover: str = PRUNE_RECOVER,
    recover_calib: str | CalibSpec | None = None,
    recover_samples: int = RECOVER_SAMPLES,
    recover_order: str = "best",
    ridge: float = DEFAULT_RIDGE,
    recover_always: bool = False,
) -> dict:
    """Remove blocks and save a standard checkpoint to `out` (which appears only when complete).

    select: topk (the criterion's order), span, iterative or best (candidate sets scored by calibration
    perplexity after recovery, selection.py); recover: none or linear (recovery.py), fitted on `recover_samples`
    windows of `recover_calib` (default: the --calib source with seed + 1, so not the scoring windows), and folded
    in only where it lowers the calibration perplexity (`recover_always`: regardless)."""
    settings = {k: v for k, v in locals().items() if k not in ("out", "force", "progress")}
    opts = load or LoadOptions()
    src = model
    inputs = {"model": src, "calibration": calib.source if calib is not None else None,
              "scores": scores if isinstance(scores, (str, Path)) else None}  # fmt: skip
    recovery_calib = getattr(recover_calib, "source", recover_calib)
    key = output_key({**inputs, "recovery calibration": recovery_calib}, settings)
    if (done := up_to_date(out, key, force)) is not None:
        return done
    check_output_dir(out, force, inputs)
    config = load_config(src, opts.trust_remote_code)
    check_micro_batch(micro_batch)
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
        check_criterion(criterion, calib is not None, iterative)
    if calib is not None:
        calib.validate()
    if recover == "auto" and 0 in (set(blocks or []) | (set(range(n)) - protected)):
        recover = "none"  # block 0 could be removed: no kept block before it to fold a map into
    select, recover, fit_spec = check_plan(
        select, recover, calib, recover_calib, recover_samples, recover_order, config
    )
    planned = recover != "none" or (select != "topk" and blocks is None)
    loaded = None
    if blocks is None and scores is None:
        loaded = load_model(src, opts, tokenizer=True if calib is not None or planned else "optional")
        num = remove if remove is not None else (blocks_for_ratio(ratio, n) if ratio and 0 < ratio < 1 else None)
        it = iterative or (planned and select in ("iterative", "best") and criterion == "ppl")  # step 1 = ppl's
        scores = score(loaded, criterion, calib, protect, no_protect, it, num, ratio, micro_batch, progress=progress)
    order = [i for i in scores.removal_order if i not in protected] if scores else None
    removed = choose_blocks(order, n, remove, ratio, blocks, protected)
    selection = None
    if planned:  # candidate sets scored after recovery (selection.py); the chosen map folded in before the cut
        loaded = loaded or load_model(src, opts, tokenizer=True)
        selection = plan_removal(loaded, scores, len(removed), blocks, select, recover, calib, fit_spec, protected,
                                 micro_batch, ridge, recover_order, progress, recover_always)  # fmt: skip
        removed = selection.best.blocks
        if selection.best.recovered:
            fold(loaded.model, selection.best.recovery.maps)
        if scores is not None:
            scores.selection = selection.to_dict()
    folded = selection is not None and selection.best.recovered
    # nothing needs the model in memory (any more): cut the safetensors shard by shard (peak memory ~ one shard)
    by_surgery = not folded and surgery.applies(src, opts, config)
    log.info("removing blocks %s of %d (%s)", removed, n, "tensor surgery" if by_surgery else "in memory")
    if by_surgery:
        loaded = None  # scored (maybe offloaded) model freed before the copy
    else:
        loaded = loaded or load_model(src, opts, tokenizer="optional")
        remove_blocks(loaded.model, removed)
    res = {"out": str(out), "removed": removed, "num_blocks": n, "kept": n - len(removed),
           "method": "surgery" if by_surgery else "in_memory"}  # fmt: skip
    if selection is not None:
        res.update(selected_by=selection.chosen, recovery="linear" if selection.best.recovered else "none")
    with atomic_dir(out, force, inputs, key=key, result=res) as tmp:
        if by_surgery:
            surgery.cut_checkpoint(src, tmp, removed, opts, progress)
        else:
            save_checkpoint(loaded.model, loaded.tokenizer, tmp)
        write_pruning_record(tmp, src, n, removed, scores, selection)
        if scores is not None:
            write_json(tmp / "scores.json", scores.to_dict())
            from shortened.plots import plot_block_scores

            plot_block_scores(scores, tmp / "scores.png", removed=removed)
    return res
