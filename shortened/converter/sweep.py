"""The quality/speed curve: for k = 1..K removed blocks, the held-out perplexity without and with recovery and
the ideal speedup; and the budget: the largest k whose held-out perplexity ratio stays within R.

Sets are chosen on the calibration text (selection.py), the maps fitted on the recovery text; the held-out
perplexity comes from a `HiddenCache` of the evaluation windows (quality.perplexity's protocol: non-overlapping
windows, every token predicted), so each k only runs the blocks from its first change on.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from shortened.converter.criteria import protected_blocks
from shortened.converter.recovery import cache_hiddens, check_recoverable, variant_ppl
from shortened.converter.selection import candidate_sets, check_plan, fit_depths, iterative_order, score_sets
from shortened.converter.steps import PlanOptions, ScoreOptions
from shortened.data import CalibBatch, CalibSpec, load_calibration, read_text, token_windows
from shortened.errors import UsageError
from shortened.io import atomic_dir, check_output_dir, write_json
from shortened.model.cost import ideal_speedup
from shortened.model.families import family_for, num_blocks
from shortened.model.loading import Loaded, load_config, load_model
from shortened.options import apply
from shortened.plots import _plt


def eval_batch(tokenizer, source: str, seq_len: int = 128, max_windows: int | None = None, add_bos=None, config=None):
    """quality.perplexity's windows as a batch (every position real)."""

    if add_bos is None:
        add_bos = family_for(config).needs_bos if config is not None else False
    ids = tokenizer(read_text(source), add_special_tokens=False)["input_ids"]
    w = token_windows(ids, seq_len, tokenizer.bos_token_id if add_bos else None, max_windows)
    return CalibBatch(w, torch.ones_like(w), {"source": source, "seq_len": seq_len, "windows": len(w)})


def _ideal(config, k: int, context: int) -> float:

    pruned = copy.deepcopy(config)
    setattr(pruned, family_for(config).num_layers_key, num_blocks(config) - k)
    return ideal_speedup(config, pruned, context)


def final_ppl(row: dict) -> float:
    return row["heldout_ppl_recovered"] if row.get("recovered") else row["heldout_ppl"]


def pick_k(rows: list[dict], base_ppl: float, max_ppl_ratio: float) -> int:
    """The largest k whose held-out perplexity (after recovery where it was kept) / the original's <= R; 0 if none."""
    ok = [r["k"] for r in rows if final_ppl(r) / base_ppl <= max_ppl_ratio]
    return max(ok, default=0)


def _candidate_sets(m, score_cache, select: str, candidates, k_max: int, progress: bool) -> dict:
    """{k: {name: blocks}} for k = 1..k_max; step 1 of the iterative order is the ppl criterion's top-k."""
    it, topk = None, None
    if select != "span":
        full = select in ("iterative", "best")
        it, steps, _ = iterative_order(m, score_cache, candidates, k_max if full else 1, progress)
        topk = sorted(candidates, key=lambda i: steps[0]["scores"][i])
        it = it if full else None
    return {k: candidate_sets(select, k, candidates, topk, it) for k in range(1, k_max + 1)}


def _fit_cache(m, tok, config, all_sets: dict, recover: str, fit_spec, micro_batch: int, progress: bool):
    """The hidden states the linear maps are fitted on, at the depths any candidate set needs (None: no recovery)."""
    if recover != "linear":
        return None
    for sets in all_sets.values():
        for b in sets.values():
            check_recoverable(config, b)
    depths = set().union(*(fit_depths(s) for s in all_sets.values()))
    return cache_hiddens(m, load_calibration(fit_spec, tok), micro_batch, depths=depths, progress=progress)


def _row(m, config, k: int, sets, score_cache, fit_cache, eval_cache, base_ppl: float, select, recover, plan) -> dict:
    """The best of k's candidate sets by calibration perplexity (after recovery), and its held-out figures."""
    best = score_sets(m, sets, score_cache, fit_cache, recover, plan.ridge, plan.recover_order, False, select).best
    row = {
        "k": k,
        "blocks": best.blocks,
        "selected_by": best.name,
        "calib_ppl": best.score,
        "heldout_ppl": variant_ppl(m, eval_cache, best.blocks),
        "recovered": best.recovered,
        "ideal_speedup": _ideal(config, k, 0),
        "ideal_decode_speedup_ctx128": _ideal(config, k, 128),
    }
    if best.recovery is not None:
        row["heldout_ppl_recovered"] = variant_ppl(m, eval_cache, best.blocks, best.recovery.maps)
    row["heldout_ratio"] = final_ppl(row) / base_ppl
    return row


