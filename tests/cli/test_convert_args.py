"""`shortened convert`'s flags come from ConvertConfig: meanings and choices in --help, MODEL positional (the old
--model still parses), and TOML and flags checked by the same options.check."""

from __future__ import annotations

import dataclasses

import pytest

from shortened.cli import build_parser
from shortened.errors import UsageError
from shortened.pipeline import ConvertConfig, make_config


def _parse(*argv):
    return vars(build_parser().parse_args(["convert", *argv]))


def test_model_is_positional_and_the_old_flag_still_parses():
    assert _parse("m", "--out", "o")["model"] == "m"
    assert _parse("--model", "m", "--out", "o")["model"] == "m"
    assert "model" not in _parse("--config", "c.toml")  # from the file then


def test_help_shows_every_field_with_meaning_and_choices():
    p = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "convert")[1]
    text = p.format_help()
    assert "--criterion {ppl,taylor,magnitude,bi}" in text and "--tensorrt {auto,on,off}" in text
    assert "--ratio X|auto" in text and "block-importance criterion (default ppl)" in text
    assert "--model" not in text.split("positional arguments")[1]  # the deprecated alias is hidden
    for f in dataclasses.fields(ConvertConfig):
        assert f.metadata.get("help"), f.name
        assert f.name == "model" or "--" + f.name.replace("_", "-") in text, f.name


def test_flags_and_toml_values_share_one_check():
    settings = _parse("m", "--out", "o", "--batch-sizes", "1,2", "--no-speed", "--ratio", "auto")
    cfg = make_config({k: v for k, v in settings.items() if k in {f.name for f in dataclasses.fields(ConvertConfig)}})
    assert (cfg.batch_sizes, cfg.speed, cfg.ratio, cfg.protect) == ([1, 2], False, "auto", None)
    assert make_config({"ratio": 1, "speed_ci_target": 0}).speed_ci_target == 0.0
    for values, message in [
        ({"criterion": "nope"}, "unknown criterion 'nope'; choose one of ppl, taylor, magnitude, bi"),
        ({"precisions": ["fp32", "fp8"]}, "unknown precisions 'fp8'"),
        ({"ratio": "a lot"}, "setting ratio must be a number or 'auto', got 'a lot'"),
        ({"batch_sizes": [1, 0]}, "setting batch_sizes must be at least 1"),
        ({"seq_len": 1.5}, "setting seq_len must be an integer, got 1.5"),
    ]:
        with pytest.raises(UsageError, match=message):
            make_config(values)
    assert make_config({"retrain": ""}).retrain == ""  # the default (no retraining) beside the choices
