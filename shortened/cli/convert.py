"""`shortened convert`: every ConvertConfig setting is a flag, generated from the dataclass; flags override
the --config file, which overrides the defaults."""

from __future__ import annotations

import argparse
import dataclasses


def _list(text: str) -> list:
    items = [x for x in text.replace(" ", "").split(",") if x]
    try:
        return [int(x) for x in items]
    except ValueError:
        return items


def _ratio(text: str):
    """--ratio 0.2, or --ratio auto (the largest k within --max-ppl-ratio, from a sweep)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) or auto, got {text!r}") from None


def register(sub, groups) -> None:
    from shortened.cli.args import json_object
    from shortened.pipeline import ConvertConfig

    p = sub.add_parser(
        "convert",
        help="the whole build step: score, prune, (retrain), export, parity, quality, speed",
        description="Config in (convert.toml and/or flags); pruned checkpoint, ONNX, manifest.json, report.md out.",
    )
    p.add_argument("--config", help="a convert.toml; flags given here override it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    defaults = ConvertConfig()
    for f in dataclasses.fields(ConvertConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        kw = dict(dest=f.name, default=argparse.SUPPRESS)
        if isinstance(value, bool) and f.name.startswith("no_"):
            p.add_argument(flag, action="store_true", **kw)
        elif isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"(default {value})", **kw)
        elif isinstance(value, (int, float, str)):
            kind = _ratio if f.name == "ratio" else type(value)
            p.add_argument(flag, type=kind, help=f"(default {value!r})", **kw)
        elif isinstance(value, dict):
            p.add_argument(flag, type=json_object, help="JSON object, e.g. '{\"max_abs\": 1e-3}'", **kw)
        else:  # lists (None default: protect, blocks)
            p.add_argument(flag, type=_list, help=f"comma-separated (default {value})", **kw)
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from shortened.pipeline import convert, load_config_file, make_config
    from shortened.pipeline.config import FIELDS

    settings = load_config_file(args.config) if args.config else {}
    settings.update({k: v for k, v in vars(args).items() if k in FIELDS})
    convert(make_config(settings), progress=not args.quiet)
    return 0
