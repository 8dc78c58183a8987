"""The speed step's interval logic on synthetic timings (no timing of real runs is asserted anywhere)."""

from __future__ import annotations

import numpy as np
import pytest

from shortened.validators.speed_report import build_rows, flag_above_ideal
from shortened.validators.stats import bootstrap_ci, pairwise_speedups, resolved, speedup_stats


def _runs(base, cand, steps=4):
    """{name: [{"prefill_s", "decode_s"}]} with every decode step of a repetition taking the given time."""
    return {
        "original": [{"prefill_s": 10 * t, "decode_s": [t] * steps} for t in base],
        "candidate": [{"prefill_s": 10 * t, "decode_s": [t] * steps} for t in cand],
    }


def test_bootstrap_interval_covers_the_true_speedup_and_narrows_with_repetitions():
    rng = np.random.default_rng(0)
    widths = []
    for n in (5, 20, 80):
        base = 0.010 * (1 + 0.05 * rng.standard_normal(n))
        cand = base / 1.2 * (1 + 0.05 * rng.standard_normal(n))  # true speedup 1.2, 5% noise per pair
        lo, hi = bootstrap_ci(pairwise_speedups(base, cand))
        assert lo < 1.2 < hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert bootstrap_ci([1.1]) == (float("-inf"), float("inf"))  # one pair: no interval


def test_verdicts_faster_slower_and_not_resolved():
    assert speedup_stats([1.20, 1.22, 1.19, 1.21, 1.20])["verdict"] == "faster"
    assert speedup_stats([0.80, 0.82, 0.79, 0.81])["verdict"] == "slower"
    noisy = speedup_stats([0.9, 1.3, 0.95, 1.25, 1.0, 1.2])  # an effect smaller than the interval
    assert noisy["verdict"] == "not resolved" and noisy["ci_low"] < 1 < noisy["ci_high"]
    one = speedup_stats([1.5])
    assert one["verdict"] == "not resolved" and one["ci_low"] is None
    assert speedup_stats([1.5, 1.51, 1.49, 1.5], ideal=1.2)["above_ideal"] is True
    assert speedup_stats([1.1, 1.3, 1.15, 1.25], ideal=1.2)["above_ideal"] is False  # within the interval


def test_resolved_needs_a_narrow_interval_for_every_model():
    rng = np.random.default_rng(1)
    base = list(0.01 * (1 + 0.002 * rng.standard_normal(10)))
    tight = _runs(base, [b / 1.2 for b in base])
    assert resolved(tight, "original", 0.03)
    assert not resolved(_runs(base[:2], base[:2]), "original", 0.03)  # too few pairs
    noisy_cand = [b / 1.2 * (1 + 0.3 * rng.standard_normal()) for b in base]
    noisy = _runs(base, noisy_cand)
    assert not resolved(noisy, "original", 0.03)
    noisy["width"] = tight["candidate"]
    assert not resolved(noisy, "original", 0.03)  # one unresolved model keeps the measurement going


