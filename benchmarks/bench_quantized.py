"""`make bench` goals of the int4/int8 exports on SmolLM2 with 6 of 30 blocks removed, CPU, batch 1, prompt 128.

One interleaved speed run (every model in its own process, pinned to the same cores with the same threads, the same
prompt tokens, repeated until every interval is within +-3% or the budget is spent):

  eager-original   PyTorch eager `generate` on the original 30-block checkpoint, fp32
  ours-fp32        our pruned fp32 export (--optimize) in onnxruntime-genai's runtime
  ours-int4        our pruned int4 export (the default quantization) in genai's runtime
  genai-int4       onnxruntime-genai's model builder int4 output for the same pruned checkpoint, in its runtime
  ours-int4-loop   our int4 export in our own onnxruntime loop (for information)

Goals, side by side:
  1. ours-int4 decode >= 1.0 x genai-int4 (same runtime), batch 1
  2. ours-int4 decode >= 4 x eager-original, batch 1
  3. int4 WikiText-2 perplexity (60 x 128 windows, through onnxruntime) within 10% of fp32's (same windows)
and the greedy tokens of every model, the file sizes, and int8 beside int4 for perplexity and size.
Every ratio is the median of repetition-by-repetition pairs with its 95% bootstrap interval; a goal passes only
when the interval's lower end passes ("not resolved" when the interval straddles the target).

    python benchmarks/bench_quantized.py --model ~/.cache/shortened/smollm2-135m-instruct [--work-dir out/bench-q]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from speed_setup import DEFAULT_BLOCKS, prepare

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "test.raw.txt"


def _size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.name.startswith("model.onnx"))


def prepare_quantized(args, work: Path) -> dict:
    """The shared setup (pruned checkpoint, fused fp32 export, genai's int4 build), then int4 and int8 exports
    quantized from the fp32 one."""
    from shortened.exporters.quantize import quantize_export

    paths = prepare(args.model, work, args.blocks, {"onnx-fp32": ("pruned", True)}, genai=("genai-int4", "int4"))
    paths["fp32"] = paths["onnx-fp32"]
    for p in ("int4", "int8"):
        paths[p] = work / f"onnx-{p}"
        if not (paths[p] / "export.json").is_file():
            quantize_export(paths["fp32"], paths[p], p, force=True)
    return paths


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(Path.home() / ".cache/shortened/smollm2-135m-instruct"))
    p.add_argument("--blocks", default=",".join(map(str, DEFAULT_BLOCKS)))
    p.add_argument("--work-dir", default="out/bench-quantized")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="at least; more until the intervals are within --ci-target")
    p.add_argument("--ci-target", type=float, default=0.03)
    p.add_argument("--time-budget", type=float, default=300.0, help="seconds of repetitions at most")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--eval-text", default=str(WIKITEXT))
    p.add_argument("--windows", type=int, default=60)
    p.add_argument("--skip-ppl", action="store_true")
    p.add_argument("--check", action="store_true", help="exit 1 when a goal is missed or not resolved")
    args = p.parse_args()
    args.blocks = [int(x) for x in args.blocks.split(",") if x]
    return args


def measure_models(args, P: dict) -> dict:
    """The five models (see the module doc), interleaved at batch 1 against PyTorch eager on the original."""
    from shortened.validators.timing import ModelSpec, SpeedOptions, measure

    cfg = str(P["pruned"])
    specs = [
        ModelSpec("eager-original", str(P["original"]), "hf-generate"),
        ModelSpec("ours-fp32", str(P["fp32"]), "genai", config_path=cfg),
        ModelSpec("ours-int4", str(P["int4"]), "genai", config_path=cfg),
        ModelSpec("genai-int4", str(P["genai-int4"]), "genai", config_path=cfg),
        ModelSpec("ours-int4-loop", str(P["int4"]), "onnxruntime", config_path=cfg),
    ]
    options = SpeedOptions(batch_sizes=[1], prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                           repeats=args.repeats, warmup=1, threads=args.threads, ci_target=args.ci_target,
                           time_budget_s=args.time_budget)  # fmt: skip
    return measure(specs, options, baseline="eager-original", progress=True)


def perplexities(args, P: dict) -> dict:
    """WikiText-2 perplexity of each export through onnxruntime, the same windows for all."""
    from transformers import AutoTokenizer

    from shortened.validators.quality import perplexity_onnx

    tok = AutoTokenizer.from_pretrained(P["pruned"])
    return {name: perplexity_onnx(P[name], tok, args.eval_text, 128, max_windows=args.windows, threads=args.threads,
                                  progress=False).ppl
            for name in ("fp32", "int4", "int8", "genai-int4")}  # fmt: skip


def print_rows(rows: dict, tokens: dict, sizes: dict) -> None:
    ref = tokens["ours-fp32"]
    print("\n| model | file MB | first token ms | decode ms/token | decode tok/s | same greedy tokens as ours-fp32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n, r in rows.items():
        same = sum(a == b for a, b in zip(tokens[n], ref))
        mb = f"{sizes[n] / 1e6:.1f}" if sizes.get(n) else "-"
        print(f"| {n} | {mb} | {r['prefill_ms']['median']:.1f} | {r['decode_ms_per_token']['median']:.2f} "
              f"| {r['tokens_per_s']['median']:.1f} | {same}/{len(ref)} |")  # fmt: skip


def print_goals(goals: list, ppl: dict) -> int:
    """The goals table (a goal passes only when its interval's lower end does); returns how many were missed."""
    print("\n| goal | median [95% interval] | target | verdict |")
    print("| --- | --- | --- | --- |")
    missed = 0
    for name, st, target in goals:
        verdict = "PASS" if st["ci_low"] is not None and st["ci_low"] >= target else (
            "MISS" if st["ci_high"] is not None and st["ci_high"] < target else "not resolved")  # fmt: skip
        missed += verdict != "PASS"
        lo, hi = st["ci_low"], st["ci_high"]
        print(f"| {name} | {st['median']:.3f} [{lo:.3f}, {hi:.3f}] | >= {target} | {verdict} |")
    if ppl:
        ratio = ppl["int4"] / ppl["fp32"]
        missed += ratio > 1.10
        print(f"| int4 / fp32 WikiText-2 perplexity | {ratio:.3f} | <= 1.10 | {'PASS' if ratio <= 1.10 else 'MISS'} |")
    return missed


def main() -> int:
    args = parse_args()
    from shortened.io import write_json
    from shortened.validators.speed_report import build_rows
    from shortened.validators.stats import pairwise_speedups, speedup_stats

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    P = prepare_quantized(args, work)
    raw = measure_models(args, P)
    rows = {r["model"]: r for r in build_rows({1: raw["runs"][1]}, baseline="eager-original")}
    dec = {n: r["decode_s"] for n, r in rows.items()}

    def pair(a, b):  # decode speedup of b over a, pair by pair, with its interval
        return speedup_stats(pairwise_speedups(dec[a], dec[b]))

    ppl = {} if args.skip_ppl else perplexities(args, P)
    goals = [
        ("ours-int4 / genai-int4 decode (genai runtime)", pair("genai-int4", "ours-int4"), 1.0),
        ("ours-int4 / PyTorch fp32 eager original", pair("eager-original", "ours-int4"), 4.0),
    ]
    s = raw["load_average"]
    print(f"\nSmolLM2, blocks {args.blocks} removed; CPU batch 1, prompt {args.prompt_len}, {args.new_tokens} new "
          f"tokens, {args.threads} threads pinned to the same cores; {raw['repetitions'][1]['n']} interleaved "
          f"repetitions (resolved to +-{args.ci_target:.0%}: {raw['repetitions'][1]['resolved']}); load average "
          f"before {s['before']}, after {s['after']} on {os.cpu_count()} CPUs")  # fmt: skip
    sizes = {"eager-original": None, "ours-fp32": _size(P["fp32"]), "ours-int4": _size(P["int4"]),
             "genai-int4": _size(P["genai-int4"]), "ours-int4-loop": _size(P["int4"])}  # fmt: skip
    print_rows(rows, raw["tokens"][1], sizes)
    if ppl:
        print(f"\nWikiText-2 perplexity through onnxruntime ({args.windows} x 128): "
              + ", ".join(f"{k} {v:.2f} ({v / ppl['fp32']:.3f}x fp32)" for k, v in ppl.items()))  # fmt: skip
        print(f"int8 file {_size(P['int8']) / 1e6:.1f} MB")
    missed = print_goals(goals, ppl)
    write_json(work / "bench_quantized.json", {"settings": vars(args), "rows": rows, "goals": goals, "ppl": ppl,
                                                "sizes": sizes, "load_average": s, "tokens": raw["tokens"],
                                                "repetitions": raw["repetitions"]})  # fmt: skip
    return 1 if (args.check and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
