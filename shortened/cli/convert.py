"""`shortened convert MODEL --out DIR`: every ConvertConfig setting is a flag (cli.args.add_options); flags override
the --config file, which overrides the defaults."""

from __future__ import annotations

import argparse

from shortened.cli.args import add_options


def register(sub, groups) -> None:
    from shortened.pipeline import ConvertConfig

    p = sub.add_parser(
        "convert",
        help="the whole build step: score, prune, (retrain), export, parity, quality, speed",
        description="Config in (convert.toml and/or flags); pruned checkpoint, ONNX, manifest.json, report.md out.",
    )
    p.add_argument("model", nargs="?", default=argparse.SUPPRESS, metavar="MODEL",
                   help="checkpoint directory, hub id or .gguf file (or `model = ...` in --config)")  # fmt: skip
    # --model MODEL: the old spelling, deprecated and hidden, kept so that old scripts run
    p.add_argument("--model", dest="model", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--config", help="a convert.toml; flags given here override it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_options(p, ConvertConfig, suppress=True)
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from shortened.pipeline import convert, load_config_file, make_config
    from shortened.pipeline.config import FIELDS

    settings = load_config_file(args.config) if args.config else {}
    settings.update({k: v for k, v in vars(args).items() if k in FIELDS})
    convert(make_config(settings), progress=not args.quiet)
    return 0
