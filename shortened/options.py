"""Settings as dataclasses: every field says what it means and, where the set is fixed, its choices. One type check
serves Python callers, convert.toml and command-line flags alike (`cli.args.add_options` makes the flags).

    @dataclass
    class ExportOptions:
        precision: str = option("fp32", "weights, compute and cache", choices=("fp32", "fp16", "int4"))
        opset: int = option(18, "ONNX opset", min=14)

    check(ExportOptions(precision="fp8"))  # UsageError: unknown precision 'fp8'; choose one of fp32, fp16, int4

A field's default is always allowed (so "" can mean "off" beside choices); `float | Literal["auto"]` takes a number
or the word auto; library functions take keyword settings onto their options objects with `apply`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import MISSING

from shortened.errors import UsageError


def option(default=MISSING, help: str = "", *, choices=None, min=None, parse=None, flag: str | None = None,
           cli: bool = True, default_factory=MISSING):  # fmt: skip
    """A dataclass field with its meaning. choices: the allowed values; min: the smallest allowed number;
    parse: how a flag's text becomes the value (default: from the annotation); flag: the flag's name (default
    --field-name); cli=False: not a flag (set from Python or TOML only)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "min": min, "parse": parse,
            "flag": flag, "cli": cli}  # fmt: skip
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def hints(cls) -> dict:
    """Field name -> resolved type annotation."""
    return typing.get_type_hints(cls)


def _union_args(tp) -> tuple:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return typing.get_args(tp)
    return (tp,)


def _describe(tp) -> str:
    names = []
    for t in _union_args(tp):
        origin = typing.get_origin(t)
        if t is type(None):
            continue
        if origin is typing.Literal:
            names += [repr(a) for a in typing.get_args(t)]
        elif origin in (list, tuple):
            inner = typing.get_args(t)[0] if typing.get_args(t) else str
            names.append(f"a list of {'integers' if inner is int else 'numbers' if inner is float else 'strings'}")
        elif t is bool:
            names.append("true or false")
        elif t in (int, float):
            names.append("a number" if t is float else "an integer")
        elif t is str:
            names.append("a string")
        elif t is dict or origin is dict:
            names.append("a table / JSON object")
        else:
            names.append(getattr(t, "__name__", str(t)))
    return " or ".join(dict.fromkeys(names))


def _matches(value, tp) -> tuple[bool, object]:
    """Whether value fits tp; returns (ok, value coerced: int -> float, tuple -> list)."""
    for t in _union_args(tp):
        origin = typing.get_origin(t)
        if t is type(None):
            if value is None:
                return True, value
        elif t is typing.Any:
            return True, value
        elif origin is typing.Literal:
            if value in typing.get_args(t) and not isinstance(value, bool):
                return True, value
        elif t is bool:
            if isinstance(value, bool):
                return True, value
        elif t is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True, value
        elif t is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return True, float(value)
        elif t is str:
            if isinstance(value, str):
                return True, value
        elif origin in (list, tuple) or t in (list, tuple):
            inner = typing.get_args(t)[0] if typing.get_args(t) else typing.Any
            if isinstance(value, (list, tuple)):
                items = [_matches(x, inner) for x in value]
                if all(ok for ok, _ in items):
                    return True, [x for _, x in items]
        elif t is dict or origin is dict:
            if isinstance(value, dict):
                return True, value
        elif isinstance(t, type) and isinstance(value, t):
            return True, value
    return False, value


def flag_name(f: dataclasses.Field) -> str:
    """The field's command-line flag: --field-name unless option(flag=...) says otherwise."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _default(f: dataclasses.Field):
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default if f.default is not MISSING else None


def check(obj, where: str = "setting", flags: bool = False):
    """Type-check every field of a dataclass instance (annotation, choices, min) and coerce in place; the first
    problem is one UsageError naming the field ("setting ratio", or the flag "--ratio" with `flags`). Returns obj."""
    types_ = hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        label = flag_name(f) if flags else f"{where} {f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check(value, where, flags)
            continue
        ok, value = _matches(value, types_[f.name])
        if not ok:
            raise UsageError(f"{label} must be {_describe(types_[f.name])}, got {getattr(obj, f.name)!r}")
        items = value if isinstance(value, list) else [value]
        choices = f.metadata.get("choices")
        if choices and value is not None and value != _default(f):  # the default (e.g. "": off) is always allowed
            bad = [v for v in items if v not in choices]
            if bad:
                raise UsageError(f"unknown {f.name} {bad[0]!r}; choose one of {', '.join(map(str, choices))}")
        low = f.metadata.get("min")
        if low is not None:
            small = [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool) and v < low]
            if small:
                raise UsageError(f"{label} must be at least {low}, got {value!r}")
        object.__setattr__(obj, f.name, value)
    return obj


def from_mapping(cls, values: dict, where: str = "setting"):
    """cls(**values) with unknown names and wrong types refused (one line each), e.g. from a TOML table."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(k for k in values if k not in names)
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(sorted(names))}"
        raise UsageError(f"unknown {where}(s) {', '.join(unknown)}; {hint}")
    return check(cls(**values), where)


def apply(objs: list, settings: dict, caller: str = "") -> list:
    """The options objects with keyword settings applied to whichever has a field of that name, each checked:
    how prune(model, out, blocks=[2], no_protect=True) stays callable without building the objects."""
    out = list(objs)
    for key, value in settings.items():
        i = next((i for i, o in enumerate(out) if key in {f.name for f in dataclasses.fields(o)}), None)
        if i is None:
            raise TypeError(f"{caller}() got an unexpected keyword argument {key!r}")
        out[i] = dataclasses.replace(out[i], **{key: value})
    return [check(o) for o in out]


def help_text(f: dataclasses.Field) -> str:
    """The field's meaning and default, for --help."""
    text = f.metadata.get("help", "")
    default = _default(f)
    if isinstance(default, (list, tuple)):
        default = ",".join(map(str, default))
    if default is not None and default is not False and default not in ("", (), [], {}):
        text = f"{text} (default {default})" if text else f"(default {default})"
    return text
