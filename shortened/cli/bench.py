"""CLI: `shortened bench` (speed of the original against the pruned candidate)."""

from __future__ import annotations


def register(sub, groups) -> None:
    from shortened.cli.args import add_options
    from shortened.validators.speed import BACKENDS, SpeedOptions

    p = sub.add_parser("bench", help="measure prefill/decode speed and memory of the original and the pruned model")
    p.add_argument("--original", required=True, help="the original checkpoint directory")
    p.add_argument("--candidate", required=True, help="the pruned checkpoint directory")
    p.add_argument("--backend", default="torch", choices=BACKENDS, help="what runs the models (default torch)")
    p.add_argument("--width-baseline", nargs="?", const=True, default=False, metavar="DIR",
                   help="also measure a width-pruned copy of the original with the candidate's parameter count "
                   "(built, or the checkpoint DIR)")  # fmt: skip
    add_options(p.add_argument_group("measurement"), SpeedOptions)
    p.add_argument("--optimize", action="store_true", help="export ONNX with the fused-attention optimizations")
    p.add_argument("--original-onnx", help="an ONNX export of the original to use instead of exporting one")
    p.add_argument("--candidate-onnx", help="an ONNX export of the candidate to use instead of exporting one")
    p.add_argument("--work-dir", help="keep exports and the width baseline here (default: a temporary dir)")
    p.add_argument("--report", help="write the full report (every run, pairwise ratios) as JSON")
    p.add_argument("--plot", help="write a PNG of tokens/s and speedup against batch size")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from shortened.cli.args import options_from_args
    from shortened.pipeline.bench import bench
    from shortened.validators.speed import SpeedOptions

    options = options_from_args(SpeedOptions, args)
    rep = bench(
        args.original,
        args.candidate,
        options,
        backend=args.backend,
        width_baseline=args.width_baseline,
        optimize=args.optimize,
        onnx_dirs={"original": args.original_onnx, "candidate": args.candidate_onnx},
        work_dir=args.work_dir,
        report=args.report,
        plot=args.plot,
    )
    print(rep.table())
    return 0
