"""Flags and parsers that several commands share."""

from __future__ import annotations

import argparse


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:  # `--blocks ''` would otherwise prune nothing and succeed
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got an empty list {text!r}")
    return values


def json_object(text: str) -> dict:
    """A flag holding a JSON object, e.g. '{"max_abs": 1e-3}'."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"max_abs\": 1e-3}}', got {text!r} "
                                         f"({e.msg})") from None  # fmt: skip
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"max_abs\": 1e-3}}', got {text!r}")
    return value


def add_load_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("loading")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or auto (shard across GPUs)")
    g.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    g.add_argument("--allow-pickle", action="store_true", help="allow .bin (pickle) weights; off: safetensors only")
    g.add_argument("--max-memory", help="with --device auto: memory per device, e.g. cpu=8GiB,0=70GiB (rest on disk)")
    g.add_argument("--offload-folder", help="with --max-memory: where offloaded weights go (default: a temp dir)")


def load_options(args):
    from shortened.model.loading import LoadOptions, parse_max_memory

    mm = parse_max_memory(args.max_memory) if getattr(args, "max_memory", None) else None
    return LoadOptions(args.dtype, args.device, args.trust_remote_code, args.allow_pickle, max_memory=mm,
                       offload_folder=getattr(args, "offload_folder", None))  # fmt: skip


def _comma_list(inner):
    def parse(text: str) -> list:
        items = [x for x in text.replace(" ", "").split(",") if x]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got an empty one {text!r}")
        try:
            return [inner(x) for x in items]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {inner.__name__} values, got {text!r}"
            ) from None

    return parse


def add_options(p, cls, *, exclude=(), suppress: bool = False) -> None:
    """One flag per field of the options dataclass `cls` (see shortened.options.option), with its meaning,
    choices and default in --help. suppress: flags not given leave no attribute (so they can override a file)."""
    import dataclasses
    import typing

    from shortened.options import _union_args, help_text, hints

    types_ = hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in exclude or not meta.get("cli", True) or "help" not in meta:
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        kw = dict(dest=f.name, help=help_text(f), default=argparse.SUPPRESS if suppress else default)
        tps = [t for t in _union_args(types_[f.name]) if t is not type(None)]
        tp = tps[0] if len(tps) == 1 else next((t for t in tps if typing.get_origin(t) in (list, tuple)), tps[0])
        if meta.get("parse"):
            p.add_argument(flag, type=meta["parse"], **kw)
        elif tp is bool:
            if default is False:
                p.add_argument(flag, action="store_true", **kw)
            else:
                p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) in (list, tuple):
            inner = (typing.get_args(tp) or (str,))[0]
            choices = meta.get("choices")
            if choices:
                kw["help"] += f" (comma-separated, of {', '.join(map(str, choices))})"
            p.add_argument(flag, type=_comma_list(inner), metavar="A,B,...", **kw)
        elif tp is dict or typing.get_origin(tp) is dict:
            p.add_argument(flag, type=json_object, metavar="JSON", **kw)
        else:
            p.add_argument(flag, type=tp, choices=meta.get("choices"), **kw)


def options_from_args(cls, args, **extra):
    """An options object from parsed flags (fields absent from args keep their defaults), type-checked."""
    import dataclasses

    from shortened.options import check

    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return check(cls(**{**given, **extra}))
