"""What `convert` concludes: the gates over parity, quality and speed, the summary table and report.md, all from
the steps' results (the manifest, and the speed rows and the steps' tables beside it)."""

from __future__ import annotations

import json
from pathlib import Path

from shortened.pipeline.config import ConvertConfig


def evaluate_gates(cfg: ConvertConfig, parity: dict, quality: dict | None, speed: dict | None) -> dict:
    """parity, quality, speed: the steps' results (speed: its "rows"; None when the step did not run)."""
    gates = {
        "parity": {
            "passed": bool(parity["passed"]),
            "detail": "all cases within tolerances" if parity["passed"] else parity["failures"][0],
        }
    }
    if cfg.max_ppl_ratio:
        if quality is None:
            gates["max_ppl_ratio"] = {"passed": False, "detail": "no perplexity measured: set eval_text"}
        else:
            deployed = f"onnx {cfg.all_precisions()[-1]}"  # what will be deployed, measured through onnxruntime
            final = quality.get(deployed, quality.get("retrained", quality["pruned"]))["ppl"]
            ratio = final / quality["original"]["ppl"]
            gates["max_ppl_ratio"] = {
                "passed": ratio <= cfg.max_ppl_ratio,
                "value": ratio,
                "limit": cfg.max_ppl_ratio,
                "detail": f"PPL ratio {ratio:.3f} ({deployed if deployed in quality else 'pruned'} / original) vs "
                f"limit {cfg.max_ppl_ratio}",
            }
    if cfg.min_speedup:
        if speed is None:
            gates["min_speedup"] = {"passed": False, "detail": "no speed measured: enable the speed step"}
        else:
            # the interval's lower end must pass (the median when no interval could be formed)
            got = {r["batch"]: _speedup_floor(r["decode_speedup"]) for r in speed["rows"] if r["model"] == "candidate"}
            worst = min(got.values()) if got else 0.0
            gates["min_speedup"] = {
                "passed": worst >= cfg.min_speedup,
                "value": worst,
                "by_batch": got,
                "limit": cfg.min_speedup,
                "detail": f"worst decode speedup (95% interval's lower end) {worst:.3f}x vs limit {cfg.min_speedup}x",
            }
    return gates


def _speedup_floor(st: dict) -> float:
    lo = st.get("ci_low")
    return float(lo) if lo is not None and lo == lo and lo > float("-inf") else float(st.get("median") or 0.0)


def summary_table(m: dict, out: Path | str, speed: dict | None = None) -> str:
    """The summary of a manifest; speed: the speed step's result (its rows and ideal speedups)."""
    p = m["pruning"]
    lines = [
        f"\nshortened convert: {out}",
        "",
        "| | |",
        "| --- | --- |",
        f"| blocks removed | {p['removed_blocks']} ({p['num_blocks']} -> {p['kept']}, criterion {p['criterion']}) |",
    ]
    if p.get("selection"):
        sel = p["selection"]
        lines.append(f"| selection | {sel['mode']}: chosen {sel['chosen']} by calibration perplexity |")
    if p.get("recovery"):
        r = p["recovery"]
        how = "none" if r["method"] == "none" else f"linear map folded into blocks {r['blocks_holding_maps']}"
        lines.append(f"| training-free recovery | {how}{'; ' + r['not_folded'] if r.get('not_folded') else ''} |")
    if m.get("sweep"):
        lines.append(f"| k by budget | {m['sweep']['picked_k']} blocks: the largest within held-out PPL ratio "
                     f"{m['config']['max_ppl_ratio']} (chosen on the evaluation text; sweep/sweep.md) |")  # fmt: skip
    q = m.get("quality")
    if q:
        row = " -> ".join(f"{k} {v['ppl']:.2f}" for k, v in q.items())
        lines.append(f"| perplexity ({q['original']['source']}, {q['original']['seq_len']}-token windows) | {row} |")
        for note in m.get("quality_notes") or []:
            lines.append(f"| not held out | {note} |")
    par = m["parity"]
    for prec, pp in (par.get("by_precision") or {"": par}).items():
        what = f"parity (ONNX {prec} vs PyTorch)" if prec else "parity (ONNX vs PyTorch)"
        lines.append(f"| {what} | {'PASS' if pp['passed'] else 'FAIL'} on {', '.join(pp['providers'])} |")
    for prec, e in (m.get("exports") or {}).items():
        q = e.get("quantization") or {}
        how = f", {q['method']} block {q['block_size']}, head {q['head_bits']} bits" if q else ""
        lines.append(f"| ONNX {prec} | {e['size_bytes'] / 1e6:.1f} MB{how} |")
    t = m.get("tensorrt") or {}
    lines.append(f"| TensorRT | {'skipped: ' + t['skipped'] if 'skipped' in t else 'built'} |")
    if m.get("speed") and speed:
        for r in speed["rows"]:
            if r["model"] == "original":
                continue
            ideal = speed["ideal"].get(r["model"])
            sp = r["decode_speedup"]
            ci = f" [{sp['ci_low']:.3f}, {sp['ci_high']:.3f}] {sp['verdict']}" if sp.get("ci_low") is not None else ""
            ideal = f"ideal {ideal:.3f}x" if ideal else "no FLOP ideal: weight-only quantized"
            lines.append(f"| decode speedup, batch {r['batch']}, {r['model']} | {sp['median']:.3f}x{ci} ({ideal}) |")
    for k, g in m["gates"].items():
        lines.append(f"| gate {k} | {'pass' if g['passed'] else 'FAIL'}: {g['detail']} |")
    reused = [k for k, v in m["steps"].items() if v["reused"]]
    if reused:
        lines.append(f"| reused steps | {', '.join(reused)} |")
    return "\n".join(lines)


def render_report(m: dict, res: dict) -> str:
    """report.md: what a person reads in a minute. res: the steps' results by name (their tables)."""
    out = [
        "# shortened build report",
        "",
        f"Model `{m['config']['model']}`, created {m['created']} by shortened "
        f"{m['tool']['shortened']} (torch {m['tool'].get('torch')}, transformers {m['tool'].get('transformers')}).",
        "",
        "## Summary",
        summary_table(m, "", res.get("speed")).split("\n", 2)[2],
        "",
    ]
    if m["pruning"]["scores"]:
        out += ["## Block importance", "", "![block scores](scores.png)", ""]
    if "sweep" in res:
        out += ["## Quality against speed", "", res["sweep"]["table"].rstrip(), "", "![sweep](sweep/sweep.png)", ""]
    for name, r in res.items():
        if name.split("-")[0] == "parity":
            out += [f"## Parity (ONNX {r['precision']} vs PyTorch)", "", "```", r["table"].rstrip(), "```", ""]
    if "speed" in res:
        out += ["## Speed", "", res["speed"]["table"].rstrip(), "", "![speed](speed.png)", ""]
    if m.get("retraining"):
        out += ["## Retraining", "", "```json", json.dumps(m["retraining"], indent=1, default=str)[:3000], "```", ""]
    out += ["## Steps", "", "| step | seconds | reused |", "| --- | --- | --- |"]
    out += [f"| {k} | {v['seconds']} | {'yes' if v['reused'] else 'no'} |" for k, v in m["steps"].items()]
    return "\n".join(out) + "\n"
