"""The whole build step: config in; pruned checkpoint, ONNX (and TensorRT) artifacts, manifest and report out.

    score -> prune -> retrain (optional) -> export ONNX (-> TensorRT where available) -> parity -> quality -> speed

The steps are a table (table.py); `convert` runs it. Work happens in `<out>.partial/` next to the output; `<out>`
appears (by rename) only when every step has run. Each step records a key: the hash of its settings, of its inputs'
fingerprints and of the keys of the steps it depends on. A re-run (with --force once `<out>` exists, or after an
interruption) reuses every step whose key is unchanged and says so; changing an input changes the keys of the steps
that depend on it, and those run again. Re-run on its own finished output with the same inputs and settings,
`convert` does nothing and says the output is up to date; --force is only needed to replace an output made with
other settings. Paths in the manifest are relative to the output directory.
Exit codes: 0 every gate passed, 1 a gate failed (artifacts and manifest still written), 2 bad configuration.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path

from shortened.converter.criteria import BlockScores
from shortened.errors import GateFailed, UsageError
from shortened.io import MARKER, check_output_dir, is_own_output, sha256_file, write_json, write_marker
from shortened.pipeline.config import ConvertConfig
from shortened.pipeline.report import evaluate_gates, render_report, summary_table
from shortened.pipeline.table import Ctx, Step, fingerprints, plain, plan, step_keys, suffix
from shortened.plots import plot_block_scores
from shortened.validators.quality import overlap_notes
from shortened.versions import RUN_PACKAGES, versions

# ---------------------------------------------------------------------------------------------
# Step bookkeeping


class Steps:
    """Records which steps finished in the work directory, with their keys, and decides what to reuse."""

    def __init__(self, work: Path, rerun: list, say):
        self.work, self.rerun, self.say = work, set(rerun), say
        self.path = work / "steps.json"
        self.done = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.log: dict = {}

    def cached(self, name: str, key: str) -> dict | None:
        rec = self.done.get(name)
        if rec and rec["key"] == key and name.split("-")[0] not in self.rerun:  # --rerun onnx: every precision's
            self.say(f"[{name}] reusing the finished step (key {key}, {rec['seconds']:.0f}s saved)")
            self.log[name] = {**rec, "reused": True}
            return rec["result"]
        return None

    def finish(self, name: str, key: str, result, seconds: float) -> None:
        rec = {"key": key, "seconds": seconds, "result": result, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.done[name] = rec
        self.log[name] = {**rec, "reused": False}
        write_json(self.path, self.done)

    def forget(self, name: str) -> None:
        self.done.pop(name, None)
        write_json(self.path, self.done)


def _run_step(steps: Steps, name: str, key: str, fn, say):
    """One step: its recorded result when its key is unchanged, else run it (paths in its result made relative)."""
    res = steps.cached(name, key)
    if res is not None:
        return res
    steps.forget(name)  # its old artifacts are about to be replaced
    say(f"[{name}] running")
    t0 = time.perf_counter()
    res = plain(fn(), steps.work)
    steps.finish(name, key, res, time.perf_counter() - t0)
    say(f"[{name}] done in {time.perf_counter() - t0:.1f}s")
    return res


def run_steps(table: list[Step], keys: dict, ctx: Ctx, steps: Steps) -> dict:
    """Run the table in order; {name: result}. A step gets the results of the steps it comes after."""
    results: dict = {}
    for step in table:
        if step.skip:
            ctx.say(f"[{step.name}] skipped: {step.skip}")
            results[step.name] = {"skipped": step.skip}
            continue
        fn = partial(step.run, ctx, {d: results[d] for d in step.after})
        results[step.name] = _run_step(steps, step.name, keys[step.name], fn, ctx.say)
    return results


# ---------------------------------------------------------------------------------------------
# The build step


def convert(cfg: ConvertConfig, progress: bool = True, say=None) -> dict:
    """Run the whole build step; returns the manifest. Raises GateFailed (after writing everything) when a
    gate fails, UsageError (before any heavy work) when the configuration is invalid."""
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    finished = _finished_manifest(cfg)
    # an output of this tool may be there without --force: when it is up to date, nothing is replaced
    (dataclasses.replace(cfg, force=True) if finished else cfg).validate()
    table, fps = plan(cfg), fingerprints(cfg)
    keys = step_keys(table, cfg, fps)
    out = Path(cfg.out).resolve()
    if finished is not None:
        if not _up_to_date(cfg, finished, keys):
            check_output_dir(cfg.out, False, cfg.inputs())  # raises: it exists, pass --force
        return _report_up_to_date(finished, out, say)
    work = _work_dir(out, say)
    try:
        return _convert(cfg, table, keys, fps, out, work, progress, say)
    except KeyboardInterrupt:
        say(f"interrupted: the finished steps are kept in {work}; run the same command again to resume them")
        raise
    except OSError as e:  # disk full and the like, in a step that writes into the work directory
        from shortened.io import WRITE_ERRNOS, _write_failed

        if e.errno in WRITE_ERRNOS:
            raise _write_failed(e, work, kept="the finished steps are kept and reused by the next run") from e
        raise


def _finished_manifest(cfg: ConvertConfig) -> dict | None:
    """The manifest of a finished output of this tool at `out`, when there is one and no --force."""
    out = Path(cfg.out).resolve() if cfg.out else None
    if cfg.force or out is None or not out.is_dir() or not is_own_output(out):
        return None
    try:
        m = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("steps"), dict) else None


def _up_to_date(cfg: ConvertConfig, manifest: dict, keys: dict) -> bool:
    """Same settings (but --force), every step's key unchanged (so the same inputs) and every artifact there."""
    same = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items() if k not in ("force", "out")}
    was = {k: v for k, v in manifest.get("config", {}).items() if k not in ("force", "out")}
    recorded = {k: v.get("key") for k, v in manifest["steps"].items()}
    out = Path(cfg.out).resolve()
    intact = all((out / f).is_file() and (out / f).stat().st_size == a.get("bytes")
                 for f, a in manifest.get("artifacts", {}).items())  # fmt: skip
    return not cfg.rerun and same == was and recorded == keys and intact


