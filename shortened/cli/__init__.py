"""The command line: parses arguments and calls one library function per command. Nothing else lives here.

Commands register themselves from the module that implements them (`register(subparsers, groups)`), so each
area owns its own flags: prune.py (fetch, score, prune, sweep, width-prune), convert.py, export.py (export onnx,
export tensorrt), bench.py, validate.py (validate parity), retrain.py, quality.py (eval). A command's function is
`cmd_<command words>` (cmd_score, cmd_export_onnx) and calls one library function; flags generated from an
options dataclass come from cli.args.add_options, the one place leaf modules import shared helpers from.
Exit codes: 0 success, 1 a gate failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from shortened.errors import GateFailed, UsageError

# Modules that add commands; each has register(subparsers, groups) where groups holds the "export" and
# "validate" sub-command groups.
COMMAND_MODULES = [
    "shortened.cli.prune",
    "shortened.cli.convert",
    "shortened.cli.export",
    "shortened.cli.bench",
    "shortened.cli.validate",
    "shortened.cli.retrain",
    "shortened.cli.quality",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from shortened import __version__

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
