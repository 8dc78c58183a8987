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
