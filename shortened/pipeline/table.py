"""The steps of `convert` as a table. Each step names the steps whose results it takes (`after`), the settings
(ConvertConfig fields) and input files whose fingerprints enter its key, and a function from those results to its
own (a JSON-able dict, paths in it relative to the output directory). build.py runs the table.

    score -> sweep (ratio = auto) -> prune -> retrain (a method given) -> onnx (per precision) -> tensorrt (where
    TensorRT and a GPU are) -> parity (per precision) -> quality (eval_text given) -> speed (unless --no-speed)

A step's key is the hash of its settings, its inputs' fingerprints and the keys of the steps it comes after, so a
changed setting changes the keys of the steps that read it and of every step after those, and of no other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from shortened.converter.criteria import BlockScores
from shortened.converter.retrain import retrain
from shortened.converter.selection import resolve
from shortened.converter.steps import prune, save_scores, score
from shortened.converter.sweep import sweep
from shortened.converter.sweep import table as sweep_table
from shortened.data import CalibSpec
from shortened.errors import GateFailed
from shortened.exporters.onnx import export_onnx
from shortened.exporters.quantize import quantize_export
from shortened.exporters.tensorrt import export_tensorrt
from shortened.io import fingerprint_path, remove_output_file, write_json, write_output_json
from shortened.model.checkpoint import save_checkpoint
from shortened.model.loading import LoadOptions, load_config, load_model
from shortened.pipeline.bench import bench
from shortened.pipeline.config import ConvertConfig
from shortened.runtime.tensorrt import tensorrt_unavailable_reason
from shortened.validators.parity import validate_parity
from shortened.validators.quality import perplexity, perplexity_onnx
from shortened.validators.speed import SpeedOptions

QUANTIZED = ("int4", "int8")
LOAD = ("dtype", "device", "trust_remote_code")
CALIB = ("num_samples", "seq_len", "seed", "add_bos")  # with the calib file's fingerprint
PROTECT = ("protect", "no_protect")
PLAN = ("select", "recover", "recover_samples")  # with the recover_calib file's fingerprint
EVAL = ("eval_seq_len", "eval_max_windows", "add_bos")  # with the eval_text file's fingerprint
PARITY = ("parity_new_tokens", "parity_batch_sizes", "parity_tolerances", "seed")
SPEED = ("speed_backend", "batch_sizes", "prompt_len", "new_tokens", "repeats", "speed_ci_target",
         "speed_time_budget", "width_baseline", "optimize", *LOAD)  # fmt: skip


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable  # (Ctx, {name: result} of the steps in `after`) -> result
    after: tuple = ()
    settings: tuple = ()  # ConvertConfig fields
    inputs: tuple = ()  # ConvertConfig fields naming files: their fingerprints
    extra: dict = field(default_factory=dict)  # values derived from the settings (the precision, iterative scoring)
    skip: str = ""  # why it does not run here; its result is then {"skipped": skip}


@dataclass
class Ctx:
    """What every step function gets besides the results: the settings and where to write."""

    cfg: ConvertConfig
    work: Path
    progress: bool = True
    say: Callable = print

    @property
    def load(self) -> LoadOptions:
        return LoadOptions(self.cfg.dtype, self.cfg.device, self.cfg.trust_remote_code)

    @property
    def calib(self) -> CalibSpec | None:
        c = self.cfg
        return CalibSpec(c.calib, c.num_samples, c.seq_len, c.seed, c.add_bos) if c.calib else None

    @property
    def final(self) -> Path:
        """The checkpoint that is exported: the retrained one when there is one."""
        return self.work / ("retrained" if self.cfg.retrain else "pruned")

    def onnx_dir(self, precision: str) -> Path:
        return self.work / f"onnx{suffix(self.cfg, precision)}"


def suffix(cfg: ConvertConfig, precision: str) -> str:
    """The first precision's export is <out>/onnx (as with one precision); the others <out>/onnx-<precision>."""
    return "" if precision == cfg.all_precisions()[0] else f"-{precision}"


# ---------------------------------------------------------------------------------------------
# The table


