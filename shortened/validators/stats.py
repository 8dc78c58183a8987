"""The statistics of the speed measurement: medians and percentiles over repetitions, speedups computed pair by
pair (A_i / B_i within repetition i, never a ratio of two medians), their percentile-bootstrap interval, and the
verdict it allows ("faster" / "slower" only where the interval excludes 1; "equal within +-t" where it contains 1
and lies inside [1 - t, 1 + t])."""

from __future__ import annotations

import numpy as np


def summarize(values) -> dict:
    """Median, p10 and p90 (linear interpolation) and count of a list of numbers."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {"median": None, "p10": None, "p90": None, "n": 0}
    return {"median": float(np.median(v)), "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90)),
            "n": int(v.size)}  # fmt: skip


def bootstrap_ci(ratios, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of paired ratios (pairs resampled with replacement)."""
    r = np.asarray([x for x in ratios if x is not None], dtype=float)
    if r.size < 2:  # one pair says nothing about the spread
        return float("-inf"), float("inf")
    rng = np.random.default_rng(seed)
    meds = np.median(r[rng.integers(0, r.size, (n_boot, r.size))], axis=1)
    a = (1 - level) / 2
    return float(np.quantile(meds, a)), float(np.quantile(meds, 1 - a))


def speedup_stats(ratios, ideal: float | None = None, level: float = 0.95, equal_within: float | None = None) -> dict:
    """Median, interval, relative half-width and verdict of paired speedups.

    verdict: "faster" / "slower" when the interval lies above / below 1; "equal within N%" when it contains 1 but
    lies inside [1 - equal_within, 1 + equal_within] (an equivalence test: the difference is shown to be smaller
    than the margin); else "not resolved" (the interval is wider than the effect). above_ideal: the interval's
    lower end exceeds the FLOP ideal."""
    st = summarize(ratios)
    if st["median"] is None:
        return {**st, "ci_low": None, "ci_high": None, "ci_half_rel": None, "verdict": "not measured"}
    lo, hi = bootstrap_ci(ratios, level)
    if not np.isfinite(hi - lo):  # fewer than 2 pairs: no interval, no verdict
        return {**st, "ci_low": None, "ci_high": None, "ci_level": level, "ci_half_rel": None,
                "verdict": "not resolved"}  # fmt: skip
    half = (hi - lo) / 2 / st["median"]
    verdict = "faster" if lo > 1 else "slower" if hi < 1 else "not resolved"
    if verdict == "not resolved" and equal_within and lo >= 1 - equal_within and hi <= 1 + equal_within:
        verdict = f"equal within {equal_within * 100:g}%"
    out = {**st, "ci_low": lo, "ci_high": hi, "ci_level": level, "ci_half_rel": half, "verdict": verdict}
    if ideal:
        out["above_ideal"] = bool(lo > ideal)
    return out


def resolved(runs: dict, baseline: str, target: float) -> bool:
    """Whether the measurement can stop: every model's decode speedup over `baseline` has an interval within
    +-target (relative), and every comparison between two other models (depth against width) has a verdict: its
    interval excludes 1, or lies inside [1 - target, 1 + target] ("equal within"). A narrow interval that straddles
    1 and reaches past the margin settles nothing. Two runs that stopped on the first rule alone gave "not
    resolved" and then "depth faster" (1.034 [0.975, 1.060] after 7 repetitions, 1.037 [1.012, 1.044] after 30);
    with "narrow" as the second rule, 1.037 [0.986, 1.045] (12) and "depth faster" 1.031 [1.008, 1.043] (6).
    runs: {name: [{"decode_s": [...]}, ...]} of one batch size, repetitions paired by index."""
    decode = {name: [float(np.mean(r["decode_s"])) for r in reps] for name, reps in runs.items()}
    if len(decode[baseline]) < 3:
        return False

    def narrow(st: dict) -> bool:
        return st["ci_half_rel"] is not None and st["ci_half_rel"] <= target

    others = [n for n in decode if n != baseline]
    if not all(narrow(speedup_stats(pairwise_speedups(decode[baseline], decode[n]))) for n in others):
        return False
    for i, a in enumerate(others):
        for b in others[i + 1 :]:
            st = speedup_stats(pairwise_speedups(decode[a], decode[b]), equal_within=target)
            if st["verdict"] == "not resolved":
                return False
    return True


def pairwise_speedups(base_times, times) -> list[float]:
    """Speedup of each repetition: base_i / time_i, pairing the runs of the same repetition."""
    if len(base_times) != len(times):
        raise ValueError(f"need paired runs: {len(base_times)} vs {len(times)}")
    return [a / b for a, b in zip(base_times, times)]
