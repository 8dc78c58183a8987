"""`make bench` speed goals on SmolLM2 with 6 of 30 blocks removed, onnxruntime on CPU, fp32, batch 1,
prompt 128, 64 new tokens. One interleaved run (every model in its own process, A B C ... rotating) measures:

  ours-original  the original exported by `shortened export onnx --optimize`, in onnxruntime (our greedy loop)
  ours-pruned    the pruned model, same export and loop
  eager          PyTorch eager `model.generate` on the pruned checkpoint
  genai          onnxruntime-genai's model builder output for the pruned checkpoint, in genai's own runtime
  ours-genai     our pruned export in genai's runtime (its genai_config.json; KV cache updated in place)
  genai-graph    genai's graph driven by our onnxruntime loop

and prints the goals side by side:
  1. decode speedup pruned / original >= 0.9 x the ideal speedup (per-token FLOPs from the configs)
  2. ours-pruned decode tokens/s >= 1.3 x eager generate
  3. our model's decode tokens/s not below genai's model: in genai's runtime (ours-genai vs genai) and in our loop
     (ours-pruned vs genai-graph); ours-pruned against genai in its runtime is printed too (runtimes differ)
Ratios are computed repetition by repetition (pairs of the same repetition), then the median is reported.

    python benchmarks/bench_speed.py --model ~/.cache/shortened/smollm2-135m-instruct [--work-dir out/bench-speed]

Exports and builds are kept in --work-dir and reused when present. Exit code 0 (1 with --check and a goal missed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from speed_setup import DEFAULT_BLOCKS, prepare


def onnx_nodes(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path / "model.onnx"), load_external_data=False).graph.node)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(Path.home() / ".cache/shortened/smollm2-135m-instruct"))
    p.add_argument("--pruned", help="an already pruned checkpoint (default: prune --blocks)")
    p.add_argument("--blocks", default=",".join(map(str, DEFAULT_BLOCKS)), help="blocks to remove")
    p.add_argument("--work-dir", default="out/bench-speed")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-optimize", dest="optimize", action="store_false", help="export without ORT fusions")
    p.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    args = p.parse_args()
    args.blocks = [int(x) for x in args.blocks.split(",") if x]
    return args


def models(args, P: dict) -> list:
    """The six measured models (see the module doc); genai's graph reads its FLOPs config from the checkpoint."""
    from shortened.validators.timing import ModelSpec

    onnx_orig, onnx_pruned, genai, cfg = P["onnx-original"], P["onnx-pruned"], P["genai-pruned"], str(P["pruned"])
    return [
        ModelSpec("ours-original", str(onnx_orig), "onnxruntime"),
        ModelSpec("ours-pruned", str(onnx_pruned), "onnxruntime"),
        ModelSpec("eager", str(P["pruned"]), "hf-generate"),
        ModelSpec("genai", str(genai), "genai", config_path=cfg),
        ModelSpec("ours-genai", str(onnx_pruned), "genai", config_path=cfg),
        ModelSpec("genai-graph", str(genai), "onnxruntime"),
    ]


def goals(args, P: dict, rows: dict) -> tuple[list, float, float]:
    """(goal, value, target, note) rows, the FLOP ideal, and the loop-against-runtime ratio (not a goal)."""
    from shortened.model.cost import ideal_speedup
    from shortened.validators.stats import pairwise_speedups

    dec = {n: r["decode_s"] for n, r in rows.items()}

    def pair(a, b):  # speedup of b over a, repetition by repetition
        return float(np.median(pairwise_speedups(dec[a], dec[b])))

    ctx = args.prompt_len + args.new_tokens // 2
    ideal = ideal_speedup(str(P["original"]), str(P["pruned"]), context=ctx)
    speedup = pair("ours-original", "ours-pruned")
    return [
        ("decode speedup pruned/original vs ideal", speedup / ideal, 0.9,
         f"{speedup:.3f}x measured, {ideal:.3f}x ideal"),
        ("ours vs PyTorch eager generate", pair("eager", "ours-pruned"), 1.3, "decode tokens/s ratio"),
        ("our model vs genai's, in genai's runtime", pair("genai", "ours-genai"), 1.0,
         "ours-genai / genai, same runtime"),
        ("our model vs genai's, in our loop", pair("genai-graph", "ours-pruned"), 1.0,
         "ours-pruned / genai-graph, same loop"),
    ], ideal, pair("genai", "ours-pruned")  # fmt: skip


