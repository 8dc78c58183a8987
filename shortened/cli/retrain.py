"""CLI command `shortened retrain` (LoRA, full, distill, partial): one flag per RetrainConfig field."""

from __future__ import annotations

import json

from shortened.cli.args import add_load_args, add_options, load_options, options_from_args
from shortened.errors import UsageError


def register(sub, groups) -> None:
    from shortened.converter.retrain import RetrainConfig

    p = sub.add_parser("retrain", help="retrain a pruned model (LoRA, continued pretraining, distillation)")
    p.add_argument("model", help="pruned model directory (or hub id)")
    p.add_argument("--out", required=True, help="output checkpoint directory (appears only when complete)")
    p.add_argument("--force", action="store_true", help="replace an existing output (and stale checkpoints)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--trainer-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any TrainingArguments field, e.g. deepspeed=ds.json or fsdp='full_shard auto_wrap' (repeatable)",
    )
    add_options(p.add_argument_group("retraining (every RetrainConfig field)"), RetrainConfig)
    add_load_args(p)
    p.set_defaults(func=cmd_retrain)


def trainer_args(items: list[str]) -> dict:
    """--trainer-arg KEY=VALUE, repeated: values as JSON where they parse (numbers, booleans, objects)."""
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--trainer-arg expects KEY=VALUE, got {item!r}")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value  # plain strings (paths, 'full_shard auto_wrap')
    return extra


def cmd_retrain(args) -> int:
    from shortened.converter.retrain import RetrainConfig, retrain

    cfg = options_from_args(RetrainConfig, args, load=load_options(args), extra_args=trainer_args(args.trainer_arg))
    rec = retrain(args.model, args.out, config=cfg, force=args.force, progress=not args.no_progress)
    if rec:
        keys = ("method", "steps", "best_step", "best_val_loss", "train_loss", "seconds")
        print(json.dumps({"out": args.out, **{k: rec[k] for k in keys}, "initial_val": rec["losses"]["initial_val"]}))
    return 0
