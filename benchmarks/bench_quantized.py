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
import shutil
import subprocess
import sys
from pathlib import Path

DEFAULT_BLOCKS = [12, 13, 14, 15, 17, 26]  # the PPL criterion's first 6 removals on SmolLM2 (bench_speed.py)
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "test.raw.txt"


def _size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.name.startswith("model.onnx"))


def prepare(args, work: Path) -> dict:
    from shortened.converter.steps import prune
    from shortened.exporters.onnx import export_onnx
    from shortened.exporters.quantize import quantize_export

    pruned = work / "pruned"
    if not (pruned / "config.json").is_file():
        prune(args.model, pruned, blocks=args.blocks, progress=False)
    paths = {"original": Path(args.model), "pruned": pruned, "fp32": work / "onnx-fp32"}
    if not (paths["fp32"] / "export.json").is_file():
        export_onnx(str(pruned), paths["fp32"], optimize=True, force=True)
    for p in ("int4", "int8"):
        paths[p] = work / f"onnx-{p}"
        if not (paths[p] / "export.json").is_file():
            quantize_export(paths["fp32"], paths[p], p, force=True)
    genai = work / "genai-int4"
    if not (genai / "genai_config.json").is_file():
        tmp = work / ".genai-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(pruned), "-o", str(tmp),
               "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache")]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"onnxruntime-genai model builder failed:\n{r.stderr[-2000:]}")
        shutil.copy(pruned / "config.json", tmp / "config.json")
        tmp.rename(genai)
    paths["genai-int4"] = genai
    return paths


def main() -> int:
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

    from shortened.io import write_json
    from shortened.validators.speed import ModelSpec, build_rows, measure, pairwise_speedups, speedup_stats

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    P = prepare(args, work)
    cfg = str(P["pruned"])
    t = args.threads
    specs = [
        ModelSpec("eager-original", str(P["original"]), "hf-generate", threads=t),
        ModelSpec("ours-fp32", str(P["fp32"]), "genai", threads=t, config_path=cfg),
        ModelSpec("ours-int4", str(P["int4"]), "genai", threads=t, config_path=cfg),
        ModelSpec("genai-int4", str(P["genai-int4"]), "genai", threads=t, config_path=cfg),
        ModelSpec("ours-int4-loop", str(P["int4"]), "onnxruntime", threads=t, config_path=cfg),
    ]
    raw = measure(specs, (1,), args.prompt_len, args.new_tokens, args.repeats, 1, ci_target=args.ci_target,
                  time_budget_s=args.time_budget, baseline="eager-original", progress=True)  # fmt: skip
    runs = raw["runs"][1]
    rows = {r["model"]: r for r in build_rows({1: runs}, baseline="eager-original")}
    dec = {n: r["decode_s"] for n, r in rows.items()}

    def pair(a, b):  # decode speedup of b over a, pair by pair, with its interval
        return speedup_stats(pairwise_speedups(dec[a], dec[b]))

    vs_genai, vs_eager = pair("genai-int4", "ours-int4"), pair("eager-original", "ours-int4")
    ppl = {}
    if not args.skip_ppl:
        from shortened.validators.quality import perplexity_onnx

        for name in ("fp32", "int4", "int8", "genai-int4"):
            tok_dir = P["pruned"]
            from transformers import AutoTokenizer

            r = perplexity_onnx(P[name], AutoTokenizer.from_pretrained(tok_dir), args.eval_text, 128,
                                max_windows=args.windows, threads=t, progress=False)  # fmt: skip
            ppl[name] = r.ppl
    goals = [
        ("ours-int4 / genai-int4 decode (genai runtime)", vs_genai, 1.0),
        ("ours-int4 / PyTorch fp32 eager original", vs_eager, 4.0),
    ]
    s = raw["load_average"]
    print(f"\nSmolLM2, blocks {args.blocks} removed; CPU batch 1, prompt {args.prompt_len}, {args.new_tokens} new "
          f"tokens, {t} threads pinned to the same cores; {raw['repetitions'][1]['n']} interleaved repetitions "
          f"(resolved to +-{args.ci_target:.0%}: {raw['repetitions'][1]['resolved']}); load average before "
          f"{s['before']}, after {s['after']} on {os.cpu_count()} CPUs")  # fmt: skip
    ref = raw["tokens"][1]["ours-fp32"]
    sizes = {"eager-original": None, "ours-fp32": _size(P["fp32"]), "ours-int4": _size(P["int4"]),
             "genai-int4": _size(P["genai-int4"]), "ours-int4-loop": _size(P["int4"])}  # fmt: skip
    print("\n| model | file MB | first token ms | decode ms/token | decode tok/s | same greedy tokens as ours-fp32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n, r in rows.items():
        toks = raw["tokens"][1][n]
        same = sum(a == b for a, b in zip(toks, ref))
        mb = f"{sizes[n] / 1e6:.1f}" if sizes.get(n) else "-"
        print(f"| {n} | {mb} | {r['prefill_ms']['median']:.1f} | {r['decode_ms_per_token']['median']:.2f} "
              f"| {r['tokens_per_s']['median']:.1f} | {same}/{len(ref)} |")  # fmt: skip
    if ppl:
        print(f"\nWikiText-2 perplexity through onnxruntime ({args.windows} x 128): "
              + ", ".join(f"{k} {v:.2f} ({v / ppl['fp32']:.3f}x fp32)" for k, v in ppl.items()))  # fmt: skip
        print(f"int8 file {_size(P['int8']) / 1e6:.1f} MB")
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
    write_json(work / "bench_quantized.json", {"settings": vars(args), "rows": rows, "goals": goals, "ppl": ppl,
                                                "sizes": sizes, "load_average": s, "tokens": raw["tokens"],
                                                "repetitions": raw["repetitions"]})  # fmt: skip
    return 1 if (args.check and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
