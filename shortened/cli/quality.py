"""CLI command `shortened eval`: perplexity (the paper's protocol) and zero-shot accuracy (lm-eval)."""

from __future__ import annotations

from shortened.cli.args import add_load_args, load_options
from shortened.errors import UsageError


def register(sub, groups) -> None:
    p = sub.add_parser("eval", help="perplexity (paper protocol) and zero-shot accuracy (lm-eval)")
    p.add_argument("model", help="model directory, hub id, .gguf file, or an ONNX export (run in onnxruntime)")
    p.add_argument("--ppl", default=None, help="comma list of text sources: wikitext2, ptb, or text files")
    p.add_argument("--seq-len", type=int, default=128, help="perplexity window length in tokens (default 128)")
    p.add_argument("--add-bos", action="store_true", default=None, help="BOS on every window (default: Gemma only)")
    p.add_argument("--max-windows", type=int, help="score only the first N windows")
    p.add_argument(
        "--tasks", nargs="?", const="paper", help="lm-eval tasks (comma list, task:metric); bare: the paper's seven"
    )
    p.add_argument("--limit", type=float, help="lm-eval: examples per task (or a fraction)")
    p.add_argument("--include-path", help="lm-eval: a folder of task YAMLs (local tasks)")
    p.add_argument("--num-fewshot", type=int, default=0, help="lm-eval: few-shot examples per task (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval: batch size (default 8)")
    p.add_argument("--json", help="also write the results to this JSON file")
    add_load_args(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from shortened.io import check_output_file, write_output_json
    from shortened.validators.quality import evaluate

    ppl_files = [s for s in (args.ppl or "").split(",") if s]
    inputs = {"model": args.model, "text": ppl_files}  # (a report beside lm-eval task YAMLs is harmless)
    if args.json:
        check_output_file(args.json, force=True, inputs=inputs)  # before any work; rewrites only our own report
    limit = args.limit
    if limit is not None and limit >= 1:
        if limit != int(limit):
            raise UsageError(f"--limit is a count (>= 1) or a fraction (< 1), got {limit}")
        limit = int(limit)
    res = evaluate(
        args.model,
        ppl=args.ppl if args.ppl is not None else (None if args.tasks else "wikitext2"),
        seq_len=args.seq_len,
        add_bos=args.add_bos,
        tasks=args.tasks,
        limit=limit,
        include_path=args.include_path,
        batch_size=args.batch_size,
        max_windows=args.max_windows,
        num_fewshot=args.num_fewshot,
        load=load_options(args),
    )
    for src, r in res["perplexity"].items():
        print(f"ppl {src}: {r['ppl']:.4f} ({r['windows']} windows of {r['seq_len']} tokens)")
    zs = res.get("zeroshot")
    if zs:
        for task, r in zs["tasks"].items():
            print(f"{task} {r['metric']}: {r['value']:.4f}")
        print(f"average: {zs['average']:.4f}")
    if args.json:
        write_output_json(args.json, res, inputs=inputs)
    return 0
