"""`shortened bench` and convert's speed step: make the artifacts a backend runs (the width-pruned baseline, ONNX
exports, TensorRT engines), measure them (validators.speed.bench), and write the report and the plot."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

from shortened.converter.width import width_prune
from shortened.errors import UsageError
from shortened.exporters.onnx import export_onnx
from shortened.exporters.tensorrt import export_tensorrt
from shortened.io import atomic_file, check_no_overlap, check_output_file, real_path, write_output_json
from shortened.model.cost import _config, count_params_of_config
from shortened.model.families import num_blocks
from shortened.validators.speed import Artifact, SpeedOptions, SpeedReport, check_backend, load_configs
from shortened.validators.speed import bench as measure_artifacts

log = logging.getLogger(__name__)


def bench(
    original: str,
    candidate: str,
    options: SpeedOptions,
    backend: str = "torch",
    width_baseline: bool | str = False,
    optimize: bool = False,
    onnx_dirs: dict | None = None,
    extra_candidates: dict | None = None,
    work_dir: str | Path | None = None,
    report: str | Path | None = None,
    plot: str | Path | None = None,
    progress: bool = True,
) -> SpeedReport:
    """Measure the candidate (and a width-pruned baseline of the same size) against the original.

    original, candidate: checkpoint directories (ONNX directories also work for the onnxruntime backend).
    width_baseline: True builds one (`shortened.converter.width.width_prune`) matched to the candidate's
    parameter count; a path uses that checkpoint. onnx_dirs: ONNX exports already made, by model name
    ("original", "candidate", "width"), used by the onnxruntime/tensorrt backends instead of exporting.
    Artifacts made here (width checkpoint, ONNX exports, engines) go to `work_dir` (a temporary directory,
    removed afterwards, when not given). options.repeats is the minimum: repetitions go on until every speedup's
    95% bootstrap interval is within +-ci_target (None: exactly `repeats`), max_repeats, or time_budget_s per
    batch size. extra_candidates: {name: ONNX dir} of other exports of the candidate (e.g. its int4 export),
    measured in the same interleaved run (onnxruntime backend).
    """
    check_backend(backend, options.device)
    checkpoints = {"original": str(original), "candidate": str(candidate)}
    onnx = _given_exports(onnx_dirs, checkpoints)
    configs = load_configs(checkpoints, options)  # bad paths fail here, before any work
    inputs = {
        "original": original,
        "candidate": candidate,
        "width baseline": width_baseline if isinstance(width_baseline, (str, Path)) else None,
        "ONNX export": list(filter(None, onnx.values())),
    }
    _check_outputs(report, plot, work_dir, inputs)
    if isinstance(width_baseline, (str, Path)):
        checkpoints["width"] = str(width_baseline)
        _config(checkpoints["width"])
    if extra_candidates and backend != "onnxruntime":
        raise UsageError("extra candidates (other precisions of the export) run on the onnxruntime backend")
    with _work_dir(work_dir) as work:
        if width_baseline is True:
            checkpoints["width"] = _width_baseline(checkpoints["original"], configs["candidate"], work)
        artifacts = {
            name: Artifact(_prepare(name, path, backend, work, optimize, options, onnx.get(name)), path)
            for name, path in checkpoints.items()
        }
        for name, d in (extra_candidates or {}).items():
            artifacts[name] = Artifact(str(d), checkpoints["candidate"])
        rep = measure_artifacts(artifacts, backend, options, optimize=optimize, progress=progress)
    _write(rep, report, plot, inputs)
    return rep


def _given_exports(onnx_dirs: dict | None, checkpoints: dict) -> dict:
    """{name: ONNX dir or None}, each given export checked to hold as many blocks as its checkpoint."""
    onnx = {"original": None, "candidate": None, "width": None, **(onnx_dirs or {})}
    unknown = set(onnx) - {"original", "candidate", "width"}
    if unknown:
        raise UsageError(f"onnx_dirs names must be original, candidate or width; got {sorted(unknown)}")
    for name, d in onnx.items():
        if d is not None and name in checkpoints:
            have, want = num_blocks(_config(d)), num_blocks(_config(checkpoints[name]))
            if have != want:
                raise UsageError(f"the ONNX export {d} has {have} blocks but the {name} checkpoint has {want}; "
                                 "pass the export of that checkpoint")  # fmt: skip
    return onnx


def _check_outputs(report, plot, work_dir, inputs: dict) -> None:
    """Before any work: the reports may only replace our own reports, the work dir must not overlap an input."""
    for p in (report, plot):
        if p is not None:
            check_output_file(p, force=True, inputs=inputs)
    if work_dir is not None:
        check_no_overlap(real_path(work_dir), inputs)  # exports and the width baseline are written there


@contextlib.contextmanager
def _work_dir(work_dir):
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="shortened-bench-") as tmp:
            yield Path(tmp)
        return
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    yield work


def _width_baseline(original: str, candidate_config, work: Path) -> str:
    """A width-pruned copy of the original with the candidate's parameter count."""
    out = work / "width"
    width_prune(original, count_params_of_config(candidate_config), out, force=True)
    return str(out)


def _prepare(name: str, path: str, backend: str, work: Path, optimize: bool, options: SpeedOptions,
             onnx_dir=None) -> str:  # fmt: skip
    """The artifact a backend runs: the checkpoint itself (torch), an ONNX export (given, or made here), or a
    TensorRT engine built from it."""
    if backend == "torch":
        return path
    onnx_dir = Path(onnx_dir or path)
    if not (onnx_dir / "model.onnx").is_file():
        onnx_dir = work / f"{name}-onnx"
        log.info("exporting %s to ONNX (%s)", name, onnx_dir)
        optimize = optimize and backend == "onnxruntime"  # the fused graph holds onnxruntime-only ops
        export_onnx(path, onnx_dir, precision=options.precision, cache=True, optimize=optimize, force=True,
                    progress=False)  # fmt: skip
    if backend == "onnxruntime":
        return str(onnx_dir)
    engine_dir = work / f"{name}-trt"
    bs, seq_max = options.batch_sizes, options.prompt_len + options.new_tokens
    export_tensorrt(onnx_dir, engine_dir, batch=(1, min(8, max(bs)), max(bs)), seq=(1, options.prompt_len, seq_max),
                    precision=options.precision)  # fmt: skip
    return str(engine_dir)


def _write(rep: SpeedReport, report, plot, inputs: dict) -> None:
    if report is not None:
        write_output_json(report, rep.to_dict(), inputs=inputs)
    if plot is not None:
        with atomic_file(plot, True, inputs) as tmp:
            rep.plot(tmp)
