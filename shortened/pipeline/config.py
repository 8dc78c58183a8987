"""What `convert` is told: every setting with its default, read from convert.toml and flags, type-checked once."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shortened.converter.criteria import CRITERIA, DATA_DRIVEN, check_criterion
from shortened.converter.pruning import check_ratio
from shortened.converter.recovery import RECOVER, RECOVER_SAMPLES
from shortened.converter.retrain import METHODS, RetrainConfig
from shortened.converter.selection import SELECTIONS, resolve
from shortened.data import CalibSpec
from shortened.errors import UsageError
from shortened.exporters.quantize import quant_options_for
from shortened.exporters.tensorrt import parse_range
from shortened.io import check_no_overlap, check_output_dir
from shortened.model.loading import check_length, load_config
from shortened.options import check, from_mapping, option
from shortened.runtime.tensorrt import tensorrt_unavailable_reason
from shortened.validators.parity import tolerances_for
from shortened.validators.timing import BACKENDS

STEPS = ("score", "sweep", "prune", "retrain", "onnx", "tensorrt", "parity", "quality", "speed")
PRECISIONS = ("fp32", "fp16", "bf16", "int4", "int8")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ConvertConfig:
    """Every setting of `shortened convert`. In convert.toml, sections only group keys: [pruning] ratio = 0.2
    sets `ratio`. On the command line each is a flag: --ratio 0.2, --no-width-baseline, --batch-sizes 1,8."""

    model: str = option("", "checkpoint directory, hub id or .gguf file", cli=False)  # the positional MODEL
    out: str = option("", "output directory (appears only when every step has run)")
    force: bool = option(False, "replace an earlier output of this tool (its finished steps are reused)")
    # loading
    dtype: str = option("float32", "weights' dtype while scoring and pruning", choices=DTYPES)
    device: str = option("cpu", "cpu, cuda, cuda:N, or auto (shard across GPUs)")
    trust_remote_code: bool = option(False, "run the model repository's own code")
    # calibration (the paper: 10 samples of 128 tokens)
    calib: str = option("", "calibration text: a .txt or .jsonl file, or hf:DATASET[:CONFIG]")
    num_samples: int = option(10, "calibration samples")
    seq_len: int = option(128, "tokens per calibration sample")
    seed: int = option(0, "seed for the calibration windows (and parity's prompts)")
    add_bos: bool = option(False, "start every calibration and evaluation window with the BOS token")
    # scoring and pruning (the paper: PPL criterion with the "+" protection, 20% of the blocks)
    criterion: str = option("ppl", "block-importance criterion", choices=CRITERIA)
    iterative: bool = option(False, "remove one block at a time and rescore (SLEB-style)")
    protect: list[int] | None = option(None, "blocks never removed (default 0,1,2,3,-2,-1)")
    no_protect: bool = option(False, "every block is a candidate")
    ratio: float | Literal["auto"] = option(0.2, "fraction of the blocks removed, or auto: the largest k whose "
                                            "held-out PPL ratio stays within --max-ppl-ratio (a sweep)")  # fmt: skip
    remove: int = option(0, "number of blocks removed; > 0 overrides --ratio")
    blocks: list[int] | None = option(None, "explicit blocks removed; overrides --remove and --ratio")
    # selection and training-free recovery (converter/selection.py, recovery.py); auto: best / linear with calib
    select: str = option("auto", "topk: the criterion's order (the paper); span: best contiguous span; iterative: "
                         "SLEB order; best: all of them, by calibration perplexity after recovery; auto: top-k and "
                         "spans with --calib", choices=("auto", *SELECTIONS))  # fmt: skip
    recover: str = option("auto", "none (the paper); linear: a least-squares map per removed run, folded into the "
                          "kept block before it; auto: linear with --calib where the family allows",
                          choices=RECOVER)  # fmt: skip
    recover_calib: str = option("", "fitting text for the recovery (default: --calib, other windows)")
    recover_samples: int = option(RECOVER_SAMPLES, "recovery fitting windows of --seq-len tokens", min=1)
    sweep_max_remove: int = option(0, "with --ratio auto: the largest k tried (0: 40%% of the blocks)")
    # retraining (off unless a method is given; other RetrainConfig options in [retrain_options])
    retrain: str = option("", "retrain the pruned model (default: no retraining)", choices=METHODS)
    retrain_data: str = option("", "retraining data: .txt, .jsonl or hf:DATASET[:CONFIG]")
    retrain_steps: int = option(100, "retraining optimizer steps")
    retrain_options: dict = option(default_factory=dict, help="other `shortened retrain` options, e.g. "
                                   '\'{"lr": 2e-4}\'')  # fmt: skip
    # export
    precision: str = option("fp32", "the exported precision", choices=PRECISIONS)
    precisions: list[str] = option(default_factory=list, help="several, each exported, checked and measured; the "
                                   "last is the deployed artifact (gated); empty: --precision",
                                   choices=PRECISIONS)  # fmt: skip
    quant_options: dict = option(default_factory=dict, help="int4/int8: exporters.quantize.QuantOptions fields")
    opset: int = option(0, "ONNX opset (0: the exporter's default)")
    optimize: bool = option(False, "onnxruntime's fused graph (GroupQueryAttention); TensorRT then gets a portable "
                            "export")  # fmt: skip
    tensorrt: str = option("auto", "auto: build where TensorRT and a GPU are present; on: required",
                           choices=("auto", "on", "off"))  # fmt: skip
    trt_batch: str = option("1:8:32", "TensorRT batch profile min:opt:max")
    trt_seq: str = option("1:128:2048", "TensorRT sequence profile min:opt:max")
    # parity
    parity_new_tokens: int = option(16, "greedy tokens decoded with the cache")
    parity_batch_sizes: list[int] = option(default_factory=lambda: [1, 2], help="parity batch sizes, left padded")
    parity_tolerances: dict = option(default_factory=dict, help="override the precision's tolerances, e.g. "
                                     '\'{"max_abs": 1e-3}\'')  # fmt: skip
    parity_prompts: str = option("", "a text file of prompts (default: random ids plus the calibration text)")
    # quality
    eval_text: str = option("", "held-out text: a file, wikitext2 or ptb (needs `datasets`); empty: no quality step")
    eval_seq_len: int = option(128, "perplexity window length in tokens")
    eval_max_windows: int = option(0, "first N windows of the text (0: the whole text)")
    # speed
    speed: bool = option(True, "measure the pruned model's speed against the original")
    speed_backend: str = option("onnxruntime", "what runs the models for the speed step", choices=BACKENDS)
    batch_sizes: list[int] = option(default_factory=lambda: [1, 8, 32], help="speed batch sizes", min=1)
    prompt_len: int = option(128, "prompt tokens")
    new_tokens: int = option(32, "generated tokens per run", min=2)
    repeats: int = option(3, "interleaved repetitions per batch size, at least; more until every speedup's 95%% "
                          "interval is within +-speed_ci_target", min=1)  # fmt: skip
    speed_ci_target: float = option(0.03, "relative half-width of the speedups' 95%% intervals (0: exactly repeats)")
    speed_time_budget: float = option(120.0, "seconds per batch size before giving up on the target")
    width_baseline: bool = option(True, "also measure a width-pruned copy with the pruned model's parameter count")
    # gates
    max_ppl_ratio: float = option(0.0, "gate: pruned (or retrained) PPL / original PPL at most this (0: no gate)",
                                  min=0)  # fmt: skip
    min_speedup: float = option(0.0, "gate: decode speedup at every batch size at least this (0: no gate)", min=0)
    rerun: list[str] = option(default_factory=list, help="steps run again even when cached", choices=STEPS)

    def validate(self) -> None:
        """Check the whole configuration before any heavy work (exit code 2 on the first problem): every field's
        type, choices and minimum (options.check, as for TOML and flags), then what needs the model's config."""

        check(self)
        if not self.model:
            raise UsageError("no model: pass it first, `shortened convert MODEL --out DIR` (or `model = ...` in the "
                             "config)")  # fmt: skip
        if not self.out:
            raise UsageError("no output directory: pass --out DIR")
        model_config = load_config(self.model, self.trust_remote_code)
        check_output_dir(self.out, self.force, inputs=self.inputs())
        out = Path(self.out).resolve()
        check_no_overlap(out.with_name(f".{out.name}.partial"), self.inputs())

        if self.calib and self.criterion in DATA_DRIVEN and not self.blocks:
            check_length(model_config, self.seq_len, "--seq-len")
        if self.eval_text:
            check_length(model_config, self.eval_seq_len, "--eval-seq-len")
        if self.speed:
            check_length(model_config, self.prompt_len + self.new_tokens, "--prompt-len + --new-tokens:")
        check_length(model_config, 48 + self.parity_new_tokens, "parity's longest prompt (48) + --parity-new-tokens:")

        tolerances_for(
            self.precision if self.precision in ("fp32", "fp16", "bf16") else "fp32", self.parity_tolerances or None
        )  # unknown tolerance names fail here, not after the export

        known = {f.name for f in dataclasses.fields(RetrainConfig)} - {"load", "extra_args"}
        unknown = sorted(set(self.retrain_options) - known)
        if unknown:
            raise UsageError(f"unknown retrain_options {', '.join(unknown)}; see `shortened retrain --help`")
        check(RetrainConfig(**self.retrain_options), "retrain_options")  # their types, as `shortened retrain` does

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

        resolve(self.select, self.recover, load_config(self.model, self.trust_remote_code), bool(self.calib))
        if self.recover_calib and not Path(self.recover_calib).is_file():
            raise UsageError(f"recovery calibration file {self.recover_calib} not found")
        if self.retrain and not self.retrain_data:
            raise UsageError("retraining needs data: pass --retrain-data FILE")
        if len(set(self.precisions)) != len(self.precisions):
            raise UsageError(f"precisions must be distinct, of fp32, fp16, bf16, int4, int8; got {self.precisions}")
        if any(p in ("int4", "int8") for p in self.all_precisions()) or self.quant_options:
            for p in self.all_precisions():
                if p in ("int4", "int8"):
                    quant_options_for(p, dict(self.quant_options), self.optimize, self.calib or None)
        if self.eval_text and not Path(self.eval_text).is_file() and self.eval_text not in ("wikitext2", "ptb"):
            raise UsageError(f"eval text {self.eval_text} not found: pass a text file, wikitext2 or ptb")
        if self.parity_prompts and not Path(self.parity_prompts).is_file():
            raise UsageError(f"parity prompts file {self.parity_prompts} not found")
        if self.tensorrt == "on":
            reason = tensorrt_unavailable_reason()
            if reason:
                raise UsageError(f"tensorrt = on, but {reason}")

    def inputs(self) -> dict:
        """Everything convert reads, by label: an output may not equal, contain or lie inside any of them."""
        return {"model": self.model, "calibration": self.calib, "retraining data": self.retrain_data,
                "eval text": self.eval_text, "parity prompts": self.parity_prompts,
                "recovery calibration": self.recover_calib}  # fmt: skip

    def all_precisions(self) -> list:
        """The exported precisions in order; the last one is deployed (and gated)."""
        return list(self.precisions) or [self.precision]


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
    """A ConvertConfig from flat settings (convert.toml and flags), each type-checked by options.check."""
    return from_mapping(ConvertConfig, settings)
