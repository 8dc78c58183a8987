"""CLI commands of the validators: `shortened validate parity`."""

from __future__ import annotations

TOLERANCE_FLAGS = {  # flag -> Tolerances field
    "--max-abs": "max_abs",
    "--mean-abs": "mean_abs",
    "--max-rel": "max_rel",
    "--min-cosine": "min_cosine",
    "--min-top1": "min_top1",
    "--max-kl": "max_kl",
    "--max-mean-kl": "max_mean_kl",
    "--max-top1-gap": "max_top1_gap",
    "--min-gen-match": "min_gen_match",
}


def register(sub, groups) -> None:
    from shortened.cli.args import add_load_args, int_list

    p = groups["validate"].add_parser(
        "parity",
        help="compare an ONNX export with its PyTorch model (logits, KL, greedy tokens); exit 1 when out of tolerance",
    )
    p.add_argument("--reference", required=True, help="the PyTorch model: directory, hub id or .gguf file")
    p.add_argument("--onnx", required=True, help="the export directory (holding model.onnx) or an .onnx file")
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16", "int4", "int8"],
        help="tolerance set (default: from export.json)",
    )
    p.add_argument("--prompts", help="text file of prompts (default: the shared data's text when present)")
    p.add_argument("--batch-sizes", type=int_list, default=[1, 2], help="batch sizes, left padded (default 1,2)")
    p.add_argument("--seq-lens", type=int_list, default=[1, 16, 48], help="prompt lengths (default 1,16,48)")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens decoded with the cache (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--provider", choices=["auto", "cpu", "cuda", "tensorrt"], default="auto",
                   help="onnxruntime execution provider (auto: CUDA where present, else CPU)")  # fmt: skip
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: onnxruntime's choice)")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                   help="tensorrt: run the --engine built from --onnx instead of onnxruntime")  # fmt: skip
    p.add_argument("--engine", help="TensorRT engine directory from `shortened export tensorrt` (--backend tensorrt)")
    p.add_argument("--report", help="write the JSON report here")
    g = p.add_argument_group("tolerances (override the precision's defaults; 'none' turns a gate off)")
    for flag, name in TOLERANCE_FLAGS.items():
        g.add_argument(flag, dest=f"tol_{name}", type=_float_or_none, metavar="X")
    add_load_args(p)
    p.set_defaults(func=cmd_parity)


def _float_or_none(text: str):
    import argparse

    if text.lower() == "none":
        return "none"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _engine(args):
    from shortened.errors import UsageError

    if args.backend == "tensorrt" and not args.engine:
        raise UsageError("--backend tensorrt needs --engine DIR (build it with `shortened export tensorrt`)")
    return args.engine if args.backend == "tensorrt" else None


def cmd_parity(args) -> int:
    from shortened.cli.args import load_options
    from shortened.errors import GateFailed
    from shortened.io import check_output_file, write_output_json
    from shortened.validators.parity import validate_parity

    inputs = {"reference model": args.reference, "ONNX export": args.onnx, "prompts": args.prompts,
              "engine": args.engine}  # fmt: skip
    if args.report:
        check_output_file(args.report, force=True, inputs=inputs)  # before any work; rewrites only our own report

    overrides = {
        name: (None if v == "none" else v)
        for name in TOLERANCE_FLAGS.values()
        if (v := getattr(args, f"tol_{name}")) is not None
    }
    report = validate_parity(
        args.reference,
        args.onnx,
        precision=args.precision,
        tolerances=overrides,
        prompts_file=args.prompts,
        batch_sizes=args.batch_sizes,
        seq_lens=args.seq_lens,
        new_tokens=args.new_tokens,
        seed=args.seed,
        provider=None if args.provider == "auto" else args.provider,
        threads=args.threads,
        engine=_engine(args),
        load=load_options(args),
    )
    print(report.table())
    if args.report:
        write_output_json(args.report, report.to_dict(), inputs=inputs)
    if not report.passed:
        raise GateFailed(f"parity: {len(report.failures)} tolerance failures; first: {report.failures[0]}")
    return 0