def table(cfg: ConvertConfig, iterative: bool = False, trt_skip: str = "") -> list[Step]:
    """The steps for these settings, in the order they run. iterative: the scores are an iterative order (which
    reads the count to remove); trt_skip: why TensorRT cannot build here ("" where it can)."""
    final = "retrain" if cfg.retrain else "prune"
    calib = CALIB if cfg.calib else ()
    count = ("remove", "ratio") if iterative else ()
    steps = []
    if not cfg.blocks:  # explicit blocks need no scores
        steps += [Step("score", partial(score_step, iterative), settings=LOAD + calib + PROTECT + ("criterion", *count),
                       inputs=("model", "calib"), extra={"iterative": iterative})]  # fmt: skip
    if cfg.ratio == "auto" and not cfg.blocks and not cfg.remove:
        steps += [Step("sweep", sweep_step, settings=LOAD + CALIB + PLAN + PROTECT + EVAL + ("max_ppl_ratio",
                       "sweep_max_remove"), inputs=("model", "calib", "recover_calib", "eval_text"))]  # fmt: skip
    steps += [Step("prune", prune_step, after=tuple(s.name for s in steps), settings=LOAD + calib + PLAN + PROTECT
                   + ("blocks", "remove", "ratio"), inputs=("model", "calib", "recover_calib"))]  # fmt: skip
    if cfg.retrain:
        steps += [Step("retrain", retrain_step, after=("prune",), settings=("retrain", "retrain_steps",
                       "retrain_options"), inputs=("retrain_data",))]  # fmt: skip
    precisions = cfg.all_precisions()
    onnx = {p: "onnx" + suffix(cfg, p) for p in precisions}
    for p in sorted(precisions, key=lambda p: p in QUANTIZED):  # the fp32 export before the ones quantized from it
        q = p in QUANTIZED
        source = onnx["fp32"] if q and "fp32" in onnx else final  # int4/int8 quantize this run's fp32 export
        settings = ("opset", "optimize", "quant_options") if q else ("opset", "optimize")
        steps += [Step(onnx[p], partial(onnx_step, p), after=(source,), settings=settings,
                       inputs=("calib",) if q else (), extra={"precision": p})]  # fmt: skip
    steps += [Step("tensorrt", tensorrt_step, after=(final, onnx[precisions[0]]), settings=("trt_batch", "trt_seq"),
                   skip="tensorrt = off" if cfg.tensorrt == "off" else trt_skip)]  # fmt: skip
    for p in precisions:
        steps += [Step("parity" + suffix(cfg, p), partial(parity_step, p), after=(final, onnx[p]), settings=PARITY,
                       inputs=("parity_prompts", "calib"))]  # fmt: skip
    if cfg.eval_text:
        models = ("prune", "retrain") if cfg.retrain else ("prune",)
        steps += [Step("quality", quality_step, after=models + tuple(onnx.values()), settings=LOAD + EVAL,
                       inputs=("model", "eval_text"))]  # fmt: skip
    if cfg.speed:
        steps += [Step("speed", speed_step, after=(final, *onnx.values()), settings=SPEED, inputs=("model",))]
    return steps


def plan(cfg: ConvertConfig) -> list[Step]:
    """The table for a validated configuration: whether the scores are iterative, whether TensorRT can build."""

    select, _ = resolve(cfg.select, cfg.recover, load_config(cfg.model, cfg.trust_remote_code), bool(cfg.calib))
    fixed_ratio = cfg.ratio != "auto" and cfg.ratio
    # selection best/iterative with the ppl criterion: the iterative order's first step is the criterion itself
    iterative = bool(cfg.iterative or (cfg.criterion == "ppl" and select in ("best", "iterative") and fixed_ratio))
    trt_skip = "" if cfg.tensorrt == "off" else tensorrt_unavailable_reason() or ""
    return table(cfg, iterative, trt_skip)


def fingerprints(cfg: ConvertConfig) -> dict:
    """The input files' fingerprints (sha256), by setting; a hub id, dataset name or unset input stands for itself."""

    def fp(path: str, absent, exists=Path.exists):
        return fingerprint_path(path) if path and exists(Path(path)) else absent

    return {
        "model": fp(cfg.model, {"hub_id": cfg.model}),
        "calib": fp(cfg.calib, {"source": cfg.calib}, Path.is_file),
        "recover_calib": fp(cfg.recover_calib, None),
        "eval_text": fp(cfg.eval_text, cfg.eval_text, Path.is_file),
        "retrain_data": fp(cfg.retrain_data, cfg.retrain_data),
        "parity_prompts": fp(cfg.parity_prompts, cfg.parity_prompts, Path.is_file),
    }


