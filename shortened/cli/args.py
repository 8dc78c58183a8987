"""Flags and parsers that several commands share."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import typing

from shortened.options import _default, _union_args, check, flag_name, help_text, hints


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
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the weights' dtype in memory (default float32)")  # fmt: skip
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
        what = {int: "integers", float: "numbers"}.get(inner, f"{inner.__name__} values")
        if not items:  # `--blocks ''` would otherwise prune nothing and succeed
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got an empty list {text!r}")
        try:
            return [inner(x) for x in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None

    return parse


int_list = _comma_list(int)


def _or_words(tp, words: tuple):
    """`float | Literal["auto"]`: one of the words, else a number."""

    def parse(text: str):
        if text in words:
            return text
        try:
            return tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or {' or '.join(words)}, got {text!r}") from None

    return parse


TRI_STATE = {"auto": None, "on": True, "off": False}  # a `bool | None` field: None is "decide for me"


def _tri_state(text: str):
    if text not in TRI_STATE:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}")
    return TRI_STATE[text]


def add_options(p, cls, *, exclude=(), suppress: bool = False, defaults: dict | None = None) -> None:
    """One flag per field of the options dataclass `cls` (see shortened.options.option), with its meaning,
    choices and default in --help. p: a parser or an argument group. suppress: flags not given leave no attribute
    (so they can override a file; booleans then also get --no-X), and choices are left to options.check, which
    checks the file's values and the flags' together. defaults: this command's own defaults. A bool defaulting to
    True with its own `flag` gets only that flag, which turns it off (--no-cache, --asymmetric)."""
    types_ = hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in exclude or not meta.get("cli", True) or "help" not in meta:
            continue
        if defaults and f.name in defaults:
            f = _with_default(f, defaults[f.name])
        default = _default(f)
        kw = dict(dest=f.name, help=help_text(f).replace("%", "%%"), default=argparse.SUPPRESS if suppress else default)
        args = _union_args(types_[f.name])
        tps = [t for t in args if t is not type(None) and typing.get_origin(t) is not typing.Literal]
        words = tuple(w for t in args if typing.get_origin(t) is typing.Literal for w in typing.get_args(t))
        tp = tps[0] if len(tps) == 1 else next((t for t in tps if typing.get_origin(t) in (list, tuple)), tps[0])
        choices = meta.get("choices")
        if meta.get("parse"):
            p.add_argument(flag_name(f), type=meta["parse"], metavar=_metavar(choices), **kw)
        elif tp is bool and type(None) in args:
            on_off = {v: k for k, v in TRI_STATE.items()}[default]
            kw["help"] = f"{f.metadata['help']} (default {on_off})"
            p.add_argument(flag_name(f), type=_tri_state, metavar="{auto,on,off}", **kw)
        elif tp is bool and default is True and meta.get("flag"):  # a default-on switch whose flag turns it off
            p.add_argument(flag_name(f), action="store_false", **{**kw, "help": meta["help"].replace("%", "%%")})
        elif tp is bool:
            simple = default is False and (not suppress or f.name.startswith("no_"))
            p.add_argument(flag_name(f), action="store_true" if simple else argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) in (list, tuple):
            inner = (typing.get_args(tp) or (str,))[0]
            if choices:
                kw["help"] += f" (comma-separated, of {', '.join(map(str, choices))})"
            p.add_argument(flag_name(f), type=_comma_list(inner), metavar="A,B,...", **kw)
        elif tp is dict or typing.get_origin(tp) is dict:
            p.add_argument(flag_name(f), type=json_object, metavar="JSON", **kw)
        elif words:
            p.add_argument(flag_name(f), type=_or_words(tp, words), metavar="X|" + "|".join(words), **kw)
        else:
            p.add_argument(
                flag_name(f), type=tp, metavar=_metavar(choices), choices=None if suppress else choices, **kw
            )


def _metavar(choices):
    return "{" + ",".join(map(str, choices)) + "}" if choices else None


def _with_default(f, value):
    """A copy of field f whose default is `value` (a command's own default, e.g. score's --select topk)."""
    f = copy.copy(f)
    f.default, f.default_factory = value, dataclasses.MISSING
    return f


def options_from_args(cls, args, **extra):
    """An options object from parsed flags (fields absent from args keep their defaults), type-checked; a bad
    value is one line naming its flag."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return check(cls(**{**given, **extra}), flags=True)
