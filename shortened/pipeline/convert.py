"""The whole build step: config in; pruned checkpoint, ONNX (and TensorRT) artifacts, manifest and report out.

    score -> prune -> retrain (optional) -> export ONNX (-> TensorRT where available) -> parity -> quality -> speed

Work happens in `<out>.partial/` next to the output; `<out>` appears (by rename) only when every step has run.
Each step records a key: the hash of its settings and of the keys of the steps it depends on. A re-run (with
--force once `<out>` exists, or after an interruption) reuses every step whose key is unchanged and says so;
changing an input changes the keys of the steps that depend on it, and those run again.
Exit codes: 0 every gate passed, 1 a gate failed (artifacts and manifest still written), 2 bad configuration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from shortened.errors import GateFailed, UsageError
from shortened.io import (
    MARKER,
    file_record,
    fingerprint_path,
    sha256_file,
    write_json,
    write_marker,
)
from shortened.pipeline.config import ConvertConfig
from shortened.pipeline.report import evaluate_gates, render_report, summary_table
from shortened.versions import RUN_PACKAGES, versions

log = logging.getLogger(__name__)


def _onnx_dir(work: Path, cfg: ConvertConfig, precision: str) -> Path:
    """The first precision's export is <out>/onnx (as with one precision); the others <out>/onnx-<precision>."""
    return work / "onnx" if precision == cfg.all_precisions()[0] else work / f"onnx-{precision}"


def _suffix(cfg: ConvertConfig, precision: str) -> str:
    return "" if precision == cfg.all_precisions()[0] else f"-{precision}"


# ---------------------------------------------------------------------------------------------
# Step bookkeeping


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Steps:
    """Records which steps finished in the work directory, with their keys, and decides what to reuse."""

    def __init__(self, work: Path, rerun: list, say):
        self.work, self.rerun, self.say = work, set(rerun), say
        self.path = work / "steps.json"
        self.done = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.log: dict = {}

    def cached(self, name: str, key: str) -> dict | None:
        rec = self.done.get(name)
        if rec and rec["key"] == key and name not in self.rerun:
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
    res = steps.cached(name, key)
    if res is not None:
        return res
    steps.forget(name)  # its old artifacts are about to be replaced
    say(f"[{name}] running")
    t0 = time.perf_counter()
    res = fn()
    steps.finish(name, key, res, time.perf_counter() - t0)
    say(f"[{name}] done in {time.perf_counter() - t0:.1f}s")
    return res


def _replace_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


def _relocate_text(work: Path, out: Path) -> None:
    """Reports name paths inside the work directory; make them name where the files will be after the rename."""
    for p in work.rglob("*"):
        if p.is_file() and p.suffix in (".json", ".md", ".txt") and p.stat().st_size < 10_000_000:
            text = p.read_text(errors="ignore")
            if str(work) in text:
                p.write_text(text.replace(str(work), str(out)))
                rec = file_record(p)
                if rec.is_file():  # keep the record of an output file true to its new content
                    rec.write_text(json.dumps({**json.loads(rec.read_text()), "sha256": sha256_file(p)}) + "\n")