def step_keys(steps: list[Step], cfg: ConvertConfig, fps: dict) -> dict:
    """{name: key} of the steps that run; each key covers the keys of the steps it comes after."""
    keys: dict = {}
    seen = set()
    for s in steps:
        missing = [d for d in s.after if d not in seen]
        assert not missing, f"step {s.name} comes after {missing}, which are not before it in the table"
        seen.add(s.name)
        if not s.skip:
            settings = {k: getattr(cfg, k) for k in s.settings}
            keys[s.name] = key(s.name, settings, {i: fps[i] for i in s.inputs}, s.extra,
                               {d: keys.get(d) for d in s.after})  # fmt: skip
    return keys


def key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plain(result, work: Path):
    """A step's result as it is recorded (and as a reused step returns it): JSON values, and every path inside the
    work directory relative to it, so nothing changes when the work directory becomes the output."""
    return relative(json.loads(json.dumps(result, default=_jsonable)), work)


def relative(obj, root: Path):
    if isinstance(obj, dict):
        return {k: relative(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [relative(v, root) for v in obj]
    if isinstance(obj, str) and (obj == str(root) or obj.startswith(str(root) + os.sep)):
        return os.path.relpath(obj, root)
    return obj


def _jsonable(o):
    return o.tolist() if hasattr(o, "tolist") else str(o)


def replace_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


# ---------------------------------------------------------------------------------------------
# The steps: (ctx, results of the steps they come after) -> result


def score_step(iterative: bool, ctx: Ctx, res: dict) -> dict:

    cfg = ctx.cfg
    ratio = 0.2 if cfg.ratio == "auto" else cfg.ratio
    s = score(cfg.model, ctx.calib, criterion=cfg.criterion, protect=cfg.protect, no_protect=cfg.no_protect,
              iterative=iterative, num_remove=cfg.remove or None, ratio=ratio, load=ctx.load,
              progress=ctx.progress)  # fmt: skip
    remove_output_file(ctx.work / "scores.json")  # the previous run's
    save_scores(s, ctx.work / "scores.json", plot=False)
    return s.to_dict()


def _plan_options(cfg: ConvertConfig) -> dict:
    return dict(select=cfg.select, recover=cfg.recover, recover_calib=cfg.recover_calib or None,
                recover_samples=cfg.recover_samples)  # fmt: skip


def sweep_step(ctx: Ctx, res: dict) -> dict:
    """ratio = auto: sweep k = 1..K on the held-out text; prune keeps the largest k within max_ppl_ratio."""

    cfg = ctx.cfg
    r = sweep(cfg.model, cfg.eval_text, ctx.calib, cfg.sweep_max_remove or None, protect=cfg.protect,
              no_protect=cfg.no_protect, eval_seq_len=cfg.eval_seq_len, eval_max_windows=cfg.eval_max_windows or None,
              max_ppl_ratio=cfg.max_ppl_ratio, load=ctx.load, out=replace_dir(ctx.work / "sweep"), force=True,
              progress=ctx.progress, **_plan_options(cfg))  # fmt: skip
    return {"picked_k": r["picked_k"], "rows": r["rows"], "original_heldout_ppl": r["original_heldout_ppl"],
            "table": sweep_table(r)}  # fmt: skip


def _swept_blocks(ctx: Ctx, sweep: dict) -> list:
    """The blocks of the largest k within the budget; no k within it is a failed gate before any export."""
    k, limit = sweep["picked_k"], ctx.cfg.max_ppl_ratio
    if k == 0:
        first = sweep["rows"][0]
        raise GateFailed(f"no k within max_ppl_ratio {limit}: removing one block already gives a held-out ratio of "
                         f"{first['heldout_ratio']:.3f} (sweep in {ctx.work / 'sweep'})")  # fmt: skip
    ctx.say(f"[sweep] removing {k} blocks: the largest k within a held-out PPL ratio of {limit}")
    return sweep["rows"][k - 1]["blocks"]


def prune_step(ctx: Ctx, res: dict) -> dict:

    cfg = ctx.cfg
    blocks = cfg.blocks or (_swept_blocks(ctx, res["sweep"]) if "sweep" in res else None)
    scores = BlockScores.from_dict(res["score"]) if "score" in res else None
    out = prune(cfg.model, replace_dir(ctx.work / "pruned"), scores=scores, calib=ctx.calib, remove=cfg.remove or None,
                ratio=None if (cfg.remove or blocks) else cfg.ratio, blocks=blocks, protect=cfg.protect,
                no_protect=cfg.no_protect, load=ctx.load, force=True, progress=ctx.progress,
                **_plan_options(cfg))  # fmt: skip
    rec = json.loads((ctx.work / "pruned" / "pruning.json").read_text())
    return {**out, "recovery": rec.get("recovery"), "selection": rec.get("selection")}


def retrain_step(ctx: Ctx, res: dict) -> dict:

    cfg = ctx.cfg
    teacher = cfg.model if cfg.retrain == "distill" else None
    return retrain(str(ctx.work / "pruned"), replace_dir(ctx.work / "retrained"), method=cfg.retrain,
                   data=cfg.retrain_data, teacher=teacher, force=True, progress=ctx.progress,
                   **{"max_steps": cfg.retrain_steps, **cfg.retrain_options})  # fmt: skip


def onnx_step(precision: str, ctx: Ctx, res: dict) -> dict:
    """Export the final checkpoint; int4/int8 quantize this run's fp32 export when there is one (no re-trace)."""
    cfg = ctx.cfg
    target = replace_dir(ctx.onnx_dir(precision))
    quant = dict(cfg.quant_options) if precision in QUANTIZED else None
    if quant is not None and "fp32" in cfg.all_precisions():
        return quantize_export(ctx.onnx_dir("fp32"), target, precision, quant=quant, calib=cfg.calib or None,
                               force=True)  # fmt: skip

    return export_onnx(str(ctx.final), target, precision=precision, opset=cfg.opset or None, optimize=cfg.optimize,
                       force=True, progress=ctx.progress, quant=quant, calib=cfg.calib or None)  # fmt: skip


def tensorrt_step(ctx: Ctx, res: dict) -> dict:
    """TensorRT gets the first precision; int4/int8 (MatMulNBits, an onnxruntime op) become int4 QDQ (blocked
    DequantizeLinear) or fp32; the optimized graph holds onnxruntime-only ops: those get a portable export."""

    cfg = ctx.cfg
    batch = tuple(int(x) for x in cfg.trt_batch.split(":"))
    seq = tuple(int(x) for x in cfg.trt_seq.split(":"))
    first = cfg.all_precisions()[0]
    quant = {"format": "qdq"} if first == "int4" else None
    precision = "fp32" if first == "int8" else first
    source = ctx.onnx_dir(first)
    if cfg.optimize or quant or precision != first:
        source = replace_dir(ctx.work / "onnx-portable")
        export_onnx(str(ctx.final), source, precision=precision, opset=cfg.opset or None, force=True,
                    progress=ctx.progress, quant=quant)  # fmt: skip
    return export_tensorrt(source, replace_dir(ctx.work / "tensorrt"), batch, seq, force=True)


def parity_step(precision: str, ctx: Ctx, res: dict) -> dict:
    """The export against the PyTorch checkpoint it came from (fp32 for int4/int8); parity[-PREC].json and .txt."""

    cfg, work = ctx.cfg, ctx.work
    prompts = cfg.parity_prompts or (cfg.calib if cfg.calib and Path(cfg.calib).suffix == ".txt" else None)
    rep = validate_parity(str(ctx.final), ctx.onnx_dir(precision), tolerances=cfg.parity_tolerances or None,
                          prompts_file=prompts, batch_sizes=tuple(cfg.parity_batch_sizes),
                          new_tokens=cfg.parity_new_tokens, seed=cfg.seed, progress=ctx.progress)  # fmt: skip
    rep = dataclasses.replace(rep, reference=os.path.relpath(ctx.final, work),
                              onnx=os.path.relpath(ctx.onnx_dir(precision), work))  # fmt: skip
    sfx = suffix(cfg, precision)
    write_json(work / f"parity{sfx}.json", rep.to_dict())
    (work / f"parity{sfx}.txt").write_text(rep.table() + "\n")
    return {"passed": rep.passed, "failures": rep.failures, "providers": rep.providers, "precision": precision,
            "table": rep.table()}  # fmt: skip


def quality_step(ctx: Ctx, res: dict) -> dict:
    """Perplexity of the original, the pruned and the retrained model (PyTorch), then of every exported artifact
    through onnxruntime: original -> pruned -> onnx fp32 -> onnx int4 ..."""

    cfg = ctx.cfg
    opts = dict(add_bos=cfg.add_bos, max_windows=cfg.eval_max_windows or None, progress=ctx.progress)
    out = {}
    models = {"original": cfg.model, "pruned": str(ctx.work / "pruned")}
    if cfg.retrain:
        models["retrained"] = str(ctx.work / "retrained")
    for name, path in models.items():
        m = load_model(path, ctx.load)
        p = perplexity(m.model, m.tokenizer, cfg.eval_text, cfg.eval_seq_len, **opts)
        out[name] = p.to_dict()
        ctx.say(f"[quality] {name}: perplexity {p.ppl:.2f} over {p.windows} windows of {p.seq_len}")
        tokenizer = m.tokenizer
        del m
    for prec in cfg.all_precisions():  # the artifacts themselves, in onnxruntime
        p = perplexity_onnx(ctx.onnx_dir(prec), tokenizer, cfg.eval_text, cfg.eval_seq_len, **opts)
        out[f"onnx {prec}"] = {**p.to_dict(), "runtime": "onnxruntime"}
        ctx.say(f"[quality] onnx {prec}: perplexity {p.ppl:.2f} (onnxruntime)")
    write_json(ctx.work / "quality.json", out)
    return out


def _original(ctx: Ctx) -> str:
    """The original model as benchmarked: for a .gguf what the user serves, a plain checkpoint of it."""
    cfg = ctx.cfg
    if Path(cfg.model).suffix != ".gguf":
        return cfg.model
    path = ctx.work / "original"
    if not path.exists():
        m = load_model(cfg.model, ctx.load)
        save_checkpoint(m.model, m.tokenizer, path)
    return str(path)


def speed_step(ctx: Ctx, res: dict) -> dict:
    """The pruned model against the original on the same backend, interleaved; speed.json, .md and .png."""

    cfg, work = ctx.cfg, ctx.work
    for name in ("speed.json", "speed.png"):  # the previous run's reports
        remove_output_file(work / name)
    precisions = cfg.all_precisions()
    ort = cfg.speed_backend == "onnxruntime"
    options = SpeedOptions(batch_sizes=cfg.batch_sizes, prompt_len=cfg.prompt_len, new_tokens=cfg.new_tokens,
                           repeats=cfg.repeats, ci_target=cfg.speed_ci_target or None,
                           time_budget_s=cfg.speed_time_budget, device="cuda" if cfg.device != "cpu" else "cpu",
                           precision=precisions[0])  # fmt: skip
    rep = bench(_original(ctx), str(ctx.final), options, backend=cfg.speed_backend, width_baseline=cfg.width_baseline,
                optimize=cfg.optimize, onnx_dirs={"candidate": str(ctx.onnx_dir(precisions[0]))} if ort else None,
                extra_candidates={f"candidate-{p}": str(ctx.onnx_dir(p)) for p in precisions[1:]} if ort else None,
                work_dir=work / "speed-work", plot=work / "speed.png", progress=ctx.progress)  # fmt: skip
    shutil.rmtree(work / "speed-work", ignore_errors=True)
    write_output_json(work / "speed.json", relative(rep.to_dict(), work))
    (work / "speed.md").write_text(rep.table() + "\n")
    speedups = {b: {n: rep.decode_speedup(b, n) for n in rep.models if n != "original"} for b in cfg.batch_sizes}
    ideal = {n: m.get("ideal_decode_speedup") for n, m in rep.models.items()}
    return {"decode_speedup": speedups, "rows": rep.rows, "ideal": ideal, "table": rep.table()}
