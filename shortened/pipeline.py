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
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shortened.errors import GateFailed, UsageError
from shortened.io import (
    MARKER,
    check_no_overlap,
    check_output_dir,
    file_record,
    fingerprint_path,
    sha256_file,
    write_json,
    write_marker,
)

log = logging.getLogger(__name__)
STEPS = ("score", "sweep", "prune", "retrain", "onnx", "tensorrt", "parity", "quality", "speed")


@dataclass
class ConvertConfig:
    """Every setting of `shortened convert`. In convert.toml, sections only group keys: [pruning] ratio = 0.2
    sets `ratio`. On the command line each is a flag: --ratio 0.2, --no-width-baseline, --batch-sizes 1,8."""

    model: str = ""  # checkpoint directory, hub id or .gguf file
    out: str = ""
    force: bool = False
    # loading
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    # calibration (the paper: 10 samples of 128 tokens)
    calib: str = ""  # .txt, .jsonl or hf:DATASET
    num_samples: int = 10
    seq_len: int = 128
    seed: int = 0
    add_bos: bool = False
    # scoring and pruning (the paper: PPL criterion with the "+" protection, 20% of the blocks)
    criterion: str = "ppl"
    iterative: bool = False
    protect: list = None  # default: first 4 and last 2 blocks
    no_protect: bool = False
    ratio: float = 0.2  # or "auto": the largest k whose held-out PPL ratio stays within max_ppl_ratio (a sweep)
    remove: int = 0  # > 0 overrides ratio
    blocks: list = None  # explicit blocks, overrides both
    # selection and training-free recovery (converter/selection.py, recovery.py); auto: best / linear with calib
    select: str = "auto"  # topk (the paper) | span | iterative | best | auto (top-k and spans where calib is given)
    recover: str = "auto"  # none (the paper) | linear | auto (linear where calib is given and the family allows)
    recover_calib: str = ""  # fitting text for the recovery (default: calib, other windows)
    recover_samples: int = 64
    sweep_max_remove: int = 0  # ratio = "auto": the largest k tried (0: 40% of the blocks)
    # retraining (off unless a method is given; other RetrainConfig options in [retrain_options])
    retrain: str = ""  # lora | full | distill | partial
    retrain_data: str = ""
    retrain_steps: int = 100
    retrain_options: dict = field(default_factory=dict)
    # export
    precision: str = "fp32"
    precisions: list = field(default_factory=list)  # e.g. ["fp32", "int4"]: each exported, checked, measured; the
    # last is the deployed artifact (gated); empty: [precision]
    quant_options: dict = field(default_factory=dict)  # int4/int8: exporters.quantize.QuantOptions fields
    opset: int = 0  # 0: the exporter's default
    optimize: bool = False  # onnxruntime's fused graph (GroupQueryAttention); TensorRT then gets a portable export
    tensorrt: str = "auto"  # auto: build where TensorRT and a GPU are present; on: required; off
    trt_batch: str = "1:8:32"
    trt_seq: str = "1:128:2048"
    # parity
    parity_new_tokens: int = 16
    parity_batch_sizes: list = field(default_factory=lambda: [1, 2])
    parity_tolerances: dict = field(default_factory=dict)  # e.g. {max_abs = 1e-3}
    parity_prompts: str = ""  # a text file of prompts (default: random ids plus the calibration text)
    # quality
    eval_text: str = ""  # a text file or wikitext2 / ptb (needs `datasets`); empty: the quality step is skipped
    eval_seq_len: int = 128
    eval_max_windows: int = 0  # 0: the whole text
    # speed
    speed: bool = True
    speed_backend: str = "onnxruntime"
    batch_sizes: list = field(default_factory=lambda: [1, 8, 32])
    prompt_len: int = 128
    new_tokens: int = 32
    repeats: int = 3  # at least; more until every speedup's 95% interval is within +-speed_ci_target
    speed_ci_target: float = 0.03  # 0: exactly `repeats`
    speed_time_budget: float = 120.0  # seconds per batch size before giving up on the target ("not resolved")
    width_baseline: bool = True
    # gates
    max_ppl_ratio: float = 0.0  # 0: no gate; else pruned (or retrained) PPL / original PPL must not exceed it
    min_speedup: float = 0.0  # 0: no gate; else the decode speedup at every batch size must reach it
    rerun: list = field(default_factory=list)  # steps to run again even when cached

    def validate(self) -> None:
        """Check the whole configuration before any heavy work (exit code 2 on the first problem)."""
        from shortened.converter.criteria import CRITERIA, DATA_DRIVEN
        from shortened.data import CalibSpec
        from shortened.model.loading import load_config

        if not self.model:
            raise UsageError("no model: pass --model DIR (or `model = ...` in the config)")
        if not self.out:
            raise UsageError("no output directory: pass --out DIR")
        model_config = load_config(self.model, self.trust_remote_code)
        check_output_dir(self.out, self.force, inputs=self.inputs())
        out = Path(self.out).resolve()
        check_no_overlap(out.with_name(f".{out.name}.partial"), self.inputs())
        from shortened.model.loading import check_length

        if self.calib and self.criterion in DATA_DRIVEN and not self.blocks:
            check_length(model_config, self.seq_len, "--seq-len")
        if self.eval_text:
            check_length(model_config, self.eval_seq_len, "--eval-seq-len")
        if self.speed:
            check_length(model_config, self.prompt_len + self.new_tokens, "--prompt-len + --new-tokens:")
        check_length(model_config, 48 + self.parity_new_tokens, "parity's longest prompt (48) + --parity-new-tokens:")
        from shortened.validators.parity import tolerances_for

        tolerances_for(
            self.precision if self.precision in ("fp32", "fp16", "bf16") else "fp32", self.parity_tolerances or None
        )  # unknown tolerance names fail here, not after the export
        from shortened.converter.retrain import RetrainConfig

        known = {f.name for f in dataclasses.fields(RetrainConfig)} - {"load", "extra_args"}
        unknown = sorted(set(self.retrain_options) - known)
        if unknown:
            raise UsageError(f"unknown retrain_options {', '.join(unknown)}; see `shortened retrain --help`")
        from shortened.exporters.tensorrt import parse_range

        parse_range(self.trt_batch, "trt-batch")
        parse_range(self.trt_seq, "trt-seq")
        if self.criterion not in CRITERIA:
            raise UsageError(f"unknown criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        if self.criterion in DATA_DRIVEN and not self.blocks:  # explicit blocks need no scores
            if not self.calib:
                raise UsageError(f"criterion {self.criterion} needs calibration text: pass --calib FILE")
            CalibSpec(self.calib, self.num_samples, self.seq_len, self.seed, self.add_bos).validate()
        if self.ratio == "auto" and not self.blocks and not self.remove:
            if not self.max_ppl_ratio or not self.eval_text or not self.calib:
                raise UsageError("ratio = auto picks k by held-out perplexity: set max_ppl_ratio, eval_text and calib")
        elif not self.blocks and not self.remove and not 0 < self.ratio < 1:
            raise UsageError(f"ratio must be between 0 and 1 (exclusive) or auto, got {self.ratio}")
        from shortened.converter.selection import resolve

        resolve(self.select, self.recover, load_config(self.model, self.trust_remote_code), bool(self.calib))
        if self.recover_calib and not Path(self.recover_calib).is_file():
            raise UsageError(f"recovery calibration file {self.recover_calib} not found")
        if self.retrain and self.retrain not in ("lora", "full", "distill", "partial"):
            raise UsageError(f"unknown retrain method {self.retrain!r}; choose lora, full, distill or partial")
        if self.retrain and not self.retrain_data:
            raise UsageError("retraining needs data: pass --retrain-data FILE")
        if self.precision not in ("fp32", "fp16", "bf16", "int4", "int8"):
            raise UsageError(f"unknown precision {self.precision!r}; choose fp32, fp16, bf16, int4 or int8")
        bad = [p for p in self.precisions if p not in ("fp32", "fp16", "bf16", "int4", "int8")]
        if bad or len(set(self.precisions)) != len(self.precisions):
            raise UsageError(f"precisions must be distinct, of fp32, fp16, bf16, int4, int8; got {self.precisions}")
        if any(p in ("int4", "int8") for p in self.all_precisions()) or self.quant_options:
            from shortened.exporters.onnx import _quant_options

            for p in self.all_precisions():
                if p in ("int4", "int8"):
                    _quant_options(p, dict(self.quant_options), self.optimize, self.calib or None)
        if self.tensorrt not in ("auto", "on", "off"):
            raise UsageError(f"tensorrt must be auto, on or off, got {self.tensorrt!r}")
        if self.speed_backend not in ("torch", "onnxruntime", "tensorrt"):
            raise UsageError(f"unknown speed backend {self.speed_backend!r}; choose torch, onnxruntime or tensorrt")
        if self.eval_text and not Path(self.eval_text).is_file() and self.eval_text not in ("wikitext2", "ptb"):
            raise UsageError(f"eval text {self.eval_text} not found: pass a text file, wikitext2 or ptb")
        if self.parity_prompts and not Path(self.parity_prompts).is_file():
            raise UsageError(f"parity prompts file {self.parity_prompts} not found")
        if self.tensorrt == "on":
            from shortened.runtime.tensorrt import tensorrt_unavailable_reason

            reason = tensorrt_unavailable_reason()
            if reason:
                raise UsageError(f"tensorrt = on, but {reason}")
        bad = [s for s in self.rerun if s not in STEPS]
        if bad:
            raise UsageError(f"unknown step(s) in rerun: {bad}; steps: {', '.join(STEPS)}")
        if any(b < 1 for b in self.batch_sizes) or self.repeats < 1 or self.new_tokens < 2:
            raise UsageError("batch sizes and repeats must be positive and new_tokens at least 2")
        for name in ("max_ppl_ratio", "min_speedup"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must not be negative")

    def inputs(self) -> dict:
        """Everything convert reads, by label: an output may not equal, contain or lie inside any of them."""
        return {"model": self.model, "calibration": self.calib, "retraining data": self.retrain_data,
                "eval text": self.eval_text, "parity prompts": self.parity_prompts,
                "recovery calibration": self.recover_calib}  # fmt: skip

    def all_precisions(self) -> list:
        """The exported precisions in order; the last one is deployed (and gated)."""
        return list(self.precisions) or [self.precision]


# settings holding lists, and the type of their items
LIST_SETTINGS = {"protect": int, "blocks": int, "parity_batch_sizes": int, "batch_sizes": int, "rerun": str,
                 "precisions": str}  # fmt: skip


FIELDS = {f.name: f for f in dataclasses.fields(ConvertConfig)}


def _onnx_dir(work: Path, cfg: ConvertConfig, precision: str) -> Path:
    """The first precision's export is <out>/onnx (as with one precision); the others <out>/onnx-<precision>."""
    return work / "onnx" if precision == cfg.all_precisions()[0] else work / f"onnx-{precision}"


def _suffix(cfg: ConvertConfig, precision: str) -> str:
    return "" if precision == cfg.all_precisions()[0] else f"-{precision}"


def load_config_file(path: str | os.PathLike) -> dict:
    """Read convert.toml into flat settings; sections only group keys."""
    import tomllib

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {path} not found")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path} is not valid TOML: {e}") from e
    flat: dict = {}
    for key, value in data.items():
        if isinstance(value, dict) and not isinstance(getattr(ConvertConfig(), key, None), dict):  # a section
            for k, v in value.items():
                flat[k] = v
        else:
            flat[key] = value
    unknown = sorted(k for k in flat if k not in FIELDS)
    if unknown:
        raise UsageError(f"unknown setting(s) {', '.join(unknown)} in {path}; see `shortened convert --help`")
    return flat


def make_config(settings: dict) -> ConvertConfig:
    cfg = ConvertConfig()
    for k, v in settings.items():
        if k not in FIELDS:
            raise UsageError(f"unknown setting {k!r}")
        default = getattr(cfg, k)
        if isinstance(default, bool) and not isinstance(v, bool):
            raise UsageError(f"setting {k} must be true or false, got {v!r}")
        if k == "ratio" and v == "auto":
            pass
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise UsageError(f"setting {k} must be a number, got {v!r}")
            v = type(default)(v)
        if isinstance(default, str) and not isinstance(v, str):
            raise UsageError(f"setting {k} must be a string, got {v!r}")
        if k in LIST_SETTINGS:
            kind = LIST_SETTINGS[k]
            if not isinstance(v, list) or not all(isinstance(x, kind) and not isinstance(x, bool) for x in v):
                what = "integers" if kind is int else "strings"
                raise UsageError(f"setting {k} must be a list of {what} (TOML [1, 8], flag 1,8), got {v!r}")
        if isinstance(default, dict) and not isinstance(v, dict):
            raise UsageError(f"setting {k} must be a table / JSON object (e.g. {{max_abs = 1e-3}}), got {v!r}")
        setattr(cfg, k, v)
    return cfg


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


def _versions() -> dict:
    import importlib.metadata as md

    from shortened import __version__

    out = {"shortened": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "tensorrt", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


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
            cfg.criterion,
            calib,
            cfg.protect,
            cfg.no_protect,
            bool(iterative),
            cfg.remove or None,
            fixed_ratio if fixed_ratio is not None else 0.2,
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
            from shortened.validators.speed import bench

            for name in ("speed.json", "speed.png"):  # the previous run's (relocated) reports
                remove_output_file(work / name)

            orig = cfg.model
            if Path(orig).suffix == ".gguf":  # benchmark what the user serves: a plain checkpoint of it
                orig = str(work / "original")
            rep = bench(
                orig,
                str(final_dir),
                backend=cfg.speed_backend,
                batch_sizes=cfg.batch_sizes,
                prompt_len=cfg.prompt_len,
                new_tokens=cfg.new_tokens,
                repeats=cfg.repeats,
                ci_target=cfg.speed_ci_target or None,
                time_budget_s=cfg.speed_time_budget,
                width_baseline=cfg.width_baseline,
                device="cuda" if cfg.device != "cpu" else "cpu",
                precision=precisions[0],
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
        "tool": _versions(),
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


def evaluate_gates(cfg: ConvertConfig, parity: dict, quality: dict | None, work: Path) -> dict:
    gates = {
        "parity": {
            "passed": bool(parity["passed"]),
            "detail": "all cases within tolerances" if parity["passed"] else parity["failures"][0],
        }
    }
    if cfg.max_ppl_ratio:
        if quality is None:
            gates["max_ppl_ratio"] = {"passed": False, "detail": "no perplexity measured: set eval_text"}
        else:
            deployed = f"onnx {cfg.all_precisions()[-1]}"  # what will be deployed, measured through onnxruntime
            final = quality.get(deployed, quality.get("retrained", quality["pruned"]))["ppl"]
            ratio = final / quality["original"]["ppl"]
            gates["max_ppl_ratio"] = {
                "passed": ratio <= cfg.max_ppl_ratio,
                "value": ratio,
                "limit": cfg.max_ppl_ratio,
                "detail": f"PPL ratio {ratio:.3f} ({deployed if deployed in quality else 'pruned'} / original) vs "
                f"limit {cfg.max_ppl_ratio}",
            }
    if cfg.min_speedup:
        path = work / "speed.json"
        if not path.is_file():
            gates["min_speedup"] = {"passed": False, "detail": "no speed measured: enable the speed step"}
        else:
            rep = json.loads(path.read_text())
            # the interval's lower end must pass (the median when no interval could be formed)
            got = {r["batch"]: _speedup_floor(r["decode_speedup"]) for r in rep["rows"] if r["model"] == "candidate"}
            worst = min(got.values()) if got else 0.0
            gates["min_speedup"] = {
                "passed": worst >= cfg.min_speedup,
                "value": worst,
                "by_batch": got,
                "limit": cfg.min_speedup,
                "detail": f"worst decode speedup (95% interval's lower end) {worst:.3f}x vs limit {cfg.min_speedup}x",
            }
    return gates


def _speedup_floor(st: dict) -> float:
    lo = st.get("ci_low")
    return float(lo) if lo is not None and lo == lo and lo > float("-inf") else float(st.get("median") or 0.0)


def summary_table(m: dict, out: Path) -> str:
    p = m["pruning"]
    lines = [
        f"\nshortened convert: {out}",
        "",
        "| | |",
        "| --- | --- |",
        f"| blocks removed | {p['removed_blocks']} ({p['num_blocks']} -> {p['kept']}, criterion {p['criterion']}) |",
    ]
    if p.get("selection"):
        sel = p["selection"]
        lines.append(f"| selection | {sel['mode']}: chosen {sel['chosen']} by calibration perplexity |")
    if p.get("recovery"):
        r = p["recovery"]
        how = "none" if r["method"] == "none" else f"linear map folded into blocks {r['blocks_holding_maps']}"
        lines.append(f"| training-free recovery | {how}{'; ' + r['not_folded'] if r.get('not_folded') else ''} |")
    if m.get("sweep"):
        lines.append(f"| k by budget | {m['sweep']['picked_k']} blocks: the largest within held-out PPL ratio "
                     f"{m['config']['max_ppl_ratio']} (chosen on the evaluation text; sweep/sweep.md) |")  # fmt: skip
    q = m.get("quality")
    if q:
        row = " -> ".join(f"{k} {v['ppl']:.2f}" for k, v in q.items())
        lines.append(f"| perplexity ({q['original']['source']}, {q['original']['seq_len']}-token windows) | {row} |")
        for note in m.get("quality_notes") or []:
            lines.append(f"| not held out | {note} |")
    par = m["parity"]
    for prec, pp in (par.get("by_precision") or {"": par}).items():
        what = f"parity (ONNX {prec} vs PyTorch)" if prec else "parity (ONNX vs PyTorch)"
        lines.append(f"| {what} | {'PASS' if pp['passed'] else 'FAIL'} on {', '.join(pp['providers'])} |")
    for prec, e in (m.get("exports") or {}).items():
        q = e.get("quantization") or {}
        how = f", {q['method']} block {q['block_size']}, head {q['head_bits']} bits" if q else ""
        lines.append(f"| ONNX {prec} | {e['size_bytes'] / 1e6:.1f} MB{how} |")
    t = m.get("tensorrt") or {}
    lines.append(f"| TensorRT | {'skipped: ' + t['skipped'] if 'skipped' in t else 'built'} |")
    if m.get("speed"):
        rep = json.loads((out / "speed.json").read_text())
        for r in rep["rows"]:
            if r["model"] == "original":
                continue
            ideal = rep["models"][r["model"]].get("ideal_decode_speedup")
            sp = r["decode_speedup"]
            ci = f" [{sp['ci_low']:.3f}, {sp['ci_high']:.3f}] {sp['verdict']}" if sp.get("ci_low") is not None else ""
            ideal = f"ideal {ideal:.3f}x" if ideal else "no FLOP ideal: weight-only quantized"
            lines.append(f"| decode speedup, batch {r['batch']}, {r['model']} | {sp['median']:.3f}x{ci} ({ideal}) |")
    for k, g in m["gates"].items():
        lines.append(f"| gate {k} | {'pass' if g['passed'] else 'FAIL'}: {g['detail']} |")
    reused = [k for k, v in m["steps"].items() if v["reused"]]
    if reused:
        lines.append(f"| reused steps | {', '.join(reused)} |")
    return "\n".join(lines)


def render_report(m: dict, work: Path) -> str:
    """report.md: what a person reads in a minute."""
    out = [
        "# shortened build report",
        "",
        f"Model `{m['config']['model']}`, created {m['created']} by shortened "
        f"{m['tool']['shortened']} (torch {m['tool'].get('torch')}, transformers {m['tool'].get('transformers')}).",
        "",
        "## Summary",
        summary_table(m, work).split("\n", 2)[2],
        "",
    ]
    if m["pruning"]["scores"]:
        out += ["## Block importance", "", "![block scores](scores.png)", ""]
    if (work / "sweep" / "sweep.md").is_file():
        out += ["## Quality against speed", "", (work / "sweep" / "sweep.md").read_text().rstrip(), "",
                "![sweep](sweep/sweep.png)", ""]  # fmt: skip
    for f in sorted(work.glob("parity*.txt")):
        first = (m["config"]["precisions"] or [m["config"]["precision"]])[0]
        prec = f.stem.split("-", 1)[1] if "-" in f.stem else first
        out += [f"## Parity (ONNX {prec} vs PyTorch)".replace("  ", " "), "", "```", f.read_text().rstrip(), "```", ""]
    if (work / "speed.md").is_file():
        out += ["## Speed", "", (work / "speed.md").read_text().rstrip(), "", "![speed](speed.png)", ""]
    if m.get("retraining"):
        out += ["## Retraining", "", "```json", json.dumps(m["retraining"], indent=1, default=str)[:3000], "```", ""]
    out += ["## Steps", "", "| step | seconds | reused |", "| --- | --- | --- |"]
    out += [f"| {k} | {v['seconds']} | {'yes' if v['reused'] else 'no'} |" for k, v in m["steps"].items()]
    return "\n".join(out) + "\n"
