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
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

# the PPL criterion's first 6 removals on SmolLM2 (10 x 128 calibration tokens, first 4 and last 2 protected)
DEFAULT_BLOCKS = [12, 13, 14, 15, 17, 26]


def prepare(args, work: Path) -> dict:
    from shortened.converter.steps import prune
    from shortened.exporters.onnx import export_onnx

    pruned = Path(args.pruned) if args.pruned else work / "pruned"
    if not (pruned / "config.json").is_file():
        print(f"pruning blocks {args.blocks} -> {pruned}", file=sys.stderr)
        prune(args.model, pruned, blocks=args.blocks)
    paths = {"checkpoint-original": Path(args.model), "checkpoint-pruned": pruned}
    exports = {}
    for name, src in (("original", Path(args.model)), ("pruned", pruned)):
        out = work / f"onnx-{name}{'-opt' if args.optimize else ''}"
        if not (out / "export.json").is_file():
            print(f"exporting {name} -> {out}", file=sys.stderr)
            export_onnx(str(src), out, precision="fp32", cache=True, optimize=args.optimize, force=True)
        exports[name] = json.loads((out / "export.json").read_text())
        paths[f"onnx-{name}"] = out
    genai = work / "genai-pruned"
    if not (genai / "genai_config.json").is_file():
        print(f"building the onnxruntime-genai model -> {genai}", file=sys.stderr)
        tmp = work / ".genai-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(pruned), "-o", str(tmp),
               "-p", "fp32", "-e", "cpu", "-c", str(work / "genai-cache")]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"onnxruntime-genai model builder failed:\n{r.stderr[-2000:]}")
        shutil.copy(pruned / "config.json", tmp / "config.json")  # our loop reads the cache dims from it
        tmp.rename(genai)
    paths["genai"] = genai
    return {"paths": paths, "exports": exports}


def onnx_nodes(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path / "model.onnx"), load_external_data=False).graph.node)


def main() -> int:
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
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        sys.exit("this benchmark compares against onnxruntime-genai: pip install onnxruntime-genai==0.18.0")

    from shortened.model.cost import ideal_speedup
    from shortened.validators.speed import ModelSpec, build_rows, measure, pairwise_speedups

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    prep = prepare(args, work)
    P = prep["paths"]
    t = args.threads
    specs = [
        ModelSpec("ours-original", str(P["onnx-original"]), "onnxruntime", threads=t),
        ModelSpec("ours-pruned", str(P["onnx-pruned"]), "onnxruntime", threads=t),
        ModelSpec("eager", str(P["checkpoint-pruned"]), "hf-generate", threads=t),
        ModelSpec("genai", str(P["genai"]), "genai", threads=t, config_path=str(P["checkpoint-pruned"])),
        ModelSpec("ours-genai", str(P["onnx-pruned"]), "genai", threads=t, config_path=str(P["checkpoint-pruned"])),
        ModelSpec("genai-graph", str(P["genai"]), "onnxruntime", threads=t),
    ]
    raw = measure(specs, (args.batch,), args.prompt_len, args.new_tokens, args.repeats, args.warmup)
    if not raw["runs"]:
        sys.exit(f"nothing measured: {raw['skipped']}")
    runs = raw["runs"][args.batch]
    rows = {r["model"]: r for r in build_rows({args.batch: runs}, baseline="ours-original")}
    dec = {n: r["decode_s"] for n, r in rows.items()}

    def pair(a, b):  # speedup of b over a, repetition by repetition
        return float(np.median(pairwise_speedups(dec[a], dec[b])))

    ctx = args.prompt_len + args.new_tokens // 2
    ideal = ideal_speedup(str(P["checkpoint-original"]), str(P["checkpoint-pruned"]), context=ctx)
    speedup = pair("ours-original", "ours-pruned")
    vs_eager = pair("eager", "ours-pruned")
    vs_genai = pair("genai", "ours-genai")
    vs_genai_graph = pair("genai-graph", "ours-pruned")
    loop_vs_runtime = pair("genai", "ours-pruned")
    goals = [
        ("decode speedup pruned/original vs ideal", speedup / ideal, 0.9,
         f"{speedup:.3f}x measured, {ideal:.3f}x ideal"),
        ("ours vs PyTorch eager generate", vs_eager, 1.3, "decode tokens/s ratio"),
        ("our model vs genai's, in genai's runtime", vs_genai, 1.0, "ours-genai / genai, same runtime"),
        ("our model vs genai's, in our loop", vs_genai_graph, 1.0, "ours-pruned / genai-graph, same loop"),
    ]  # fmt: skip
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
    nodes = {"ours-original": onnx_nodes(P["onnx-original"]), "ours-pruned": onnx_nodes(P["onnx-pruned"]),
             "genai": onnx_nodes(P["genai"]), "genai-graph": onnx_nodes(P["genai"]),
             "ours-genai": onnx_nodes(P["onnx-pruned"])}  # fmt: skip
    ref = raw["tokens"][args.batch]["ours-pruned"]
    print("\n| model | ONNX nodes | prefill ms | decode ms/token | decode tokens/s | same 64 tokens as ours-pruned |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n, r in rows.items():
        same = raw["tokens"][args.batch][n] == ref if n != "ours-original" else "-"
        print(f"| {n} | {nodes.get(n, '-')} | {r['prefill_ms']['median']:.1f} ({r['prefill_ms']['p90']:.1f}) "
              f"| {r['decode_ms_per_token']['median']:.2f} ({r['decode_ms_per_token']['p90']:.2f}) "
              f"| {r['tokens_per_s']['median']:.1f} ({r['tokens_per_s']['p90']:.1f}) | {same} |")  # fmt: skip
    print("\n| goal | measured (median of pairs) | target | verdict | |")
    print("| --- | --- | --- | --- | --- |")
    missed = 0
    for name, value, target, note in goals:
        ok = value >= target
        missed += not ok
        print(f"| {name} | {value:.3f} | >= {target} | {'PASS' if ok else 'MISS'} | {note} |")
    print(
        f"(ours-pruned in our Python loop / genai in its own runtime: {loop_vs_runtime:.3f}; not a goal: the "
        "runtimes differ)"
    )
    for n, m in raw["models"].items():
        print(f"memory {n}: peak RSS {m['peak_rss_mb']} MB (before loading {m['baseline_rss_mb']} MB); "
              f"runs on {', '.join(m['providers'])}")  # fmt: skip
    result = {"settings": vars(args), "load_average": s, "ideal_decode_speedup": ideal, "goals": goals,
              "rows": rows, "models": raw["models"], "exports": prep["exports"], "onnx_nodes": nodes}  # fmt: skip
    from shortened.io import write_json

    write_json(work / "bench_speed.json", result)
    print(f"\nfull results: {work / 'bench_speed.json'}")
    return 1 if (args.check and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
