"""Removing decoder blocks: the result is a standard checkpoint of the same architecture with fewer layers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from shortened import __version__
from shortened.converter.criteria import BlockScores
from shortened.errors import UsageError
from shortened.io import write_json
from shortened.model.families import num_blocks

log = logging.getLogger(__name__)


def choose_blocks(
    removal_order: list[int] | None,
    n_blocks: int,
    remove: int | None = None,
    ratio: float | None = None,
    blocks: list[int] | None = None,
    protected: set[int] = frozenset(),
) -> list[int]:
    """Which blocks (original numbering) to remove: an explicit list, or the first N of the removal order."""
    given = sum(x is not None for x in (remove, ratio, blocks))
    if given != 1:
        raise UsageError("say how many blocks to remove with exactly one of --remove N, --ratio R or --blocks LIST")
    if blocks is not None:
        if len(set(blocks)) != len(blocks):
            raise UsageError(f"--blocks has repeated indices: {blocks}")
        bad = [b for b in blocks if not 0 <= b < n_blocks]
        if bad:
            raise UsageError(f"--blocks {bad} out of range: the model has blocks 0..{n_blocks - 1}")
        hit = sorted(set(blocks) & set(protected))
        if hit:
            raise UsageError(f"blocks {hit} are protected (first 4, last 2); pass --no-protect to remove them")
        chosen = sorted(blocks)
    else:
        if ratio is not None:
            check_ratio(ratio)
            remove = blocks_for_ratio(ratio, n_blocks)
        if remove < 1:
            raise UsageError(f"--remove must be at least 1, got {remove}")
        if removal_order is None:
            raise UsageError("choosing blocks by count needs scores: pass --scores FILE or --criterion")
        if remove > len(removal_order):
            raise UsageError(
                f"cannot remove {remove} blocks: only {len(removal_order)} are candidates (others are protected)"
            )
        chosen = sorted(removal_order[:remove])
    if len(chosen) >= n_blocks:
        raise UsageError(f"removing all {n_blocks} blocks leaves no model; remove fewer")
    return chosen


def check_ratio(ratio: float, name: str = "--ratio", or_auto: bool = False) -> None:
    """A share of the blocks to remove lies strictly between 0 and 1 (convert's `ratio` may also be auto)."""
    if not 0 < ratio < 1:
        raise UsageError(f"{name} must be between 0 and 1 (exclusive){' or auto' if or_auto else ''}, got {ratio}")


def blocks_for_ratio(ratio: float, n_blocks: int) -> int:
    """How many of n_blocks a ratio removes: round(ratio * n_blocks), at least one."""
    return max(1, round(ratio * n_blocks))


def write_pruning_record(
    out_dir: Path, source: str, n_blocks: int, removed: list[int], scores=None, selection=None
) -> None:

    rec = {
        "tool": f"shortened {__version__}",
        "source_model": source,
        "original_num_blocks": n_blocks,
        "removed_blocks": removed,
        "kept_blocks": [i for i in range(n_blocks) if i not in removed],
        "criterion": scores.criterion if scores is not None else "manual",
        "scores": scores.to_dict() if scores is not None else None,
    }
    if selection is not None:  # selection.Selection: how the set was chosen, and the recovery folded in
        rec["selection"] = {k: v for k, v in selection.to_dict().items() if k != "candidates"}
        best = selection.best
        rec["recovery"] = best.recovery.record() if best.recovered else {"method": "none"}
        if best.recovery is not None and not best.recovered:
            rec["recovery"]["not_folded"] = "the fitted map raised the calibration perplexity, so it was left out"
        rec["calibration_ppl"] = {"without_recovery": best.calib_ppl_no_recovery, "with_recovery": best.calib_ppl}
    write_json(out_dir / "pruning.json", rec)


def load_scores(path) -> BlockScores:  # noqa: F821

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"scores file {path} not found; make one with `shortened score`")
    try:
        return BlockScores.from_dict(json.loads(p.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise UsageError(f"{path} is not a scores.json written by `shortened score` ({e})") from e


def check_scores_match(scores, config) -> None:
    n = num_blocks(config)
    if len(scores.scores) != n:
        raise UsageError(f"the scores are for a model with {len(scores.scores)} blocks, this model has {n}")
