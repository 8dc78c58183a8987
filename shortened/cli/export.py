"""CLI commands `shortened export onnx` and `export tensorrt`: thin layers over the exporters."""

from __future__ import annotations

import json


def register(sub, groups) -> None:
    _register_onnx(sub, groups)
    _register_tensorrt(sub, groups)


def _register_onnx(sub, groups) -> None:
    import dataclasses

    from shortened.cli.args import add_options
    from shortened.exporters.onnx import ExportOptions
    from shortened.exporters.quantize import QuantOptions

    p = groups["export"].add_parser("onnx", help="export to ONNX with a KV cache (Optimum's layout)")
    p.add_argument("model", help="model directory or hub id (e.g. a checkpoint written by `shortened prune`)")
    p.add_argument("--out", required=True, help="output directory (appears only when complete)")
    add_options(p, ExportOptions, exclude=("calib",))
    q = p.add_argument_group("int4/int8 (onnxruntime's MatMulNBits quantizer; defaults measured on SmolLM2)")
    add_options(q, QuantOptions)
    add_options(q, ExportOptions, exclude=[f.name for f in dataclasses.fields(ExportOptions) if f.name != "calib"])
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin (pickle) weights; off: safetensors only")
    p.set_defaults(func=cmd_export_onnx, dtype="float32", device="cpu")  # --precision sets the dtype; export is CPU


def cmd_export_onnx(args) -> int:
    from shortened.cli.args import load_options, options_from_args
    from shortened.exporters.onnx import QUANTIZED, ExportOptions, export_onnx
    from shortened.exporters.quantize import QuantOptions

    quant = options_from_args(QuantOptions, args) if args.precision in QUANTIZED else None  # fp32: flags unused
    options = options_from_args(ExportOptions, args, quant=quant)
    print(json.dumps(export_onnx(args.model, args.out, options, force=args.force, load=load_options(args))))
    return 0


def _register_tensorrt(sub, groups) -> None:
    from shortened.exporters.tensorrt import DEFAULT_BATCH, DEFAULT_SEQ, DEFAULT_WORKSPACE_GB, PRECISIONS

    p = groups["export"].add_parser(
        "tensorrt",
        help="build a TensorRT engine from an exported ONNX (or only pre-flight it with --check-only)",
        description="Strongly typed TensorRT engine with one optimization profile; writes model.engine, "
        "trtexec.sh (the same build with trtexec) and build.json. --check-only runs the pre-flight checks on any "
        "machine. Without TensorRT or a GPU: one line saying what is missing, exit 2.",
    )
    p.add_argument("onnx_dir", help="directory written by `shortened export onnx` (or a .onnx file)")
    p.add_argument("--out", help="engine directory (appears only when complete); required unless --check-only")
    p.add_argument("--batch", default=":".join(map(str, DEFAULT_BATCH)), help="batch sizes MIN:OPT:MAX (1:8:32)")
    p.add_argument(
        "--seq", default=":".join(map(str, DEFAULT_SEQ)), help="context lengths (past + new) MIN:OPT:MAX (1:128:2048)"
    )
    p.add_argument(
        "--opt-phase",
        choices=["decode", "prefill"],
        default="decode",
        help="what the opt shapes describe: a decode step at OPT context (default) or a prefill of OPT tokens",
    )
    p.add_argument("--precision", choices=sorted(PRECISIONS), help="expected precision; must match the ONNX types")
    p.add_argument("--timing-cache", help="timing cache file, read if present and updated after the build")
    p.add_argument("--workspace-gb", type=float, default=DEFAULT_WORKSPACE_GB, help="builder workspace limit (GiB)")
    p.add_argument("--trt-version", help="TensorRT version to check ops against (default: the installed one)")
    p.add_argument(
        "--tf32", action="store_true", help="allow TF32 tensor cores for float32 layers (faster, less exact)"
    )
    p.add_argument("--check-only", action="store_true", help="run the pre-flight checks only; needs no TensorRT")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_export_tensorrt)


def cmd_export_tensorrt(args) -> int:
    from shortened.errors import UsageError
    from shortened.exporters.tensorrt import export_tensorrt, parse_range

    if not args.check_only and not args.out:
        raise UsageError("--out is required to build an engine (or pass --check-only)")
    res = export_tensorrt(
        args.onnx_dir,
        args.out or "",
        batch=parse_range(args.batch, "batch"),
        seq=parse_range(args.seq, "seq"),
        precision=args.precision,
        timing_cache=args.timing_cache,
        workspace_gb=args.workspace_gb,
        check_only=args.check_only,
        force=args.force,
        trt_version=args.trt_version,
        opt_phase=args.opt_phase,
        tf32=args.tf32,
        verbose=getattr(args, "verbose", False),
    )
    print(json.dumps(res, indent=2, default=str))
    return 0
