"""shortened.options and cli.args.add_options: one type check for Python, TOML and flags; help shows meanings."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

import pytest

from shortened.cli.args import add_options, options_from_args
from shortened.errors import UsageError
from shortened.options import apply, check, from_mapping, option


@dataclass
class Opts:
    criterion: str = option("ppl", "block importance", choices=("ppl", "taylor"))
    ratio: float = option(0.2, "fraction of blocks removed", min=0.0)
    steps: int | None = option(None, "optimizer steps")
    sizes: list[int] = option(default_factory=lambda: [1, 8], help="batch sizes", min=1)
    names: list[str] | None = option(None, "precisions", choices=("fp32", "int4"))
    tol: dict = option(default_factory=dict, help="tolerances")
    quiet: bool = option(False, "no progress")
    cache: bool = option(True, "with a KV cache")
    hidden: str = option("x", cli=False)
    k: int | Literal["auto"] = option(2, "blocks removed, or auto")
    bf16: bool | None = option(None, "bf16: auto, on or off")
    method: str = option("", "retraining (default: none)", choices=("lora", "full"))


@pytest.mark.parametrize(
    "values, message",
    [
        ({"criterion": "fisher"}, "unknown criterion 'fisher'; choose one of ppl, taylor"),
        ({"ratio": "0.2"}, "ratio must be a number, got '0.2'"),
        ({"ratio": -1}, "ratio must be at least 0.0, got -1"),
        ({"steps": 1.5}, "steps must be an integer, got 1.5"),
        ({"steps": True}, "steps must be an integer, got True"),
        ({"sizes": [1, "8"]}, "sizes must be a list of integers, got [1, '8']"),
        ({"names": ["fp8"]}, "unknown names 'fp8'; choose one of fp32, int4"),
        ({"ratio": "lots"}, "ratio must be a number, got 'lots'"),
        ({"k": "all"}, "k must be an integer or 'auto', got 'all'"),
        ({"sizes": [1, 0]}, "sizes must be at least 1, got [1, 0]"),
        ({"tol": [1]}, "tol must be a table / JSON object, got [1]"),
        ({"quiet": "yes"}, "quiet must be true or false, got 'yes'"),
        ({"nope": 1}, "unknown setting(s) nope"),
        ({"ration": 1}, "unknown setting(s) ration; did you mean ratio?"),
    ],
)
def test_one_line_per_bad_value(values, message):
    with pytest.raises(UsageError) as e:
        from_mapping(Opts, values)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_good_values_are_coerced():
    o = check(Opts(ratio=1, sizes=(2, 4), names=["int4"], k="auto"))
    assert o.ratio == 1.0 and isinstance(o.ratio, float) and o.sizes == [2, 4] and o.k == "auto"
    assert check(Opts(method="")).method == ""  # the default is always allowed (here: no retraining)


def test_flags_follow_the_dataclass_and_share_its_check():
    p = argparse.ArgumentParser(exit_on_error=False)
    add_options(p, Opts)
    text = p.format_help()
    assert "{ppl,taylor}" in text and "block importance" in text and "(default 0.2)" in text
    assert "--hidden" not in text and "--no-cache" in text
    args = p.parse_args(["--criterion", "taylor", "--sizes", "1,2", "--tol", '{"max_abs": 1}', "--quiet", "--no-cache"])
    o = options_from_args(Opts, args)
    assert (o.criterion, o.sizes, o.tol, o.quiet, o.cache, o.steps) == (
        "taylor",
        [1, 2],
        {"max_abs": 1},
        True,
        False,
        None,
    )
    with pytest.raises(UsageError, match="unknown names 'fp8'; choose one of fp32, int4"):
        options_from_args(Opts, p.parse_args(["--names", "fp32,fp8"]))
    with pytest.raises(UsageError, match="^--ratio must be at least 0.0"):  # flags are named as flags
        options_from_args(Opts, p.parse_args(["--ratio", "-0.5"]))
    assert "{auto,on,off}" in text and "--k X|auto" in text and "{lora,full}" in text
    o = options_from_args(Opts, p.parse_args(["--k", "auto", "--bf16", "off"]))
    assert (o.k, o.bf16, options_from_args(Opts, p.parse_args(["--k", "3"])).k) == ("auto", False, 3)
    for bad in (["--k", "all"], ["--bf16", "yes"], ["--method", "qlora"], ["--sizes", "1,x"]):
        with pytest.raises(argparse.ArgumentError):
            p.parse_args(bad)


def test_suppressed_flags_leave_no_attribute():
    p = argparse.ArgumentParser()
    add_options(p, Opts, suppress=True)
    assert vars(p.parse_args(["--steps", "3"])) == {"steps": 3}
    assert vars(p.parse_args(["--no-quiet"])) == {"quiet": False}  # overrides a file's quiet = true


def test_a_commands_own_defaults_and_exclusions():
    p = argparse.ArgumentParser()
    add_options(p, Opts, defaults={"criterion": "taylor"}, exclude=("tol",))
    assert "(default taylor)" in p.format_help() and "--tol" not in p.format_help()
    assert p.parse_args([]).criterion == "taylor" and Opts().criterion == "ppl"


def test_apply_routes_keywords_to_their_options_object():
    @dataclass
    class Other:
        depth: int = option(3, "depth", min=1)

    o, d = apply([Opts(), Other()], {"criterion": "taylor", "depth": 5}, "f")
    assert (o.criterion, d.depth) == ("taylor", 5)
    with pytest.raises(TypeError, match="f\\(\\) got an unexpected keyword argument 'nope'"):
        apply([Opts(), Other()], {"nope": 1}, "f")
    with pytest.raises(UsageError, match="setting depth must be at least 1"):
        apply([Opts(), Other()], {"depth": 0}, "f")
