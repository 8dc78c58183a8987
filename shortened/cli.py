"""The command line: parses arguments and calls one library function per command. Nothing else lives here.

Commands register themselves from the module that implements them (`register(subparsers)`), so each area
owns its own flags. Exit codes: 0 success, 1 a gate failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import GateFailed, UsageError

# Modules that add commands; each has register(subparsers, groups) where groups holds the "export" and
# "validate" sub-command groups.
COMMAND_MODULES = [
    "shortened.converter.cli",
    "shortened.pipeline_cli",
    "shortened.exporters.cli",
    "shortened.validators.bench_cli",
    "shortened.validators.cli",
    "shortened.exporters.tensorrt_cli",
    "shortened.converter.retrain_cli",
]


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
    from .converter.loading import LoadOptions, parse_max_memory

    mm = parse_max_memory(args.max_memory) if getattr(args, "max_memory", None) else None
    return LoadOptions(args.dtype, args.device, args.trust_remote_code, args.allow_pickle, max_memory=mm,
                       offload_folder=getattr(args, "offload_folder", None))  # fmt: skip


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="shortened", description="Depth pruning of causal LMs, exported for serving.")
    parser.add_argument("--version", action="version", version=f"shortened {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    groups = {}
    for name, help_ in (("export", "export a model (onnx, tensorrt)"), ("validate", "check exported models")):
        p = sub.add_parser(name, help=help_)
        groups[name] = p.add_subparsers(dest=f"{name}_command", required=True, parser_class=_Parser)
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub, groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        import warnings

        warnings.filterwarnings("ignore")
        logging.getLogger("torch").setLevel(logging.ERROR)  # e.g. the ONNX exporter's torchvision notices
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
        except ImportError:
            pass
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"shortened: error: {e}", file=sys.stderr)
        return 2
    except GateFailed as e:
        print(f"shortened: gate failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("shortened: interrupted; no output was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
