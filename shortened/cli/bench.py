"""CLI: `shortened bench` (speed of the original against the pruned candidate) and `shortened width-prune`."""

from __future__ import annotations

import json


def register(sub, groups) -> None:
    from shortened.cli.args import add_load_args, int_list
    from shortened.validators.speed import BACKENDS

    p = sub.add_parser("bench", help="measure prefill/decode speed and memory of the original and the pruned model")
    p.add_argument("--original", required=True, help="the original checkpoint directory")
    p.add_argument("--candidate", required=True, help="the pruned checkpoint directory")
    p.add_argument("--backend", default="torch", choices=BACKENDS, help="what runs the models (default torch)")
    p.add_argument("--width-baseline", nargs="?", const=True, default=False, metavar="DIR",
                   help="also measure a width-pruned copy of the original with the candidate's parameter count "
                   "(built, or the checkpoint DIR)")  # fmt: skip
    p.add_argument("--batch-sizes", type=int_list, default=[1, 8, 32], help="comma-separated (default 1,8,32)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=32, help="generated tokens per run (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repetitions per batch size, at least (5)")
    p.add_argument(
        "--ci-target",
        type=float,
        default=0.03,
        metavar="REL",
        help="repeat until every speedup's 95%% interval is within +-REL (0.03; 0: exactly --repeats)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=120.0,
        metavar="S",
        help="stop repeating after S seconds per batch size even when not resolved (default 120)",
    )
    p.add_argument("--max-repeats", type=int, help="at most this many repetitions (default 10 x --repeats)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs per model and batch size (default 1)")
    p.add_argument("--threads", type=int, help="intra-op threads per model (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"], help="ONNX/TensorRT precision")
    p.add_argument("--optimize", action="store_true", help="export ONNX with the fused-attention optimizations")
    p.add_argument("--original-onnx", help="an ONNX export of the original to use instead of exporting one")
    p.add_argument("--candidate-onnx", help="an ONNX export of the candidate to use instead of exporting one")
    p.add_argument("--work-dir", help="keep exports and the width baseline here (default: a temporary dir)")
    p.add_argument("--report", help="write the full report (every run, pairwise ratios) as JSON")
    p.add_argument("--plot", help="write a PNG of tokens/s and speedup against batch size")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("width-prune", help="narrow a model (MLP channels, head groups) to a parameter count")
    p.add_argument("model", help="model directory")
    p.add_argument("--out", required=True, help="output checkpoint directory (appears only when complete)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--params", type=int, help="target parameter count")
    g.add_argument("--match", help="a checkpoint directory whose parameter count is the target")
    p.add_argument("--kv-groups", type=int, help="key/value head groups to keep (default: chosen from the target)")
    p.add_argument("--multiple-of", type=int, default=1, help="round the MLP width to a multiple of this")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    add_load_args(p)
    p.set_defaults(func=cmd_width_prune)


def cmd_bench(args) -> int:
    from shortened.pipeline.bench import bench
    from shortened.validators.speed import SpeedOptions

    options = SpeedOptions(
        batch_sizes=args.batch_sizes,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        device=args.device,
        threads=args.threads,
        precision=args.precision,
        seed=args.seed,
        ci_target=args.ci_target or None,
        time_budget_s=args.time_budget,
        max_repeats=args.max_repeats,
    )
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


def cmd_width_prune(args) -> int:
    from shortened.cli.args import load_options
    from shortened.converter.width import width_prune

    res = width_prune(
        args.model,
        args.params if args.params is not None else args.match,
        args.out,
        kv_groups=args.kv_groups,
        multiple_of=args.multiple_of,
        load=load_options(args),
        force=args.force,
    )
    print(json.dumps(res))
    return 0
