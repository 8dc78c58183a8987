"""What `convert` is told: every setting with its default, read from convert.toml and flags, type-checked once."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from shortened.errors import UsageError
from shortened.io import check_no_overlap, check_output_dir

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
        from shortened.converter.criteria import DATA_DRIVEN, check_criterion
        from shortened.converter.pruning import check_ratio
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
        check_criterion(self.criterion, calibrated=bool(self.calib or self.blocks))  # explicit blocks need no scores
        if self.criterion in DATA_DRIVEN and not self.blocks:
            CalibSpec(self.calib, self.num_samples, self.seq_len, self.seed, self.add_bos).validate()
        if self.ratio == "auto" and not self.blocks and not self.remove:
            if not self.max_ppl_ratio or not self.eval_text or not self.calib:
                raise UsageError("ratio = auto picks k by held-out perplexity: set max_ppl_ratio, eval_text and calib")
        elif not self.blocks and not self.remove:
            check_ratio(self.ratio, "ratio", or_auto=True)
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