def _report_up_to_date(manifest: dict, out: Path, say) -> dict:
    say(f"shortened convert: {out} is up to date (same inputs and settings as its manifest.json); nothing to do")
    failed = [f"{k}: {g['detail']}" for k, g in manifest["gates"].items() if not g["passed"]]
    if failed:  # the verdict stays what it was
        raise GateFailed("; ".join(failed) + f" (artifacts and manifest in {out})")
    return manifest


def _work_dir(out: Path, say) -> Path:
    """`<out>.partial`, holding the finished steps: those of the interrupted run, or of `<out>` (--force)."""
    work = out.with_name(f".{out.name}.partial")
    if work.exists() and not ((work / MARKER).is_file() or (work / "steps.json").is_file()):
        raise UsageError(f"{work} exists and is not a partial run of shortened convert; move it away or choose "
                         "another --out")  # fmt: skip
    if out.exists():  # --force (checked: an output of this tool): finished steps of the previous run are reused
        if work.exists():
            shutil.rmtree(work)
        os.replace(out, work)
    elif work.exists():
        say(f"resuming the interrupted run in {work}: finished steps are reused")
    work.mkdir(parents=True, exist_ok=True)
    write_marker(work)
    return work


def _convert(cfg: ConvertConfig, table, keys, fps, out: Path, work: Path, progress: bool, say) -> dict:
    t_start = time.perf_counter()
    steps = Steps(work, cfg.rerun, say)
    res = run_steps(table, keys, Ctx(cfg, work, progress, say), steps)
    if "score" in res:
        plot_block_scores(BlockScores.from_dict(res["score"]), work / "scores.png", removed=res["prune"]["removed"])
    manifest = _manifest(cfg, res, steps.log, fps)
    manifest["seconds"] = round(time.perf_counter() - t_start, 1)
    (work / "report.md").write_text(render_report(manifest, res))
    manifest["artifacts"] = _artifacts(work)
    write_json(work / "manifest.json", manifest)
    (work / "steps.json").rename(work / ".steps.json")  # bookkeeping, not an artifact
    os.replace(work, out)
    (out / ".steps.json").rename(out / "steps.json")
    say(summary_table(manifest, out, res.get("speed")))
    failed = [f"{k}: {g['detail']}" for k, g in manifest["gates"].items() if not g["passed"]]
    if failed:
        raise GateFailed("; ".join(failed) + f" (artifacts and manifest in {out})")
    return manifest


def _manifest(cfg: ConvertConfig, res: dict, log: dict, fps: dict) -> dict:
    """What was made, from the steps' results (paths relative to the output directory)."""
    precisions = cfg.all_precisions()
    scores, pruned, parity, quality = res.get("score"), res["prune"], _parity(cfg, res), res.get("quality")
    speed = {"decode_speedup": res["speed"]["decode_speedup"], "report": "speed.json"} if "speed" in res else None
    gates = evaluate_gates(cfg, parity, quality, res.get("speed"))
    return {
        "tool": versions(RUN_PACKAGES, environment=True),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": {"model": fps["model"], "calibration": fps["calib"] if cfg.calib else None},
        "config": dataclasses.asdict(cfg),
        "pruning": {
            "removed_blocks": pruned["removed"],
            "num_blocks": pruned["num_blocks"],
            "kept": pruned["kept"],
            "criterion": cfg.criterion if scores else "manual",
            "removal_order": scores["removal_order"] if scores else None,
            "scores": scores["scores"] if scores else None,
            "selection": pruned.get("selection"),
            "recovery": pruned.get("recovery"),
        },
        "sweep": _without_table(res["sweep"]) if "sweep" in res else None,
        "retraining": res.get("retrain"),
        "onnx": res["onnx"],
        "exports": {p: res["onnx" + suffix(cfg, p)] for p in precisions},
        "tensorrt": res["tensorrt"],
        "parity": parity,
        "quality": quality,
        "quality_notes": _quality_notes(cfg) if quality is not None else [],
        "speed": speed,
        "gates": gates,
        "passed": all(g["passed"] for g in gates.values()),
        "steps": {
            k: {"key": r["key"], "seconds": round(r["seconds"], 2), "reused": r["reused"]} for k, r in log.items()
        },
    }


def _without_table(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "table"}


def _parity(cfg: ConvertConfig, res: dict) -> dict:
    """Every exported precision's parity, and whether all passed."""
    by = {p: _without_table(res["parity" + suffix(cfg, p)]) for p in cfg.all_precisions()}
    return {
        "passed": all(p["passed"] for p in by.values()),
        "failures": [f"{k}: {f}" for k, p in by.items() for f in p["failures"]],
        "providers": by[cfg.all_precisions()[0]]["providers"],
        "by_precision": by,
    }


def _quality_notes(cfg: ConvertConfig) -> list:
    return overlap_notes(cfg.eval_text, {"calibration": cfg.calib, "recovery calibration": cfg.recover_calib,
                                         "retraining": cfg.retrain_data})  # fmt: skip


def _artifacts(out: Path) -> dict:
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json" and p.name != "steps.json")
    return {str(p.relative_to(out)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files}