def test_resolved_also_settles_depth_against_width():
    base = [0.01] * 12
    # candidate and width each within +-3% of their speedup over the original, but their noise runs opposite
    # ways: depth against width is neither decided nor narrow, so the measurement goes on
    e = [0.025 * (-1) ** i for i in range(12)]
    cand = [t / 1.20 * (1 + x) for t, x in zip(base, e)]
    close = _runs(base, cand)
    close["width"] = [{"prefill_s": 1.0, "decode_s": [t / 1.19 * (1 - x)] * 4} for t, x in zip(base, e)]
    dw = speedup_stats(pairwise_speedups([np.mean(r["decode_s"]) for r in close["width"]], cand))
    assert dw["verdict"] == "not resolved" and dw["ci_half_rel"] > 0.03
    assert not resolved(close, "original", 0.03)
    for alone in ("candidate", "width"):  # each passes the first rule: only the comparison keeps it going
        assert resolved({k: close[k] for k in ("original", alone)}, "original", 0.03)
    apart = _runs(base, [b / 1.2 for b in base])  # width clearly slower: decided, so resolved
    apart["width"] = [{"prefill_s": 1.0, "decode_s": [b / 1.1] * 4} for b in base]
    assert resolved(apart, "original", 0.03)
    same = _runs(base, [b / 1.2 for b in base])  # equal within the target: settled too
    wobble = [1 + 0.001 * (-1) ** i for i in range(12)]
    same["width"] = [{"prefill_s": 1.0, "decode_s": [b / 1.2 * w] * 4} for b, w in zip(base, wobble)]
    assert resolved(same, "original", 0.03)
    # narrow (+-2.5%) but straddling 1 and reaching past 1.03: what two runs once reported as "not resolved"
    # and "depth faster"; it keeps the measurement going
    e2 = [0.012 * (-1) ** i for i in range(12)]
    straddle = _runs(base, [t / 1.20 * (1 + x) for t, x in zip(base, e2)])
    straddle["width"] = [{"prefill_s": 1.0, "decode_s": [t / 1.20 * 1.018 * (1 - x)] * 4} for t, x in zip(base, e2)]
    st = speedup_stats(
        pairwise_speedups(
            [np.mean(r["decode_s"]) for r in straddle["width"]], [np.mean(r["decode_s"]) for r in straddle["candidate"]]
        ),
        equal_within=0.03,
    )
    assert st["ci_low"] < 1 < st["ci_high"] and st["ci_high"] > 1.03 and st["ci_half_rel"] <= 0.03
    assert st["verdict"] == "not resolved" and not resolved(straddle, "original", 0.03)


def test_equal_within_the_margin_is_a_verdict():
    assert speedup_stats([1.0, 1.01, 0.99, 1.0, 1.005], equal_within=0.03)["verdict"] == "equal within 3%"
    assert speedup_stats([1.0, 1.01, 0.99, 1.0, 1.005])["verdict"] == "not resolved"  # no margin, no equivalence
    assert speedup_stats([1.02, 1.03, 1.025, 1.02], equal_within=0.03)["verdict"] == "faster"  # excludes 1 first


def test_rows_carry_intervals_depth_vs_width_and_the_ideal_flag():
    base = [0.010, 0.011, 0.010, 0.012, 0.010]
    runs = _runs(base, [b / 1.5 for b in base])
    runs["width"] = [{"prefill_s": 1.0, "decode_s": [b / 1.1] * 4} for b in base]
    rows = build_rows({1: runs})
    cand = next(r for r in rows if r["model"] == "candidate")
    assert cand["decode_speedup"]["median"] == pytest.approx(1.5)
    assert cand["decode_speedup"]["ci_low"] == pytest.approx(1.5) and cand["decode_speedup"]["verdict"] == "faster"
    assert cand["depth_vs_width"]["verdict"] == "depth faster"
    assert cand["depth_vs_width"]["median"] == pytest.approx(1.5 / 1.1)
    flag_above_ideal(rows, {"candidate": {"ideal_decode_speedup": 1.19}, "width": {"ideal_decode_speedup": 1.19}})
    assert cand["decode_speedup"]["above_ideal"] is True
    assert next(r for r in rows if r["model"] == "width")["decode_speedup"]["above_ideal"] is False


def test_min_speedup_gate_uses_the_lower_end():
    from shortened.pipeline.config import ConvertConfig
    from shortened.pipeline.report import evaluate_gates

    row = {"batch": 1, "model": "candidate", "decode_speedup": {"median": 1.2, "ci_low": 1.05, "ci_high": 1.35}}
    speed = {"rows": [row]}  # the speed step's result
    cfg = ConvertConfig(min_speedup=1.1)
    gate = evaluate_gates(cfg, {"passed": True, "failures": []}, None, speed)["min_speedup"]
    assert not gate["passed"] and gate["value"] == pytest.approx(1.05)  # the median 1.2 alone would pass
    cfg.min_speedup = 1.0
    assert evaluate_gates(cfg, {"passed": True, "failures": []}, None, speed)["min_speedup"]["passed"]
