"""`make bench`: do two back-to-back runs of the demo's speed step agree within their intervals?

The demo's speed step (examples/smollm2.toml: onnxruntime, fused exports, prompt 128, 32 new tokens, width baseline,
int4 beside fp32) on SmolLM2 with blocks 12-15, 17 and 26 removed, run twice in a row on the same exports. For each
batch size and model the two decode-speedup intervals must overlap, and the depth-vs-width verdict must be the same
in both runs (or "not resolved" in either: the machine could not tell them apart, which is then said).

    python benchmarks/bench_speed_repeat.py --model ~/.cache/shortened/smollm2-135m-instruct [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from speed_setup import DEFAULT_BLOCKS


def prepare(args, work: Path) -> tuple[Path, Path, dict, Path]:
    """(pruned checkpoint, width baseline, {name: fused ONNX export}, the candidate's int4 export), each made once."""
    from shortened.converter.steps import prune
    from shortened.converter.width import width_prune
    from shortened.exporters.onnx import export_onnx
    from shortened.exporters.quantize import quantize_export
    from shortened.model.cost import _config, count_params_of_config

    pruned, width = work / "pruned", work / "width"
    if not (pruned / "config.json").is_file():
        prune(args.model, pruned, blocks=DEFAULT_BLOCKS, progress=False)
    if not (width / "config.json").is_file():
        width_prune(args.model, count_params_of_config(_config(str(pruned))), width, force=True)
    dirs = {}
    for name, src in (("original", args.model), ("candidate", pruned), ("width", width)):
        dirs[name] = work / f"{name}-onnx"
        if not (dirs[name] / "export.json").is_file():
            export_onnx(str(src), dirs[name], optimize=True, force=True, progress=False)
    int4 = work / "candidate-int4-onnx"
    if not (int4 / "export.json").is_file():
        quantize_export(dirs["candidate"], int4, "int4", force=True)
    return pruned, width, dirs, int4


def compare(reports: list) -> int:
    """The two runs' intervals side by side; returns how many disagree."""
    print("\n| batch | model | run 1 [95% interval] | run 2 [95% interval] | overlap |")
    print("| --- | --- | --- | --- | --- |")
    bad = 0
    for r1 in reports[0].rows:
        if r1["model"] == "original":
            continue
        r2 = reports[1].row(r1["batch"], r1["model"])
        a, b = r1["decode_speedup"], r2["decode_speedup"]
        ok = a["ci_low"] is not None and b["ci_low"] is not None and a["ci_low"] <= b["ci_high"] and b["ci_low"] <= a[
            "ci_high"]  # fmt: skip
        bad += not ok
        print(f"| {r1['batch']} | {r1['model']} | {a['median']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}] "
              f"| {b['median']:.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}] | {'yes' if ok else 'NO'} |")  # fmt: skip
        if "depth_vs_width" in r1:
            v1, v2 = r1["depth_vs_width"]["verdict"], r2["depth_vs_width"]["verdict"]
            same = v1 == v2
            bad += not same and "not resolved" not in (v1, v2)
            print(f"| {r1['batch']} | depth vs width | {v1} | {v2} | {'same' if same else 'DIFFERENT'} |")
    return bad


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(Path.home() / ".cache/shortened/smollm2-135m-instruct"))
    p.add_argument("--work-dir", default="out/bench-speed-repeat")
    p.add_argument("--batch-sizes", default="1", help="comma list (the demo: 1,8)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--time-budget", type=float, default=120.0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--check", action="store_true")
    args = p.parse_args()

    from shortened.pipeline.bench import bench
    from shortened.validators.speed import SpeedOptions

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    pruned, width, dirs, int4 = prepare(args, work)
    reports = []
    for run in (1, 2):
        batches = [int(b) for b in args.batch_sizes.split(",")]
        options = SpeedOptions(batch_sizes=batches, prompt_len=128, new_tokens=32, repeats=args.repeats,
                               threads=args.threads, time_budget_s=args.time_budget)  # fmt: skip
        rep = bench(args.model, str(pruned), options, backend="onnxruntime", width_baseline=str(width), optimize=True,
                    onnx_dirs=dirs, extra_candidates={"candidate-int4": str(int4)}, report=work / f"speed-{run}.json",
                    plot=work / f"speed-{run}.png", progress=False)  # fmt: skip
        print(f"\n## run {run}\n\n{rep.table()}")
        reports.append(rep)
    bad = compare(reports)
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
