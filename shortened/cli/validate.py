"""CLI commands of the validators: `shortened validate parity`."""

from __future__ import annotations


def register(sub, groups) -> None:
    from shortened.cli.args import add_load_args, add_options
    from shortened.validators.parity import ParityOptions, Tolerances

    p = groups["validate"].add_parser(
        "parity",
        help="compare an ONNX export with its PyTorch model (logits, KL, greedy tokens); exit 1 when out of tolerance",
    )
    p.add_argument("--reference", required=True, help="the PyTorch model: directory, hub id or .gguf file")
    p.add_argument("--onnx", required=True, help="the export directory (holding model.onnx) or an .onnx file")
    add_options(p, ParityOptions)
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                   help="tensorrt: run the --engine built from --onnx instead of onnxruntime")  # fmt: skip
    p.add_argument("--engine", help="TensorRT engine directory from `shortened export tensorrt` (--backend tensorrt)")
    p.add_argument("--report", help="write the JSON report here")
    g = p.add_argument_group("tolerances (override the precision's defaults; 'none' turns a gate off)")
    add_options(g, Tolerances, suppress=True)
    add_load_args(p)
    p.set_defaults(func=cmd_parity)


def _engine(args):
    from shortened.errors import UsageError

    if args.backend == "tensorrt" and not args.engine:
        raise UsageError("--backend tensorrt needs --engine DIR (build it with `shortened export tensorrt`)")
    return args.engine if args.backend == "tensorrt" else None


def cmd_parity(args) -> int:
    import dataclasses

    from shortened.cli.args import load_options, options_from_args
    from shortened.errors import GateFailed
    from shortened.io import check_output_file, write_output_json
    from shortened.validators.parity import ParityOptions, Tolerances, validate_parity

    inputs = {"reference model": args.reference, "ONNX export": args.onnx, "prompts": args.prompts_file,
              "engine": args.engine}  # fmt: skip
    if args.report:
        check_output_file(args.report, force=True, inputs=inputs)  # before any work; rewrites only our own report
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Tolerances) if hasattr(args, f.name)}
    options = options_from_args(ParityOptions, args, tolerances=overrides, engine=_engine(args))
    report = validate_parity(args.reference, args.onnx, options, load=load_options(args))
    print(report.table())
    if args.report:
        write_output_json(args.report, report.to_dict(), inputs=inputs)
    if not report.passed:
        raise GateFailed(f"parity: {len(report.failures)} tolerance failures; first: {report.failures[0]}")
    return 0
