"""Speed: prefill latency, per-token decode latency, tokens/s and peak memory of an original model and its
pruned candidate (and optionally a width-pruned baseline of the same size, and other exports of the candidate),
with the ideal speedup beside it.

`bench` receives finished artifacts (what the backend runs, and the checkpoint its config comes from) and
measures them; making them (ONNX exports, engines, the width baseline) is shortened.pipeline.bench. How the
timing stays honest on a noisy machine is in timing.py; the statistics (medians and p90 over repetitions,
speedups pair by pair with a 95% bootstrap interval, a verdict only where the interval excludes 1) in stats.py;
the report, its table and plot in speed_report.py. A measured speedup above the FLOP ideal by more than its
interval is flagged (a disturbed baseline, cache effects).

The ideal speedup comes from the configs alone (`flops_per_token`): what removing compute would give if time
were proportional to it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from shortened.errors import UsageError
from shortened.model.cost import _config, count_params_of_config, flops_per_token, ideal_speedup
from shortened.model.families import num_blocks
from shortened.model.loading import check_length
from shortened.validators.speed_report import SpeedReport, build_rows, flag_above_ideal
from shortened.validators.timing import BACKENDS, ModelSpec, SpeedOptions, measure, pinned_cores

MODELS = ("original", "candidate", "width")  # any other name is an extra candidate: another export of the candidate


@dataclass
class Artifact:
    path: str  # what the backend runs: checkpoint dir (torch), ONNX dir (onnxruntime), engine dir (tensorrt)
    checkpoint: str  # the checkpoint its config comes from (FLOPs, parameters, blocks, vocabulary)


def check_backend(backend: str, device: str) -> None:
    """The backend is known and can run here, and a CUDA device is visible when one is asked for."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "onnxruntime":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise UsageError("the onnxruntime backend needs onnxruntime; pip install onnxruntime") from None
    if backend == "tensorrt":
        try:
            from shortened.runtime.tensorrt import tensorrt_unavailable_reason
        except ImportError:
            raise UsageError("the tensorrt backend is not available in this build of shortened") from None
        reason = tensorrt_unavailable_reason(runtime=True)
        if reason:
            raise UsageError(f"the tensorrt backend cannot run here: {reason}")
    if device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} needs a CUDA GPU, and none is visible; use --device cpu")


def load_configs(checkpoints: dict, options: SpeedOptions) -> dict:
    """{name: config} of the checkpoints (a bad path fails here, before any work), each long enough for the run."""
    configs = {name: _config(str(p)) for name, p in checkpoints.items()}
    for name, cfg in configs.items():
        check_length(cfg, options.prompt_len + options.new_tokens,
                     f"--prompt-len + --new-tokens for the {name} model:")  # fmt: skip
    return configs


def bench(artifacts: dict, backend: str, options: SpeedOptions, optimize: bool = False,
          progress: bool = True) -> SpeedReport:  # fmt: skip
    """Measure every artifact against artifacts["original"] on one backend, interleaved (timing.measure).

    artifacts: {name: Artifact}: original, candidate, optionally width, and extra candidates (other exports of the
    candidate, e.g. its int4 export; weight-only quantized ones get no FLOP ideal, it does not apply). optimize:
    whether the exports are fused, recorded in the settings."""
    check_backend(backend, options.device)
    if "original" not in artifacts:
        raise UsageError(f"bench needs the original among the models, got {sorted(artifacts)}")
    configs = load_configs({name: a.checkpoint for name, a in artifacts.items()}, options)
    specs = [ModelSpec(name, str(a.path), backend, config_path=str(a.checkpoint)) for name, a in artifacts.items()]
    raw = measure(specs, options, baseline="original", progress=progress)
    _add_costs(raw["models"], configs, options)
    rows = build_rows(raw["runs"], equal_within=options.ci_target)
    flag_above_ideal(rows, raw["models"])
    return SpeedReport(backend, _settings(options, optimize, raw), raw["models"], rows, raw["skipped"])


def _add_costs(models: dict, configs: dict, o: SpeedOptions) -> None:
    """Parameters, blocks and FLOPs per token of every model, and its ideal speedups over the original."""
    decode_ctx = o.prompt_len + o.new_tokens // 2  # the average context a decode step attends to
    for name, info in models.items():
        cfg = configs[name]
        info.update({"params": count_params_of_config(cfg), "blocks": num_blocks(cfg),
                     "flops_per_token": flops_per_token(cfg, decode_ctx)["total"]})  # fmt: skip
        quantized = name not in MODELS and _is_weight_quantized(info["path"])
        if name != "original" and not quantized:
            info["ideal_decode_speedup"] = ideal_speedup(configs["original"], cfg, decode_ctx)
            info["ideal_speedup_weights_only"] = ideal_speedup(configs["original"], cfg, 0)
            info["ideal_prefill_speedup"] = ideal_speedup(configs["original"], cfg, o.prompt_len // 2)


def _is_weight_quantized(onnx_dir) -> bool:
    p = Path(onnx_dir) / "export.json"
    return p.is_file() and json.loads(p.read_text()).get("precision") in ("int4", "int8")


def _settings(o: SpeedOptions, optimize: bool, raw: dict) -> dict:
    return dict(device=o.device, batch_sizes=o.batch_sizes, prompt_len=o.prompt_len, new_tokens=o.new_tokens,
                repeats=o.repeats, warmup=o.warmup, threads=o.threads or os.cpu_count(), precision=o.precision,
                optimize=optimize, seed=o.seed, decode_context_for_ideal=o.prompt_len + o.new_tokens // 2,
                load_average=raw["load_average"], cpu_count=os.cpu_count(), ci_target=o.ci_target,
                time_budget_s=o.time_budget_s, repetitions=raw["repetitions"],
                cores=pinned_cores(o.threads))  # fmt: skip