def _artifacts(out: Path) -> dict:
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json" and p.name != "steps.json")
    return {str(p.relative_to(out)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files}


def _sweep_step(cfg, steps, say, work, model_fp, load, calib, calib_fp, plan, load_opts, progress):
    """ratio = auto: sweep k = 1..K on the held-out text, keep the largest k within max_ppl_ratio; returns
    (its blocks, the step key). No k within the budget is a failed gate before any export."""
    text_fp = fingerprint_path(cfg.eval_text) if Path(cfg.eval_text).is_file() else cfg.eval_text
    recover_fp = fingerprint_path(cfg.recover_calib) if cfg.recover_calib else None
    key = _key("sweep", model_fp, load, calib_fp, dataclasses.asdict(calib), plan, recover_fp, text_fp,
               cfg.eval_seq_len, cfg.eval_max_windows, cfg.max_ppl_ratio, cfg.sweep_max_remove, cfg.protect,
               cfg.no_protect)  # fmt: skip

    def do_sweep():
        from shortened.converter.sweep import sweep

        res = sweep(cfg.model, cfg.eval_text, calib, cfg.sweep_max_remove or None, protect=cfg.protect,
                    no_protect=cfg.no_protect, eval_seq_len=cfg.eval_seq_len,
                    eval_max_windows=cfg.eval_max_windows or None, max_ppl_ratio=cfg.max_ppl_ratio, load=load_opts,
                    out=_replace_dir(work / "sweep"), force=True, progress=progress, **plan)  # fmt: skip
        return {"picked_k": res["picked_k"], "rows": res["rows"], "original_heldout_ppl": res["original_heldout_ppl"]}

    res = _run_step(steps, "sweep", key, do_sweep, say)
    k = res["picked_k"]
    if k == 0:
        first = res["rows"][0]
        raise GateFailed(f"no k within max_ppl_ratio {cfg.max_ppl_ratio}: removing one block already gives a "
                         f"held-out ratio of {first['heldout_ratio']:.3f} (sweep in {work / 'sweep'})")  # fmt: skip
    say(f"[sweep] removing {k} blocks: the largest k within a held-out PPL ratio of {cfg.max_ppl_ratio}")
    return res["rows"][k - 1]["blocks"], key


# ---------------------------------------------------------------------------------------------
# The build step


def convert(cfg: ConvertConfig, progress: bool = True, say=None) -> dict:
    """Run the whole build step; returns the manifest. Raises GateFailed (after writing everything) when a
    gate fails, UsageError (before any heavy work) when the configuration is invalid."""
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    cfg.validate()
    out = Path(cfg.out).resolve()
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
    try:
        return _convert(cfg, out, work, progress, say)
    except KeyboardInterrupt:
        say(f"interrupted: the finished steps are kept in {work}; run the same command again to resume them")
        raise
    except OSError as e:  # disk full and the like, in a step that writes into the work directory
        from shortened.io import WRITE_ERRNOS, _write_failed

        if e.errno in WRITE_ERRNOS:
            raise _write_failed(e, work, kept="the finished steps are kept and reused by the next run") from e
        raise


def _convert(cfg: ConvertConfig, out: Path, work: Path, progress: bool, say) -> dict:
    steps = Steps(work, cfg.rerun, say)
    t_start = time.perf_counter()
    model_fp = fingerprint_path(cfg.model) if Path(cfg.model).exists() else {"hub_id": cfg.model}
    load = dict(dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    from shortened.model.loading import LoadOptions

    load_opts = LoadOptions(cfg.dtype, cfg.device, cfg.trust_remote_code)

    # 1. score
    from shortened.converter.criteria import BlockScores
    from shortened.data import CalibSpec

    calib = CalibSpec(cfg.calib, cfg.num_samples, cfg.seq_len, cfg.seed, cfg.add_bos) if cfg.calib else None
    calib_fp = fingerprint_path(cfg.calib) if cfg.calib and Path(cfg.calib).is_file() else {"source": cfg.calib}
    from shortened.converter.selection import resolve
    from shortened.model.loading import load_config

    select, _ = resolve(cfg.select, cfg.recover, load_config(cfg.model, cfg.trust_remote_code), bool(cfg.calib))
    fixed_ratio = None if cfg.ratio == "auto" else cfg.ratio
    # selection best/iterative with the ppl criterion: the iterative order's first step is the criterion itself
    iterative = cfg.iterative or (cfg.criterion == "ppl" and select in ("best", "iterative") and fixed_ratio)
    score_key = _key(
        "score",
        model_fp,
        load,
        calib_fp,
        dataclasses.asdict(calib) if calib else None,
        cfg.criterion,
        bool(iterative),
        cfg.protect,
        cfg.no_protect,
        None if not iterative else (cfg.remove, cfg.ratio),
    )

    def do_score():
        from shortened.converter.steps import save_scores, score

        s = score(
            cfg.model,
            calib,
            criterion=cfg.criterion,
            protect=cfg.protect,
            no_protect=cfg.no_protect,
            iterative=bool(iterative),
            num_remove=cfg.remove or None,
            ratio=fixed_ratio if fixed_ratio is not None else 0.2,
            load=load_opts,
            progress=progress,
        )
        from shortened.io import remove_output_file

        remove_output_file(work / "scores.json")  # the previous run's (its paths relocated by _relocate_text)
        save_scores(s, work / "scores.json", plot=False)
        return {"removal_order": s.removal_order, "base_ppl": s.base_ppl, "seconds": s.seconds}

    if cfg.blocks:
        scores = None
        score_key = _key("manual", cfg.blocks)
    else:
        _run_step(steps, "score", score_key, do_score, say)
        scores = BlockScores.from_dict(json.loads((work / "scores.json").read_text()))

    # 1b. the quality/speed sweep, when k is chosen by a perplexity budget
    plan = dict(select=cfg.select, recover=cfg.recover, recover_calib=cfg.recover_calib or None,
                recover_samples=cfg.recover_samples)  # fmt: skip
    blocks = cfg.blocks or None
    sweep_key = None
    if cfg.ratio == "auto" and not cfg.blocks and not cfg.remove:
        blocks, sweep_key = _sweep_step(cfg, steps, say, work, model_fp, load, calib, calib_fp, plan, load_opts,
                                        progress)  # fmt: skip

    # 2. prune
    recover_fp = fingerprint_path(cfg.recover_calib) if cfg.recover_calib else None
    prune_key = _key("prune", score_key, cfg.blocks, cfg.remove, cfg.ratio, cfg.protect, cfg.no_protect, plan,
                     recover_fp, sweep_key)  # fmt: skip

    def do_prune():
        from shortened.converter.steps import prune

        res = prune(
            cfg.model,
            _replace_dir(work / "pruned"),
            scores=scores,
            calib=calib,
            remove=cfg.remove or None,
            ratio=None if (cfg.remove or blocks) else cfg.ratio,
            blocks=blocks,
            protect=cfg.protect,
            no_protect=cfg.no_protect,
            load=load_opts,
            force=True,
            progress=progress,
            **plan,
        )
        rec = json.loads((work / "pruned" / "pruning.json").read_text())
        res["recovery"] = rec.get("recovery")
        res["selection"] = rec.get("selection")
        return res

    pruned = _run_step(steps, "prune", prune_key, do_prune, say)
    final_dir, final_key = work / "pruned", prune_key

    # 3. retrain (optional)
    retrain_info = None
    if cfg.retrain:
        data_fp = fingerprint_path(cfg.retrain_data) if Path(cfg.retrain_data).exists() else cfg.retrain_data
        retrain_key = _key("retrain", prune_key, cfg.retrain, data_fp, cfg.retrain_steps, cfg.retrain_options)

        def do_retrain():
            from shortened.converter.retrain import retrain

            opts = {"max_steps": cfg.retrain_steps, **cfg.retrain_options}
            teacher = cfg.model if cfg.retrain == "distill" else None
            return retrain(
                str(work / "pruned"),
                _replace_dir(work / "retrained"),
                method=cfg.retrain,
                data=cfg.retrain_data,
                teacher=teacher,
                force=True,
                progress=progress,
                **opts,
            )

        retrain_info = _run_step(steps, "retrain", retrain_key, do_retrain, say)
        final_dir, final_key = work / "retrained", retrain_key

    # 4. ONNX export: every precision; int4/int8 quantize this run's fp32 export when there is one (no re-trace)
    precisions = cfg.all_precisions()
    onnx_keys, exports = {}, {}
    for prec in precisions:
        quantized = prec in ("int4", "int8")
        from_fp32 = quantized and "fp32" in precisions
        onnx_keys[prec] = _key("onnx", final_key, prec, cfg.opset, cfg.optimize,
                               cfg.quant_options if quantized else None, onnx_keys.get("fp32") if from_fp32 else None,
                               cfg.calib if quantized else None)  # fmt: skip

        def do_onnx(prec=prec, quantized=quantized, from_fp32=from_fp32):
            from shortened.exporters.onnx import export_onnx

            target = _replace_dir(_onnx_dir(work, cfg, prec))
            if from_fp32:
                from shortened.exporters.quantize import quantize_export

                return quantize_export(_onnx_dir(work, cfg, "fp32"), target, prec, quant=dict(cfg.quant_options),
                                       calib=cfg.calib or None, force=True)  # fmt: skip
            return export_onnx(
                str(final_dir),
                target,
                precision=prec,
                opset=cfg.opset or None,
                optimize=cfg.optimize,
                force=True,
                progress=progress,
                quant=dict(cfg.quant_options) if quantized else None,
                calib=cfg.calib or None,
            )

        exports[prec] = _run_step(steps, "onnx" + _suffix(cfg, prec), onnx_keys[prec], do_onnx, say)
    onnx_key, onnx_info = onnx_keys[precisions[0]], exports[precisions[0]]

    # 5. TensorRT, where TensorRT and a GPU are present
    trt_info = {"skipped": "tensorrt = off"} if cfg.tensorrt == "off" else None
    if trt_info is None:
        from shortened.runtime.tensorrt import tensorrt_unavailable_reason

        reason = tensorrt_unavailable_reason()
        if reason:
            trt_info = {"skipped": reason}
            say(f"[tensorrt] skipped: {reason}")
        else:
            trt_key = _key("tensorrt", onnx_key, cfg.trt_batch, cfg.trt_seq)

            def do_trt():
                from shortened.exporters.tensorrt import export_tensorrt

                batch = tuple(int(x) for x in cfg.trt_batch.split(":"))
                seq = tuple(int(x) for x in cfg.trt_seq.split(":"))
                source = work / "onnx"
                # TensorRT gets the first precision; int4/int8 (MatMulNBits, an onnxruntime op) become int4 QDQ
                # (blocked DequantizeLinear) or fp32; the optimized graph holds onnxruntime-only ops: a portable export
                prec = precisions[0]
                quant = {"format": "qdq"} if prec == "int4" else None
                prec = "fp32" if prec == "int8" else prec
                if cfg.optimize or quant or prec != precisions[0]:
                    from shortened.exporters.onnx import export_onnx

                    source = _replace_dir(work / "onnx-portable")
                    export_onnx(str(final_dir), source, precision=prec, opset=cfg.opset or None,
                                force=True, progress=progress, quant=quant)  # fmt: skip
                return export_tensorrt(source, _replace_dir(work / "tensorrt"), batch, seq, force=True)

            trt_info = _run_step(steps, "tensorrt", trt_key, do_trt, say)

    # 6. parity: each exported precision against the PyTorch (fp32 for int4/int8) model it came from
    parities = {}
    for prec in precisions:
        sfx = _suffix(cfg, prec)
        parity_key = _key("parity", onnx_keys[prec], cfg.parity_new_tokens, cfg.parity_batch_sizes,
                          cfg.parity_tolerances, cfg.parity_prompts, cfg.calib)  # fmt: skip

        def do_parity(prec=prec, sfx=sfx):
            from shortened.validators.parity import validate_parity

            prompts = cfg.parity_prompts or (cfg.calib if cfg.calib and Path(cfg.calib).suffix == ".txt" else None)
            rep = validate_parity(
                str(final_dir),
                _onnx_dir(work, cfg, prec),
                tolerances=cfg.parity_tolerances or None,
                prompts_file=prompts,
                batch_sizes=tuple(cfg.parity_batch_sizes),
                new_tokens=cfg.parity_new_tokens,
                seed=cfg.seed,
                progress=progress,
            )
            write_json(work / f"parity{sfx}.json", rep.to_dict())
            (work / f"parity{sfx}.txt").write_text(rep.table() + "\n")
            return {"passed": rep.passed, "failures": rep.failures, "providers": rep.providers, "precision": prec}

        parities[prec] = _run_step(steps, "parity" + sfx, parity_key, do_parity, say)
    parity = {
        "passed": all(p["passed"] for p in parities.values()),
        "failures": [f"{k}: {f}" for k, p in parities.items() for f in p["failures"]],
        "providers": parities[precisions[0]]["providers"],
        "by_precision": parities,
    }

    # 7. quality: perplexity of the original, the pruned and the retrained model (PyTorch), then of every exported
    # artifact through onnxruntime: original -> pruned -> onnx fp32 -> onnx int4 ...
    quality = None
    quality_notes: list = []
    if cfg.eval_text:
        text_fp = fingerprint_path(cfg.eval_text) if Path(cfg.eval_text).is_file() else cfg.eval_text
        quality_key = _key("quality", model_fp, prune_key, final_key, text_fp, cfg.eval_seq_len, cfg.eval_max_windows,
                           [onnx_keys[p] for p in precisions])  # fmt: skip

        def do_quality():
            from shortened.model.loading import load_model
            from shortened.validators.quality import perplexity

            res = {}
            models = {"original": cfg.model, "pruned": str(work / "pruned")}
            if cfg.retrain:
                models["retrained"] = str(work / "retrained")
            for name, path in models.items():
                m = load_model(path, load_opts)
                p = perplexity(
                    m.model,
                    m.tokenizer,
                    cfg.eval_text,
                    cfg.eval_seq_len,
                    add_bos=cfg.add_bos,
                    max_windows=cfg.eval_max_windows or None,
                    progress=progress,
                )
                res[name] = p.to_dict()
                say(f"[quality] {name}: perplexity {p.ppl:.2f} over {p.windows} windows of {p.seq_len}")
                tokenizer = m.tokenizer
                del m
            from shortened.validators.quality import perplexity_onnx

            for prec in precisions:  # the artifacts themselves, in onnxruntime
                p = perplexity_onnx(
                    _onnx_dir(work, cfg, prec),
                    tokenizer,
                    cfg.eval_text,
                    cfg.eval_seq_len,
                    add_bos=cfg.add_bos,
                    max_windows=cfg.eval_max_windows or None,
                    progress=progress,
                )
                res[f"onnx {prec}"] = {**p.to_dict(), "runtime": "onnxruntime"}
                say(f"[quality] onnx {prec}: perplexity {p.ppl:.2f} (onnxruntime)")
            write_json(work / "quality.json", res)
            return res

        quality = _run_step(steps, "quality", quality_key, do_quality, say)
        from shortened.validators.quality import overlap_notes

        quality_notes = overlap_notes(cfg.eval_text, {"calibration": cfg.calib, "recovery calibration":
                                      cfg.recover_calib, "retraining": cfg.retrain_data})  # fmt: skip

    # 8. speed: pruned against the original on the same backend, interleaved
    speed = None
    if cfg.speed:
        speed_key = _key(
            "speed",
            model_fp,
            final_key,
            cfg.speed_backend,
            cfg.batch_sizes,
            cfg.prompt_len,
            cfg.new_tokens,
            cfg.repeats,
            cfg.speed_ci_target,
            cfg.speed_time_budget,
            cfg.width_baseline,
            cfg.precision,
            cfg.optimize,
            cfg.device,
            [onnx_keys[p] for p in precisions[1:]],
        )

        def do_speed():
            from shortened.io import remove_output_file
            from shortened.pipeline.bench import bench
            from shortened.validators.speed import SpeedOptions

            for name in ("speed.json", "speed.png"):  # the previous run's (relocated) reports
                remove_output_file(work / name)

            orig = cfg.model
            if Path(orig).suffix == ".gguf":  # benchmark what the user serves: a plain checkpoint of it
                orig = str(work / "original")
            rep = bench(
                orig,
                str(final_dir),
                SpeedOptions(
                    batch_sizes=cfg.batch_sizes,
                    prompt_len=cfg.prompt_len,
                    new_tokens=cfg.new_tokens,
                    repeats=cfg.repeats,
                    ci_target=cfg.speed_ci_target or None,
                    time_budget_s=cfg.speed_time_budget,
                    device="cuda" if cfg.device != "cpu" else "cpu",
                    precision=precisions[0],
                ),
                backend=cfg.speed_backend,
                width_baseline=cfg.width_baseline,
                optimize=cfg.optimize,
                onnx_dirs={"candidate": str(work / "onnx")} if cfg.speed_backend == "onnxruntime" else None,
                extra_candidates={f"candidate-{p}": str(_onnx_dir(work, cfg, p)) for p in precisions[1:]}
                if cfg.speed_backend == "onnxruntime"
                else None,
                work_dir=work / "speed-work",
                report=work / "speed.json",
                plot=work / "speed.png",
                progress=progress,
            )
            shutil.rmtree(work / "speed-work", ignore_errors=True)
            (work / "speed.md").write_text(rep.table() + "\n")
            return {b: {n: rep.decode_speedup(b, n) for n in rep.models if n != "original"} for b in cfg.batch_sizes}

        if Path(cfg.model).suffix == ".gguf" and not (work / "original").exists():
            from shortened.model.checkpoint import save_checkpoint
            from shortened.model.loading import load_model

            m = load_model(cfg.model, load_opts)
            save_checkpoint(m.model, m.tokenizer, work / "original")
        speed = _run_step(steps, "speed", speed_key, do_speed, say)

    # gates, manifest, report
    gates = evaluate_gates(cfg, parity, quality, work)
    from shortened.plots import plot_block_scores

    if scores is not None:
        plot_block_scores(scores, work / "scores.png", removed=pruned["removed"])
    manifest = {
        "tool": versions(RUN_PACKAGES, environment=True),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": {"model": model_fp, "calibration": calib_fp if cfg.calib else None},
        "config": dataclasses.asdict(cfg),
        "pruning": {
            "removed_blocks": pruned["removed"],
            "num_blocks": pruned["num_blocks"],
            "kept": pruned["kept"],
            "criterion": cfg.criterion if scores else "manual",
            "removal_order": scores.removal_order if scores else None,
            "scores": scores.scores if scores else None,
            "selection": pruned.get("selection"),
            "recovery": pruned.get("recovery"),
        },
        "sweep": steps.log["sweep"]["result"] if "sweep" in steps.log else None,
        "retraining": retrain_info,
        "onnx": onnx_info,
        "exports": exports,
        "tensorrt": trt_info,
        "parity": parity,
        "quality": quality,
        "quality_notes": quality_notes,
        "speed": {"decode_speedup": speed, "report": "speed.json"} if speed is not None else None,
        "gates": gates,
        "passed": all(g["passed"] for g in gates.values()),
        "steps": {
            k: {"key": v["key"], "seconds": round(v["seconds"], 2), "reused": v["reused"]} for k, v in steps.log.items()
        },
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    (work / "report.md").write_text(render_report(manifest, work))
    _relocate_text(work, out)
    manifest = json.loads(json.dumps(manifest).replace(str(work), str(out)))
    manifest["artifacts"] = _artifacts(work)
    write_json(work / "manifest.json", manifest)
    (work / "steps.json").rename(work / ".steps.json")  # bookkeeping, not an artifact
    os.replace(work, out)
    (out / ".steps.json").rename(out / "steps.json")
    say(summary_table(manifest, out))
    failed = [f"{k}: {g['detail']}" for k, g in gates.items() if not g["passed"]]
    if failed:
        raise GateFailed("; ".join(failed) + f" (artifacts and manifest in {out})")
    return manifest