def print_header(args, raw: dict) -> None:
    import onnxruntime
    import onnxruntime_genai
    import torch
    import transformers

    s = raw["load_average"]
    print(
        f"\nSmolLM2 {args.model}: {len(args.blocks)} of 30 blocks removed {args.blocks}; CPU, fp32, batch "
        f"{args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.threads} threads, "
        f"{args.repeats} interleaved repetitions after {args.warmup} warm-up"
    )
    print(f"onnxruntime {onnxruntime.__version__}, onnxruntime-genai {onnxruntime_genai.__version__}, torch "
          f"{torch.__version__}, transformers {transformers.__version__}; load average before {s.get('before')}, "
          f"after {s.get('after')} on {os.cpu_count()} CPUs")  # fmt: skip


def print_rows(rows: dict, tokens: dict, nodes: dict) -> None:
    ref = tokens["ours-pruned"]
    print("\n| model | ONNX nodes | prefill ms | decode ms/token | decode tokens/s | same 64 tokens as ours-pruned |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n, r in rows.items():
        same = tokens[n] == ref if n != "ours-original" else "-"
        print(f"| {n} | {nodes.get(n, '-')} | {r['prefill_ms']['median']:.1f} ({r['prefill_ms']['p90']:.1f}) "
              f"| {r['decode_ms_per_token']['median']:.2f} ({r['decode_ms_per_token']['p90']:.2f}) "
              f"| {r['tokens_per_s']['median']:.1f} ({r['tokens_per_s']['p90']:.1f}) | {same} |")  # fmt: skip


def print_goals(goal_rows: list, loop_vs_runtime: float) -> int:
    """The goals table; returns how many were missed."""
    print("\n| goal | measured (median of pairs) | target | verdict | |")
    print("| --- | --- | --- | --- | --- |")
    missed = 0
    for name, value, target, note in goal_rows:
        ok = value >= target
        missed += not ok
        print(f"| {name} | {value:.3f} | >= {target} | {'PASS' if ok else 'MISS'} | {note} |")
    print(
        f"(ours-pruned in our Python loop / genai in its own runtime: {loop_vs_runtime:.3f}; not a goal: the "
        "runtimes differ)"
    )
    return missed


def main() -> int:
    args = parse_args()
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        sys.exit("this benchmark compares against onnxruntime-genai: pip install onnxruntime-genai==0.18.0")
    from shortened.io import write_json
    from shortened.validators.speed_report import build_rows
    from shortened.validators.timing import SpeedOptions, measure

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    opt = "-opt" if args.optimize else ""
    exports = {f"onnx-{name}{opt}": (name, args.optimize) for name in ("original", "pruned")}
    P = prepare(args.model, work, args.blocks, exports, genai=("genai-pruned", "fp32"), pruned=args.pruned)
    P["onnx-original"], P["onnx-pruned"] = P[f"onnx-original{opt}"], P[f"onnx-pruned{opt}"]
    options = SpeedOptions(batch_sizes=[args.batch], prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                           repeats=args.repeats, warmup=args.warmup, threads=args.threads, ci_target=None)  # fmt: skip
    raw = measure(models(args, P), options)
    if not raw["runs"]:
        sys.exit(f"nothing measured: {raw['skipped']}")
    runs = raw["runs"][args.batch]
    rows = {r["model"]: r for r in build_rows({args.batch: runs}, baseline="ours-original")}
    goal_rows, ideal, loop_vs_runtime = goals(args, P, rows)
    print_header(args, raw)
    nodes = {"ours-original": onnx_nodes(P["onnx-original"]), "ours-pruned": onnx_nodes(P["onnx-pruned"]),
             "genai": onnx_nodes(P["genai-pruned"]), "genai-graph": onnx_nodes(P["genai-pruned"]),
             "ours-genai": onnx_nodes(P["onnx-pruned"])}  # fmt: skip
    print_rows(rows, raw["tokens"][args.batch], nodes)
    missed = print_goals(goal_rows, loop_vs_runtime)
    for n, m in raw["models"].items():
        print(f"memory {n}: peak RSS {m['peak_rss_mb']} MB (before loading {m['baseline_rss_mb']} MB); "
              f"runs on {', '.join(m['providers'])}")  # fmt: skip
    export_info = {n: json.loads((P[f"onnx-{n}"] / "export.json").read_text()) for n in ("original", "pruned")}
    result = {"settings": vars(args), "load_average": raw["load_average"], "ideal_decode_speedup": ideal,
              "goals": goal_rows, "rows": rows, "models": raw["models"], "exports": export_info,
              "onnx_nodes": nodes}  # fmt: skip
    write_json(work / "bench_speed.json", result)
    print(f"\nfull results: {work / 'bench_speed.json'}")
    return 1 if (args.check and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
