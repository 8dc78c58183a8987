"""CLI commands: `shortened retrain` (LoRA, full, distill) and `shortened eval` (perplexity, zero-shot)."""

from __future__ import annotations

import dataclasses
import json

HELP = {
    "method": "lora (paper, light pruning), full (continued pretraining), distill (teacher = original model), "
    "partial (only the blocks next to each removed run)",
    "partial_head": "partial: also train the final norm and the head",
    "partial_mse": "partial: weight of the MSE to the original model's hidden state at the same depth",
    "data": "training data: .txt (plain text), .jsonl (text field or Alpaca records), or hf:DATASET[:CONFIG]",
    "val_data": "validation data (default: a held-out part of --data)",
    "val_fraction": "held-out fraction of --data for the validation loss",
    "data_format": "auto, text (packed windows) or alpaca (prompt tokens masked out of the loss)",
    "seq_len": "tokens per training window / example",
    "max_steps": "optimizer steps (overrides --epochs)",
    "batch_size": "examples per device per step",
    "grad_accum": "gradient accumulation steps",
    "lr": "learning rate (default 1e-4)",
    "weight_decay": "AdamW weight decay (default 0.1 for full weights, 0 for LoRA)",
    "bf16": "bf16 mixed precision: auto (where the GPU supports it), on, off",
    "eval_steps": "validate and checkpoint every N steps; the best-validation checkpoint is kept",
    "lora_targets": "modules to adapt: all-linear (every attention and MLP projection) or a comma list",
    "teacher": "distill: the original model (default: source_model in the pruned model's pruning.json)",
    "distill_weights": "distill: train full weights or LoRA adapters",
    "kd_weight": "distill: weight of KL(teacher || student)",
    "ce_weight": "distill: weight of the optional cross-entropy on the data",
    "resume": "continue an interrupted run from its last checkpoint (<out>.checkpoints)",
    "keep_checkpoints": "keep <out>.checkpoints after a successful run",
}
CHOICES = {"method": ("lora", "full", "distill", "partial"), "data_format": ("auto", "text", "alpaca"),
           "distill_weights": ("lora", "full")}  # fmt: skip


def _add_config_args(p) -> None:
    from shortened.converter.retrain import RetrainConfig

    g = p.add_argument_group("retraining (every RetrainConfig field)")
    for f in dataclasses.fields(RetrainConfig):
        if f.name in ("load", "extra_args"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        h = HELP.get(f.name, "") + (f" (default {default})" if default not in (None, False, "") else "")
        if f.name == "bf16":
            g.add_argument(flag, choices=("auto", "on", "off"), default="auto", help=HELP["bf16"])
        elif isinstance(default, bool):
            g.add_argument(flag, action="store_true", help=h)
        elif f.name in CHOICES:
            g.add_argument(flag, choices=CHOICES[f.name], default=default, help=h)
        else:
            kind = {"int": int, "float": float}.get(type(default).__name__, str)
            if f.name in ("lr", "weight_decay"):
                kind = float
            elif f.name in ("max_examples",):
                kind = int
            g.add_argument(flag, type=kind, default=default, help=h)


def config_from_args(args):
    from shortened.cli.args import load_options
    from shortened.converter.retrain import RetrainConfig
    from shortened.errors import UsageError

    kw = {}
    for f in dataclasses.fields(RetrainConfig):
        if f.name in ("load", "extra_args"):
            continue
        kw[f.name] = getattr(args, f.name)
    kw["bf16"] = {"auto": None, "on": True, "off": False}[args.bf16]
    if isinstance(kw["lora_targets"], str) and "," in kw["lora_targets"]:
        kw["lora_targets"] = [t for t in kw["lora_targets"].split(",") if t]
    extra = {}
    for item in args.trainer_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--trainer-arg expects KEY=VALUE, got {item!r}")
        try:
            extra[key] = json.loads(value)  # numbers, booleans, JSON objects
        except json.JSONDecodeError:
            extra[key] = value  # plain strings (paths, 'full_shard auto_wrap')
    return RetrainConfig(**kw, load=load_options(args), extra_args=extra)


def register(sub, groups) -> None:
    from shortened.cli.args import add_load_args

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
    _add_config_args(p)
    add_load_args(p)
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("eval", help="perplexity (paper protocol) and zero-shot accuracy (lm-eval)")
    p.add_argument("model", help="model directory, hub id, .gguf file, or an ONNX export (run in onnxruntime)")
    p.add_argument("--ppl", default=None, help="comma list of text sources: wikitext2, ptb, or text files")
    p.add_argument("--seq-len", type=int, default=128, help="perplexity window length in tokens (default 128)")
    p.add_argument("--add-bos", action="store_true", default=None, help="BOS on every window (default: Gemma only)")
    p.add_argument("--max-windows", type=int, help="score only the first N windows")
    p.add_argument(
        "--tasks", nargs="?", const="paper", help="lm-eval tasks (comma list, task:metric); bare: the paper's seven"
    )
    p.add_argument("--limit", type=float, help="lm-eval: examples per task (or a fraction)")
    p.add_argument("--include-path", help="lm-eval: a folder of task YAMLs (local tasks)")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", help="also write the results to this JSON file")
    add_load_args(p)
    p.set_defaults(func=cmd_eval)


def cmd_retrain(args) -> int:
    from shortened.converter.retrain import retrain

    cfg = config_from_args(args)
    rec = retrain(args.model, args.out, config=cfg, force=args.force, progress=not args.no_progress)
    if rec:
        keys = ("method", "steps", "best_step", "best_val_loss", "train_loss", "seconds")
        print(json.dumps({"out": args.out, **{k: rec[k] for k in keys}, "initial_val": rec["losses"]["initial_val"]}))
    return 0


def cmd_eval(args) -> int:
    from shortened.cli.args import load_options
    from shortened.errors import UsageError
    from shortened.io import check_output_file, write_output_json
    from shortened.validators.quality import evaluate

    ppl_files = [s for s in (args.ppl or "").split(",") if s]
    inputs = {"model": args.model, "text": ppl_files}  # (a report beside lm-eval task YAMLs is harmless)
    if args.json:
        check_output_file(args.json, force=True, inputs=inputs)  # before any work; rewrites only our own report
    limit = args.limit
    if limit is not None and limit >= 1:
        if limit != int(limit):
            raise UsageError(f"--limit is a count (>= 1) or a fraction (< 1), got {limit}")
        limit = int(limit)
    res = evaluate(
        args.model,
        ppl=args.ppl if args.ppl is not None else (None if args.tasks else "wikitext2"),
        seq_len=args.seq_len,
        add_bos=args.add_bos,
        tasks=args.tasks,
        limit=limit,
        include_path=args.include_path,
        batch_size=args.batch_size,
        max_windows=args.max_windows,
        num_fewshot=args.num_fewshot,
        load=load_options(args),
    )
    for src, r in res["perplexity"].items():
        print(f"ppl {src}: {r['ppl']:.4f} ({r['windows']} windows of {r['seq_len']} tokens)")
    zs = res.get("zeroshot")
    if zs:
        for task, r in zs["tasks"].items():
            print(f"{task} {r['metric']}: {r['value']:.4f}")
        print(f"average: {zs['average']:.4f}")
    if args.json:
        write_output_json(args.json, res, inputs=inputs)
    return 0