def sweep(
    model,
    eval_text: str,
    calib: CalibSpec,
    k_max: int | None = None,
    *,
    opts: ScoreOptions | None = None,
    plan: PlanOptions | None = None,
    eval_seq_len: int = 128,
    eval_max_windows: int | None = 60,
    add_bos: bool | None = None,
    max_ppl_ratio: float | None = None,
    load=None,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    **settings,
) -> dict:
    """Rows for k = 1..k_max (default: 40% of the blocks, at most the unprotected ones): the chosen set, its
    calibration perplexity, held-out perplexity without and with recovery, its ratio and the ideal speedup.
    With `out`: sweep.json, sweep.md and sweep.png there. With max_ppl_ratio: "picked_k" (pick_k).
    opts: protect, no_protect and micro_batch (the criterion is the iterative order's: ppl); settings:
    ScoreOptions / PlanOptions fields by name (protect=[0], recover="linear")."""

    opts, plan = apply([opts or ScoreOptions(), plan or PlanOptions()], settings, "sweep")
    protect, no_protect, micro_batch = opts.protect, opts.no_protect, opts.micro_batch
    src = model.source if isinstance(model, Loaded) else str(model)
    rc = plan.recover_calib.source if isinstance(plan.recover_calib, CalibSpec) else plan.recover_calib
    inputs = {"model": src, "eval text": eval_text, "calibration": calib.source if calib else None,
              "recovery calibration": rc}  # fmt: skip
    if out is not None:
        check_output_dir(out, force, inputs)
    if calib is None:
        raise UsageError("the sweep chooses sets on calibration text: pass --calib FILE")
    calib.validate()
    config = model.model.config if isinstance(model, Loaded) else load_config(str(model))
    select, recover, fit_spec = check_plan(plan, calib, config)
    n = num_blocks(config)
    protected = protected_blocks(n, protect, no_protect)
    candidates = [i for i in range(n) if i not in protected]
    k_max = k_max or max(1, min(len(candidates), round(0.4 * n)))
    if not 1 <= k_max <= len(candidates):
        raise UsageError(f"--max-remove must be between 1 and {len(candidates)} (the unprotected blocks), got {k_max}")
    if max_ppl_ratio is not None and max_ppl_ratio < 1:
        raise UsageError(f"--max-ppl-ratio must be at least 1 (perplexity grows when blocks go), got {max_ppl_ratio}")
    t0 = time.perf_counter()
    loaded = model if isinstance(model, Loaded) else load_model(str(model), load)
    m, tok = loaded.model, loaded.tokenizer
    score_cache = cache_hiddens(m, load_calibration(calib, tok), micro_batch, progress=progress)
    ev = eval_batch(tok, eval_text, eval_seq_len, eval_max_windows, add_bos, config)
    eval_cache = cache_hiddens(m, ev, micro_batch, progress=progress)
    base_ppl = variant_ppl(m, eval_cache, [])
    all_sets = _candidate_sets(m, score_cache, select, candidates, k_max, progress)
    fit_cache = _fit_cache(m, tok, config, all_sets, recover, fit_spec, micro_batch, progress)
    rows = [_row(m, config, k, all_sets[k], score_cache, fit_cache, eval_cache, base_ppl, select, recover, plan)
            for k in tqdm(range(1, k_max + 1), desc="sweep: k", disable=not progress)]  # fmt: skip
    res = {
        "model": str(loaded.source),
        "num_blocks": n,
        "select": select,
        "recover": recover,
        "calibration": calib.source,
        "recovery_calibration": fit_spec.source if fit_spec else None,
        "eval": ev.description,
        "original_heldout_ppl": base_ppl,
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if max_ppl_ratio is not None:
        res["max_ppl_ratio"] = max_ppl_ratio
        res["picked_k"] = pick_k(rows, base_ppl, max_ppl_ratio)
    if out is not None:
        with atomic_dir(out, force, inputs) as tmp:
            write_sweep(res, tmp)
    return res


def table(res: dict) -> str:
    lines = [
        f"Held-out perplexity ({res['eval']['source']}, {res['eval']['windows']} x {res['eval']['seq_len']} tokens): "
        f"original {res['original_heldout_ppl']:.2f}. Sets chosen by `{res['select']}` on the calibration text; "
        f"recovery `{res['recover']}`.",
        "",
        "| k | blocks removed | chosen set | held-out PPL | with recovery | ratio | ideal speedup |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["rows"]:
        rec = r.get("heldout_ppl_recovered")
        rec_s = "-" if rec is None else f"{rec:.2f}" + ("" if r["recovered"] else " (not kept)")
        mark = " <- picked" if res.get("picked_k") == r["k"] else ""
        lines.append(
            f"| {r['k']} | {r['blocks']} | {r['selected_by']} | {r['heldout_ppl']:.2f} | {rec_s} | "
            f"{r['heldout_ratio']:.3f}{mark} | {r['ideal_speedup']:.3f}x |"
        )
    if "picked_k" in res:
        lines += ["", f"Budget {res['max_ppl_ratio']}x: the largest k within it is {res['picked_k']}."]
    return "\n".join(lines)


def write_sweep(res: dict, out: Path) -> None:

    out = Path(out)
    write_json(out / "sweep.json", res)
    (out / "sweep.md").write_text(table(res) + "\n")
    plot_sweep(res, out / "sweep.png")


def plot_sweep(res: dict, path) -> Path | None:

    plt = _plt()
    if plt is None:
        return None
    ks = [r["k"] for r in res["rows"]]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(ks, [r["heldout_ppl"] for r in res["rows"]], "o-", color="#d62728", label="removed, no recovery")
    if any("heldout_ppl_recovered" in r for r in res["rows"]):
        ax.plot(ks, [r.get("heldout_ppl_recovered", math.nan) for r in res["rows"]], "s-", color="#1f77b4",
                label="with linear recovery")  # fmt: skip
    ax.axhline(res["original_heldout_ppl"], color="k", ls="--", lw=0.8, label="original")
    if res.get("max_ppl_ratio"):
        ax.axhline(res["original_heldout_ppl"] * res["max_ppl_ratio"], color="#2ca02c", ls=":", label="budget")
    ax.set_yscale("log")
    ax.set_xlabel("blocks removed (k)")
    ax.set_ylabel("held-out perplexity")
    ax2 = ax.twinx()
    ax2.plot(ks, [r["ideal_speedup"] for r in res["rows"]], "^--", color="#7f7f7f", label="ideal speedup")
    ax2.set_ylabel("ideal speedup (FLOPs)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    ax.set_title("Quality against speed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
