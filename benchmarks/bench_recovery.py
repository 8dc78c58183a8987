"""Benchmark (issue 12): selection and training-free linear recovery on SmolLM2-135M, 6 of 30 blocks removed.

Held-out: WikiText-2 test, the first 60 non-overlapping 128-token windows (quality.perplexity's protocol).
Selection is scored on 10 x 128 calibration windows of --calib (not WikiText), the maps are fitted on
--samples windows of the same file with another seed. For each selection (criterion top-k, best span, iterative)
the table gives the held-out perplexity without and with recovery and the seconds each took, with the load
average beside the timings (the machine is shared). Goals: training-free <= 100 PPL, a prune with recovery in
<= 3 minutes, iterative scoring with reuse <= 0.6x the time of rescoring (--iterative-both).

    python benchmarks/bench_recovery.py --model ~/.cache/shortened/smollm2-135m-instruct \\
        --calib ../shared/data/text/corpus_en.txt --eval ../shared/data/wikitext2/test.raw.txt
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def iterative_work(order: list[int], candidates: list[int], n: int) -> dict:
    """(block passes, head passes) of the iterative order, rescoring (criteria.ppl_scores on a copy, the full
    forward included) against reuse (selection.iterative_order), for the removal `order` found: a load-free
    count to set beside the timings."""
    old_b = old_h = new_b = new_h = 0
    removed: list[int] = []
    last = None
    new_b += n  # the cache: one decoder pass, no head
    new_h += 1  # the base perplexity
    for r in order:
        alive = [i for i in range(n) if i not in removed]
        cands = [i for i in candidates if i not in removed]
        old_b += len(alive)  # capture: a full forward ...
        old_h += 2  # ... with its logits, and the base perplexity from the cached output
        for i in cands:
            later = [j for j in alive if j > i]
            old_b += len(later)
            old_h += 1
            start = last if last is not None and last > i else i
            new_b += len([j for j in alive if j > start and j != i])
            new_h += 1
        removed.append(r)
        last = r
    return {"rescoring": {"blocks": old_b, "heads": old_h}, "reuse": {"blocks": new_b, "heads": new_h}}


def heal(pruned: Path, out: Path, args) -> dict:
    """Retrain for a wall-clock budget (retrain's max_minutes), then the held-out perplexity."""
    from shortened.converter.retrain import retrain
    from shortened.model.loading import load_model
    from shortened.validators.quality import perplexity

    # A constant rate, no warmup: the budget, not max_steps, ends the run, so a cosine with 3% warmup over 10,000
    # steps never left its warmup. corpus_en.txt is ~30 steps of 8 x 128 tokens an epoch and over-fits after ~2:
    # span 13-18 recovered (105.1), partial, 5e-4: 60 steps (2 epochs, best validation at 60) 86.0; 163 steps
    # (5.4 epochs, validated only at the end) 234.0. So validation every 10 steps keeps the best checkpoint.
    t = time.perf_counter()
    rec = retrain(str(pruned), out, method=args.heal_method, data=args.heal_data, max_steps=10_000, seq_len=128,
                  batch_size=8, eval_steps=10, lr=5e-4, warmup_ratio=0.0, scheduler="constant",
                  max_minutes=args.heal_minutes, progress=False)  # fmt: skip
    p = load_model(str(out))
    ppl = perplexity(p.model, p.tokenizer, args.eval, 128, max_windows=60, progress=False).ppl
    return {"method": args.heal_method, "steps": rec["steps"], "seconds": round(time.perf_counter() - t, 1),
            "heldout_ppl": ppl, "data": args.heal_data, "load": load()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", default=str(SHARED / "text" / "corpus_en.txt"))
    ap.add_argument("--eval", default=str(SHARED / "wikitext2" / "test.raw.txt"))
    ap.add_argument("--remove", type=int, default=6)
    ap.add_argument("--samples", default="128", help="comma-separated fitting window counts to compare")
    ap.add_argument("--ridge", type=float, default=None)
    ap.add_argument("--selections", default="topk,span,iterative")
    ap.add_argument("--iterative-both", action="store_true", help="also time the iterative order by rescoring")
    ap.add_argument("--prune", action="store_true", help="time the whole `prune` (default path) into a temp dir")
    ap.add_argument("--heal-minutes", type=float, default=0, help="after --prune: partial retraining for this long")
    ap.add_argument("--heal-method", default="partial", help="retrain method for --heal-minutes")
    ap.add_argument("--heal-data", default=str(SHARED / "text" / "corpus_en.txt"), help="retraining text, not WikiText")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import torch

    from shortened.converter.criteria import protected_blocks, score_blocks
    from shortened.converter.recovery import DEFAULT_RIDGE, cache_hiddens, fit_recovery, needed_depths, variant_ppl
    from shortened.converter.selection import iterative_order, score_sets, spans
    from shortened.converter.sweep import eval_batch
    from shortened.data import CalibSpec, load_calibration
    from shortened.model.loading import load_model

    ridge = DEFAULT_RIDGE if args.ridge is None else args.ridge
    out: dict = {"threads": torch.get_num_threads(), "start": load()}
    print(f"torch threads {torch.get_num_threads()}; {load()}", flush=True)
    m = load_model(args.model)
    model, tok = m.model, m.tokenizer
    k = args.remove
    n = len(model.model.layers)
    cands = [i for i in range(n) if i not in protected_blocks(n)]
    calib = CalibSpec(args.calib, 10, 128, 0)
    t = time.perf_counter()
    score_cache = cache_hiddens(model, load_calibration(calib, tok))
    eval_cache = cache_hiddens(model, eval_batch(tok, args.eval, 128, 60))
    base = variant_ppl(model, eval_cache, [])
    print(f"caches {time.perf_counter() - t:.1f}s; original held-out PPL {base:.2f}; {load()}", flush=True)
    out["original_ppl"] = base

    sets, secs = {}, {}
    sel_names = args.selections.split(",")
    if "topk" in sel_names or "iterative" in sel_names:
        t = time.perf_counter()
        order, steps, _ = iterative_order(model, score_cache, cands, k if "iterative" in sel_names else 1, False)
        secs["iterative"] = time.perf_counter() - t
        secs["topk"] = secs["iterative"] / max(1, len(steps)) * 1  # step 1 is the ppl criterion (leave-one-out)
        sets["topk"] = sorted(sorted(cands, key=lambda i: steps[0]["scores"][i])[:k])
        if "iterative" in sel_names:
            sets["iterative"] = sorted(order[:k])
        print(f"ppl criterion/iterative order {secs['iterative']:.1f}s: {sets}; {load()}", flush=True)
        if "iterative" in sel_names:
            out["iterative_work"] = iterative_work(order[:k], cands, n)
            print(f"iterative work (block passes, head passes): {out['iterative_work']}", flush=True)
    if "span" in sel_names:
        t = time.perf_counter()
        sel = score_sets(model, {f"span {s[0]}-{s[-1]}": s for s in spans(cands, k)}, score_cache, progress=False)
        secs["span"] = time.perf_counter() - t
        sets["span"] = sel.best.blocks
        out["span_scores_no_recovery"] = {c.name: c.calib_ppl_no_recovery for c in sel.candidates}
        print(f"best span without recovery {sel.best.name} in {secs['span']:.1f}s; {load()}", flush=True)

    if args.iterative_both:
        batch = load_calibration(calib, tok)
        kw = dict(iterative=True, num_remove=k, progress=False)
        t = time.perf_counter()
        a = score_blocks(model, "ppl", batch, reuse=True, **kw)
        t_reuse = time.perf_counter() - t
        t = time.perf_counter()
        b = score_blocks(model, "ppl", batch, reuse=False, **kw)
        t_old = time.perf_counter() - t
        out["iterative_time"] = {"reuse_s": t_reuse, "rescoring_s": t_old, "ratio": t_reuse / t_old,
                                 "same_order": a.removal_order == b.removal_order, "load": load()}  # fmt: skip
        print(f"iterative: reuse {t_reuse:.1f}s, rescoring {t_old:.1f}s, ratio {t_reuse / t_old:.2f}; {load()}")

    span_sets = {f"span {s[0]}-{s[-1]}": s for s in spans(cands, k)} if "span" in sel_names else {}
    depths = set().union(*(needed_depths(b) for b in [*sets.values(), *span_sets.values()]))
    rows = []
    for ns in [int(x) for x in args.samples.split(",")]:
        t = time.perf_counter()
        fit_cache = cache_hiddens(model, load_calibration(CalibSpec(args.calib, ns, 128, 1), tok), depths=depths)
        t_cache = time.perf_counter() - t
        for name, blocks in sets.items():
            t = time.perf_counter()
            rec = fit_recovery(model, fit_cache, blocks, score_cache, ridge)
            t_fit = time.perf_counter() - t
            row = {"selection": name, "blocks": blocks, "samples": ns, "select_s": round(secs[name], 1),
                   "heldout_ppl": variant_ppl(model, eval_cache, blocks),
                   "heldout_ppl_recovered": variant_ppl(model, eval_cache, blocks, rec.maps),
                   "calib_ppl": variant_ppl(model, score_cache, blocks), "calib_ppl_recovered": rec.calib_ppl,
                   "order": rec.order, "fit_cache_s": round(t_cache, 1), "fit_s": round(t_fit, 1),
                   "load": load()}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
        if span_sets:  # what prune does: every span scored on the calibration text after its own recovery
            t = time.perf_counter()
            sel = score_sets(model, span_sets, score_cache, fit_cache, "linear", ridge, progress=False)
            best = sel.best
            row = {"selection": "span (chosen after recovery)", "blocks": best.blocks, "samples": ns,
                   "select_s": round(time.perf_counter() - t, 1),
                   "heldout_ppl": variant_ppl(model, eval_cache, best.blocks),
                   "heldout_ppl_recovered": variant_ppl(model, eval_cache, best.blocks, best.recovery.maps),
                   "calib_ppl_recovered": {c.name: c.calib_ppl for c in sel.candidates},
                   "fit_cache_s": round(t_cache, 1), "fit_s": 0.0, "load": load()}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    out["rows"] = rows

    if args.prune:
        import tempfile

        from shortened.converter.steps import prune

        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            prune(args.model, Path(d) / "p", criterion="ppl", calib=calib, remove=k, progress=False,
                  select="auto", recover="auto")  # fmt: skip
            out["prune_default_s"] = time.perf_counter() - t
            rec = json.loads((Path(d) / "p" / "pruning.json").read_text())
            p = load_model(str(Path(d) / "p"))
            from shortened.validators.quality import perplexity

            out["prune_default"] = {"removed": rec["removed_blocks"], "recovery": rec.get("recovery", {}).get("method"),
                                    "heldout_ppl": perplexity(p.model, p.tokenizer, args.eval, 128, max_windows=60,
                                                              progress=False).ppl, "load": load()}  # fmt: skip
            print(f"prune (default path) {out['prune_default_s']:.1f}s: {out['prune_default']}", flush=True)
            if args.heal_minutes:
                out["healing"] = heal(Path(d) / "p", Path(d) / "h", args)
                print(f"healing: {out['healing']}", flush=True)

    print("\n| selection | blocks | held-out PPL | with recovery | select s | fit s | samples |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['selection']} | {r['blocks']} | {r['heldout_ppl']:.1f} | {r['heldout_ppl_recovered']:.1f} | "
              f"{r['select_s']} | {r['fit_cache_s'] + r['fit_s']:.1f} | {r['samples']} |")  # fmt: skip
    out["end"] = load()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
