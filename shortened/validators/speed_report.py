"""The speed report: one row per (batch, model) with medians, p90 and paired speedups with their intervals, the
markdown table `shortened bench` prints, and the plot of tokens/s and speedup against batch size."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from shortened.plots import _plt
from shortened.validators.stats import pairwise_speedups, speedup_stats, summarize


@dataclass
class SpeedReport:
    backend: str
    settings: dict
    models: dict  # name -> path, kind, params, blocks, providers, memory, ideal speedups
    rows: list = field(default_factory=list)  # one per (batch, model)
    skipped: list = field(default_factory=list)
    baseline: str = "original"

    def to_dict(self) -> dict:
        return asdict(self)

    def row(self, batch: int, name: str) -> dict | None:
        return next((r for r in self.rows if r["batch"] == batch and r["model"] == name), None)

    def decode_speedup(self, batch: int, name: str = "candidate") -> float | None:
        r = self.row(batch, name)
        return None if r is None else r["decode_speedup"]["median"]

    def table(self) -> str:
        """The markdown summary: what was measured and how, a row per (batch, model), then memory per model."""
        return "\n".join(self._header() + self._speed_lines() + self._memory_lines())

    def _header(self) -> list[str]:
        s = self.settings
        reps = s.get("repetitions") or {}
        n_reps = ", ".join(f"batch {b}: {v['n']}{'' if v['resolved'] else ' (not resolved)'}"
                           for b, v in reps.items()) or s["repeats"]  # fmt: skip
        target = s.get("ci_target")
        return [
            f"backend {self.backend} on {s['device']}, prompt {s['prompt_len']}, {s['new_tokens']} new tokens, "
            f"interleaved repetitions after {s['warmup']} warm-up ({n_reps}"
            f"{f'; until every interval is within +-{target:.0%}' if target else ''}); median (p90); speedups pair "
            f"by pair against the original with their 95% bootstrap interval [low, high]",
            f"{s.get('threads')} intra-op threads per model, pinned to cores {s.get('cores')}; load average "
            f"(1, 5, 15 min) before {s.get('load_average', {}).get('before')}, after "
            f"{s.get('load_average', {}).get('after')} on {s.get('cpu_count')} CPUs (a busy machine slows all models)",
            "",
        ]

    def _speed_lines(self) -> list[str]:
        lines = [
            "| batch | model | blocks | params (M) | first token ms | decode ms/token | tokens/s | decode speedup "
            "[95% interval] | verdict | ideal | of ideal | prefill speedup |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [self._speed_line(r) for r in self.rows]
        for r in self.rows:
            dw = r.get("depth_vs_width")
            if dw:
                lines.append(f"| {r['batch']} | depth vs width | | | | | | {_fmt_ci(dw)} | {dw['verdict']} | | | |")
        for sk in self.skipped:
            lines.append(f"| {sk['batch']} | skipped: {sk['reason']} | | | | | | | | | |")
        return lines

    def _speed_line(self, r: dict) -> str:
        m = self.models[r["model"]]
        sp, pp = r["decode_speedup"], r["prefill_speedup"]
        ideal = m.get("ideal_decode_speedup")
        of_ideal = f"{sp['median'] / ideal:.2f}" if sp["median"] and ideal else "-"
        params = f"{m['params'] / 1e6:.1f}" if m.get("params") else "-"
        verdict = "-" if r["model"] == self.baseline else sp.get("verdict", "-")
        if sp.get("above_ideal"):
            verdict += " (ABOVE IDEAL: disturbed baseline or cache effects?)"
        return (
            f"| {r['batch']} | {r['model']} | {m.get('blocks', '-')} | {params} | {_fmt(r['prefill_ms'])} "
            f"| {_fmt(r['decode_ms_per_token'], 2)} | {_fmt(r['tokens_per_s'])} | {_fmt_ci(sp)} | {verdict} "
            f"| {f'{ideal:.3f}x' if ideal else '-'} | {of_ideal} | {_fmt_ci(pp)} |"
        )

    def _memory_lines(self) -> list[str]:
        lines = ["", "| model | peak RSS MB | RSS while running MB | RSS before loading MB | GPU peak MB | runs on |",
                 "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for name, m in self.models.items():
            lines.append(
                f"| {name} | {m.get('peak_rss_mb')} | {m.get('run_rss_mb')} | {m.get('baseline_rss_mb')} "
                f"| {m.get('gpu_peak_mb') or '-'} | {', '.join(m.get('providers') or [])} |"
            )
        return lines

    def plot(self, path: str | Path) -> Path | None:
        return plot_speed(self, path)


def _fmt_ci(st: dict) -> str:
    if not st or st.get("median") is None:
        return "-"
    lo, hi = st.get("ci_low"), st.get("ci_high")
    if lo is None:
        return f"{st['median']:.3f}x [no interval]"
    return f"{st['median']:.3f}x [{lo:.3f}, {hi:.3f}]"


def _fmt(st: dict, digits: int = 1, unit: str = "") -> str:
    if not st or st.get("median") is None:
        return "-"
    return f"{st['median']:.{digits}f}{unit} ({st['p90']:.{digits}f})"


def build_rows(runs: dict, baseline: str = "original", equal_within: float | None = None) -> list[dict]:
    """Per (batch, model): prefill ms, decode ms per token and tokens/s (median, p10, p90 over repetitions), and
    the decode and prefill speedups over `baseline` computed repetition by repetition. equal_within: the margin
    (the speed step's ci_target) inside which depth against width is called equal."""
    rows = []
    for b, per_model in runs.items():
        base = per_model.get(baseline)
        for name, reps in per_model.items():
            prefill = [r["prefill_s"] for r in reps]
            decode = [float(np.mean(r["decode_s"])) for r in reps]  # seconds per decode step of the batch
            row = {
                "batch": b,
                "model": name,
                "prefill_ms": summarize([x * 1e3 for x in prefill]),
                "decode_ms_per_token": summarize([x * 1e3 for x in decode]),
                "tokens_per_s": summarize([b / x for x in decode]),
                "decode_s": decode,
                "prefill_s": prefill,
            }
            if base is not None:
                base_decode = [float(np.mean(r["decode_s"])) for r in base]
                row["decode_speedups"] = pairwise_speedups(base_decode, decode)
                row["prefill_speedups"] = pairwise_speedups([r["prefill_s"] for r in base], prefill)
            row["decode_speedup"] = speedup_stats(row.get("decode_speedups", []))
            row["prefill_speedup"] = speedup_stats(row.get("prefill_speedups", []))
            rows.append(row)
        cand, width = per_model.get("candidate"), per_model.get("width")
        if cand and width:  # depth against width, pair by pair: > 1 means the depth-pruned model decodes faster
            r = next(x for x in rows if x["batch"] == b and x["model"] == "candidate")
            ratios = pairwise_speedups([float(np.mean(x["decode_s"])) for x in width],
                                       [float(np.mean(x["decode_s"])) for x in cand])  # fmt: skip
            st = speedup_stats(ratios, equal_within=equal_within)
            st["verdict"] = {"faster": "depth faster", "slower": "width faster"}.get(st["verdict"], st["verdict"])
            r["depth_vs_width"] = st
    return rows


def flag_above_ideal(rows: list[dict], models: dict) -> None:
    """Mark speedups whose interval lies entirely above the model's FLOP ideal."""
    for r in rows:
        ideal = models.get(r["model"], {}).get("ideal_decode_speedup")
        sp = r["decode_speedup"]
        if ideal and sp.get("ci_low") is not None:
            sp["above_ideal"] = bool(sp["ci_low"] > ideal)


def plot_speed(report: SpeedReport, path: str | Path) -> Path | None:
    """Decode tokens/s and decode speedup (with each model's ideal, dashed) against batch size."""

    plt = _plt()
    if plt is None:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = {"original": "#1f77b4", "candidate": "#d62728", "width": "#2ca02c"}
    for i, name in enumerate(report.models):
        rows = sorted((r for r in report.rows if r["model"] == name), key=lambda r: r["batch"])
        if not rows:
            continue
        c = colors.get(name, f"C{i + 3}")
        bs = [r["batch"] for r in rows]
        label = {"candidate": "depth-pruned", "width": "width-pruned"}.get(name, name)
        ax1.plot(bs, [r["tokens_per_s"]["median"] for r in rows], "o-", color=c, label=label)
        if name != report.baseline:
            med = np.array([r["decode_speedup"]["median"] for r in rows], float)
            lo = np.array([r["decode_speedup"].get("ci_low") or m for r, m in zip(rows, med)], float)
            hi = np.array([r["decode_speedup"].get("ci_high") or m for r, m in zip(rows, med)], float)
            lo, hi = np.where(np.isfinite(lo), lo, med), np.where(np.isfinite(hi), hi, med)
            ax2.errorbar(bs, med, yerr=[med - lo, hi - med], fmt="o-", color=c, capsize=3,
                         label=f"{label} (95% interval)")  # fmt: skip
            ideal = report.models[name].get("ideal_decode_speedup")
            if ideal:
                ax2.axhline(ideal, color=c, ls="--", lw=0.9, label=f"{label} ideal {ideal:.2f}x")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.legend(fontsize=8)
    ax2.axhline(1.0, color="k", lw=0.6)
    ax1.set_ylabel("decode tokens/s")
    ax2.set_ylabel("decode speedup over original")
    s = report.settings
    fig.suptitle(f"{report.backend} ({s['device']}), prompt {s['prompt_len']}, {s['new_tokens']} new tokens",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
