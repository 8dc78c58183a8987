"""`shortened convert MODEL --out DIR`: every ConvertConfig setting is a flag (cli.args.add_options); flags override
the --config file, which overrides the defaults."""

from __future__ import annotations

import argparse
import sys

from shortened.cli.args import add_options


class _DeprecatedModel(argparse.Action):
    """--model DIR: the old spelling of the positional MODEL, kept so that old scripts run."""

    def __call__(self, parser, namespace, values, option_string=None):
        print("shortened convert: --model is deprecated; pass the model first: shortened convert MODEL --out DIR",
              file=sys.stderr)  # fmt: skip
        namespace.model = values


def register(sub, groups) -> None:
    from shortened.pipeline import ConvertConfig

    p = sub.add_parser(
        "convert",
        help="the whole build step: score, prune, (retrain), export, parity, quality, speed",
        description="Config in (convert.toml and/or flags); pruned checkpoint, ONNX, manifest.json, report.md out.",
    )
    p.add_argument("model", nargs="?", default=argparse.SUPPRESS, metavar="MODEL",
                   help="checkpoint directory, hub id or .gguf file (or `model = ...` in --config)")  # fmt: skip
    p.add_argument("--model", dest="model", action=_DeprecatedModel, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
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
