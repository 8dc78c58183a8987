"""Parity: does the exported ONNX model compute what the PyTorch model computes?

Like Polygraphy, the comparator stands apart from the backends: both models run behind the same Runner interface
(runtime/torch_runner.py, runtime/onnxruntime.py) through the same greedy loop (runtime/base.py) on the same
cases, and only their outputs meet here. Cases: real text prompts and random token ids, batch 1 and larger
batches with LEFT padding, several prompt lengths, each followed by a multi-step greedy decode with the KV cache.

Metrics per case, over real (unmasked) positions only: the prompt's positions, then every decode step up to the
first step where the two greedy generations part (later steps would compare different inputs).
- max_abs / mean_abs: |onnx - torch| of the logits; max_rel: the same divided by |torch| (Polygraphy's reldiff)
- cosine: the lowest cosine similarity between the two logit vectors of one position
- top1: the fraction of positions whose argmax agrees
- top1_gap: the largest logit gap, under the torch model, between its top token and the one onnx picked (0 where
  they agree). It is the tie-aware form of top-1 and generation agreement: a flip between two near-equal tokens
  costs a gap near 0, a real error a large one. The step where the greedy generations part is compared, too.
- kl: the largest KL(torch || onnx) between the two next-token distributions
- generation: the first position where the N greedy tokens differ (N when identical); gen_match is its mean / N
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shortened.errors import UsageError
from shortened.io import read_text_file
from shortened.model.families import num_blocks
from shortened.model.loading import Loaded, check_length, load_config, load_model
from shortened.options import check, option
from shortened.runtime.base import greedy_generate
from shortened.runtime.onnxruntime import find_onnx_model, graph_precision, load_ort_runner
from shortened.runtime.tensorrt import TrtRunner
from shortened.runtime.torch_runner import TorchRunner

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16", "int4", "int8")
# real text used when the user passes no prompt file: the project's shared data, when it is present
DEFAULT_TEXTS = [
    Path(__file__).resolve().parents[3] / "shared" / "data" / "text" / name
    for name in ("corpus_en.txt", "tinystories_sample.txt")
]


def gate_value(text: str) -> float | None:
    """A tolerance flag's text: a number, or 'none' (the gate off)."""
    import argparse

    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _gate(help: str):
    return option(None, help, parse=gate_value)


@dataclass
class Tolerances:
    """Gates on the metrics of every case; None means reported but not gated."""

    max_abs: float | None = _gate("largest |onnx - torch| of a logit")
    mean_abs: float | None = _gate("mean |onnx - torch| of the logits")
    max_rel: float | None = _gate("largest |onnx - torch| / |torch| of a logit")
    min_cosine: float | None = _gate("lowest cosine similarity of one position's logits")
    min_top1: float | None = _gate("fraction of positions with the same argmax")
    max_kl: float | None = _gate("largest KL(torch || onnx) of one position's next-token distribution")
    max_mean_kl: float | None = _gate("mean KL over the case's positions")
    max_top1_gap: float | None = _gate("largest torch logit gap between torch's top token and onnx's pick")
    min_gen_match: float | None = _gate("mean over rows of (first differing greedy position) / new tokens")

    def check(self, m: dict) -> list[str]:
        """The failed gates, one short line each. NaN fails every gate it meets."""
        fails = []
        for key, metric, upper in (
            ("max_abs", "max_abs", True),
            ("mean_abs", "mean_abs", True),
            ("max_rel", "max_rel", True),
            ("min_cosine", "cosine", False),
            ("min_top1", "top1", False),
            ("max_kl", "kl", True),
            ("max_mean_kl", "mean_kl", True),
            ("max_top1_gap", "top1_gap", True),
            ("min_gen_match", "gen_match", False),
        ):
            tol = getattr(self, key)
            if tol is None:
                continue
            v = m[metric]
            ok = v <= tol if upper else v >= tol
            if not ok:  # written this way so that NaN fails
                fails.append(f"{metric} {v:.3g} {'>' if upper else '<'} {tol:g}")
        return fails


# fp32: tight on the logits. Measured on CPU: tiny models differ by ~2e-6; SmolLM2 pruned to 24 blocks by up to
# 6.9e-4 (logits of magnitude ~20, i.e. ~3e-5 relative; KL < 4e-9; every greedy token identical), so 2e-3 leaves a
# margin for longer prompts, while one changed weight moves the logits by ~1. A top-1 flip is excused only
# between tokens within 4e-3 (twice max_abs): nothing an fp32 difference of that size could not swap.
# fp16/bf16 are compared against the fp32 PyTorch model, and onnxruntime's CPU provider
# does not really compute in half precision, so they are judged on what serving cares about: a small KL between
# the next-token distributions and the same top-1 / greedy tokens except between near-equal candidates (top1_gap).
# Raw top-1 and generation agreement are reported; gate them with min_top1 / min_gen_match where wanted.
DEFAULT_TOLERANCES = {
    "fp32": Tolerances(max_abs=2e-3, min_cosine=0.99999, max_kl=1e-6, max_top1_gap=4e-3),
    "fp16": Tolerances(min_cosine=0.999, max_kl=2e-2, max_top1_gap=0.1),
    "bf16": Tolerances(min_cosine=0.99, max_kl=1e-1, max_top1_gap=0.3),
    "int4": Tolerances(max_mean_kl=0.05, max_kl=0.5),
    "int8": Tolerances(max_mean_kl=0.03, max_kl=0.3),
}
# int4/int8 (weight-only, exporters/quantize.py) are compared against the fp32 PyTorch model of the same checkpoint,
# and judged by the distributions only: mean and max KL; top-1, top1_gap and the greedy agreement are reported.
# Measured on SmolLM2-135M pruned to 24 blocks, CPU, the default 12 cases (text and random, b1/b2, L1/16/48, 16
# tokens): int4 (hqq blocks, int8 head) mean KL <= 0.0031 per case, max KL 0.013, top-1 0.67-1.0 (near-ties flip)
# with hqq's float zero points; with the uint8 zero points (the default, accuracy level 4's int8 activations on the
# fast path) mean KL <= 0.0127, max KL 0.136, top-1 >= 0.5 (load 4.9): inside the gates, which stay as they are;
# first differing greedy token anywhere from 0 to none in 16; int8 (rtn, int8 head) mean KL <= 0.0173, max KL
# 0.125 (rtn rounds SmolLM2's outliers worse than hqq at 4 bits). Round-to-nearest int4 with an int4 head
# (onnxruntime-genai's default) gives mean KL 0.57 there and fails; random tiny models (tests) reach mean KL 0.03,
# max 0.06 at int4 (an int4 embedding of their own).


def tolerances_for(precision: str, overrides: Tolerances | dict | None = None) -> Tolerances:
    """The named defaults of a precision, with any field overridden (a dict of fields, or a whole Tolerances)."""
    if precision not in DEFAULT_TOLERANCES:
        raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if isinstance(overrides, Tolerances):
        return overrides
    tol = DEFAULT_TOLERANCES[precision]
    if overrides:
        names = {f.name for f in dataclasses.fields(Tolerances)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise UsageError(f"unknown tolerance {unknown[0]!r}; known: {', '.join(sorted(names))}")
        tol = dataclasses.replace(tol, **{k: None if v is None else float(v) for k, v in overrides.items()})
    return tol


@dataclass
class Case:
    name: str
    source: str  # "text" or "random"
    input_ids: np.ndarray  # [B, L], left padded
    attention_mask: np.ndarray  # [B, L]


@dataclass
class CaseResult:
    name: str
    source: str
    batch: int
    seq_len: int
    new_tokens: int
    positions: int  # compared positions (real prompt tokens + decode steps before the generations part)
    max_abs: float
    mean_abs: float
    max_rel: float
    cosine: float
    top1: float
    kl: float
    mean_kl: float
    top1_gap: float
    prefill_max_abs: float
    decode_max_abs: float
    first_diff: list  # per row: first position where the greedy tokens differ, None when identical
    gen_match: float
    failures: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class ParityReport:
    reference: str
    onnx: str
    precision: str
    providers: list  # what onnxruntime actually ran (session.get_providers())
    reference_providers: list
    tolerances: Tolerances
    cases: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases)

    @property
    def failures(self) -> list[str]:
        return [f"{c.name}: {f}" for c in self.cases for f in c.failures]

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "reference": self.reference,
            "onnx": self.onnx,
            "precision": self.precision,
            "execution_providers": self.providers,
            "reference_runner": self.reference_providers,
            "tolerances": dataclasses.asdict(self.tolerances),
            "cases": [{**dataclasses.asdict(c), "passed": c.passed} for c in self.cases],
            "failures": self.failures,
            "notes": self.notes,
        }

    def table(self) -> str:
        head = (
            "case",
            "B",
            "L",
            "pos",
            "max_abs",
            "mean_abs",
            "max_rel",
            "cos_min",
            "top1",
            "gap",
            "kl_max",
            "gen",
            "result",
        )
        rows = [head]
        for c in self.cases:
            worst = min(d if d is not None else c.new_tokens for d in c.first_diff)
            rows.append(
                (
                    c.name, str(c.batch), str(c.seq_len), str(c.positions), f"{c.max_abs:.2e}", f"{c.mean_abs:.2e}",
                    f"{c.max_rel:.2e}", f"{c.cosine:.7f}", f"{c.top1:.4f}", f"{c.top1_gap:.1e}", f"{c.kl:.2e}",
                    f"{worst}/{c.new_tokens}", "ok" if c.passed else "FAIL",
                )
            )  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [
            "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        gates = ", ".join(f"{k}={v:g}" for k, v in dataclasses.asdict(self.tolerances).items() if v is not None)
        lines += [
            "",
            f"reference: {self.reference} ({', '.join(self.reference_providers)})",
            f"onnx:      {self.onnx} ({self.precision}) ran on {', '.join(self.providers)}",
            f"gates:     {gates}  (gen = first differing greedy position / new tokens, worst row)",
            *[f"note:      {n}" for n in self.notes],
        ]
        if self.passed:
            lines.append(f"PASS: all {len(self.cases)} cases within tolerances")
        else:
            bad = [c for c in self.cases if not c.passed]
            lines.append(f"FAIL: {len(bad)} of {len(self.cases)} cases out of tolerance; first: {self.failures[0]}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Cases


def row_lengths(batch: int, seq_len: int) -> list[int]:
    """Real tokens per row: the first row is full, later rows shorter, so every batch > 1 has left padding."""
    return [max(1, seq_len - (r * seq_len) // (batch + 1)) for r in range(batch)]


def make_cases(batch_sizes, seq_lens, vocab_size: int, pad_id: int, text_ids=None, seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    sources = (["text"] if text_ids is not None else []) + ["random"]
    cases = []
    for source in sources:
        for b in batch_sizes:
            for n in seq_lens:
                ids = np.full((b, n), pad_id, np.int64)
                mask = np.zeros((b, n), np.int64)
                for r, k in enumerate(row_lengths(b, n)):
                    if source == "text":
                        start = int(rng.integers(0, len(text_ids) - k + 1))
                        ids[r, n - k :] = text_ids[start : start + k]
                    else:
                        ids[r, n - k :] = rng.integers(0, vocab_size, k)
                    mask[r, n - k :] = 1
                cases.append(Case(f"{source} b{b} L{n}", source, ids, mask))
    return cases


def read_prompt_ids(tokenizer, prompts_file, min_tokens: int, max_chars: int = 200_000):
    """Token ids of the prompt text (a user's file, else the shared data when present, else None: random only)."""
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise UsageError(f"prompts file {prompts_file} not found; pass a text file")
    else:
        path = next((p for p in DEFAULT_TEXTS if p.is_file()), None)
        if path is None:
            return None, "no prompt text found (pass --prompts FILE): random token ids only"
    if tokenizer is None:
        if prompts_file is None:
            return None, "the reference has no tokenizer: random token ids only"
        raise UsageError(f"the reference model has no tokenizer, so the prompts in {path} cannot be tokenized")

    text = read_text_file(path)[:max_chars]
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int64)
    if len(ids) < min_tokens:
        raise UsageError(f"{path} holds {len(ids)} tokens, fewer than the longest case ({min_tokens}); pass more text")
    return ids, f"text prompts from {path}"


# ---------------------------------------------------------------------------------------------
# Comparison


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(ref, got, mask: np.ndarray, new_tokens: int) -> dict:
    """Metrics of one case from two Generation results (runtime/base.py) of the same inputs."""
    real = mask.astype(bool)
    a_parts, b_parts = [ref.prefill_logits[real]], [got.prefill_logits[real]]
    first_diff = []
    for r in range(mask.shape[0]):
        differ = np.nonzero(ref.tokens[r] != got.tokens[r])[0]
        d = int(differ[0]) if len(differ) else new_tokens
        first_diff.append(None if d == new_tokens else d)
        # step k's logits follow tokens 0..k-1: identical inputs for k <= d. Step 0 is the prompt's last position.
        for k in range(1, min(d, new_tokens - 1) + 1):
            a_parts.append(ref.step_logits[k][r : r + 1])
            b_parts.append(got.step_logits[k][r : r + 1])
    a = np.concatenate(a_parts).astype(np.float64)
    b = np.concatenate(b_parts).astype(np.float64)
    n_prefill = len(a_parts[0])
    diff = np.abs(a - b)
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    la, lb = _log_softmax(a), _log_softmax(b)
    kl = (np.exp(la) * (la - lb)).sum(-1)
    rows = np.arange(len(a))
    gap = a[rows, a.argmax(-1)] - a[rows, b.argmax(-1)]
    nan = float("nan")
    return dict(
        positions=len(a),
        max_abs=float(diff.max()),
        mean_abs=float(diff.mean()),
        max_rel=float((diff / np.maximum(np.abs(a), 1e-6)).max()),
        cosine=float(cos.min()),
        top1=float((a.argmax(-1) == b.argmax(-1)).mean()),
        kl=float(kl.max()),
        mean_kl=float(kl.mean()),
        top1_gap=float(gap.max()),
        prefill_max_abs=float(diff[:n_prefill].max()),
        decode_max_abs=float(diff[n_prefill:].max()) if len(a) > n_prefill else nan,
        first_diff=first_diff,
        gen_match=float(np.mean([new_tokens if d is None else d for d in first_diff]) / new_tokens),
    )


# ---------------------------------------------------------------------------------------------
# The entry point


def export_precision(onnx_path: Path) -> str:
    """The precision of an export: its export.json, else the graph's types (runtime.onnxruntime.graph_precision)."""
    meta = onnx_path.parent / "export.json"
    if meta.is_file():
        p = str(json.loads(meta.read_text()).get("precision", "")).lower()
        p = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16"}.get(p, p)
        if p in PRECISIONS:
            return p
    import onnx

    return graph_precision(onnx.load(str(onnx_path), load_external_data=False))["precision"] or "fp32"


def _check_ints(name: str, values, minimum: int = 1) -> list[int]:
    values = [int(v) for v in values]
    if not values or min(values) < minimum:
        raise UsageError(f"{name} must be one or more integers >= {minimum}, got {values}")
    return values


@dataclass
class ParityOptions:
    """The cases and gates of a parity run (see the module doc)."""

    precision: str | None = option(None, "tolerance set (default: from export.json)", choices=PRECISIONS)
    tolerances: Tolerances | dict | None = option(None, "a Tolerances, or a dict of fields overriding the "
                                                  "precision's defaults", cli=False)  # fmt: skip
    prompts_file: str | Path | None = option(None, "text file of prompts (default: the shared data's text when "
                                             "present)", flag="--prompts")  # fmt: skip
    batch_sizes: list[int] = option(default_factory=lambda: [1, 2], help="batch sizes, left padded")
    seq_lens: list[int] = option(default_factory=lambda: [1, 16, 48], help="prompt lengths")
    new_tokens: int = option(16, "greedy tokens decoded with the cache")
    seed: int = option(0, "seed of the random token ids and of the text prompts' offsets")
    provider: str | None = option("auto", "onnxruntime execution provider (auto: CUDA where present, else CPU)",
                                  choices=("auto", "cpu", "cuda", "tensorrt"))  # fmt: skip
    threads: int | None = option(None, "onnxruntime intra-op threads (default: onnxruntime's choice)")
    engine: str | Path | None = option(None, "a TensorRT engine directory built from this export (`shortened "
                                       "export tensorrt`), run instead of onnxruntime", cli=False)  # fmt: skip

    def validate(self) -> ParityOptions:
        """Each bad value as one UsageError line, before any model loads. Returns self."""
        self.batch_sizes = _check_ints("batch sizes", self.batch_sizes)
        self.seq_lens = _check_ints("sequence lengths", self.seq_lens)
        (self.new_tokens,) = _check_ints("new tokens", [self.new_tokens])
        if self.precision is not None:
            tolerances_for(self.precision)  # an unknown precision, named as tolerances_for names it
        if isinstance(self.tolerances, Tolerances):
            self.tolerances = dataclasses.replace(self.tolerances)  # checked below: a copy, not the caller's
        return check(self, "parity option")


def validate_parity(reference, onnx_dir, options: ParityOptions | None = None, *, load=None, progress: bool = True,
                    **fields) -> ParityReport:  # fmt: skip
    """Run the PyTorch reference and the ONNX model on the same cases and compare them (see the module doc).

    reference: a model directory / hub id / GGUF file (loaded in fp32 unless `load` says otherwise), or a
    model.loading.Loaded. options: a ParityOptions; its fields may also come as keywords (new_tokens=8), which
    replace the options'. The report names the execution providers that actually ran.
    """
    from tqdm.auto import tqdm

    opts = dataclasses.replace(options or ParityOptions(), **fields).validate()
    onnx_path = find_onnx_model(onnx_dir)
    precision = opts.precision or export_precision(onnx_path)
    tol = tolerances_for(precision, opts.tolerances)
    ref_name = str(reference.source) if isinstance(reference, Loaded) else str(reference)
    check_length(_reference_config(reference), max(opts.seq_lens) + opts.new_tokens,
                 "the longest prompt plus new tokens (--seq-lens + --new-tokens):")  # fmt: skip
    with _onnx_runner(onnx_path, opts) as runner:
        loaded = reference if isinstance(reference, Loaded) else load_model(ref_name, load, tokenizer="optional")
        _check_same_depth(runner, onnx_path, loaded.model.config, ref_name)
        text_ids, note = read_prompt_ids(loaded.tokenizer, opts.prompts_file, max(opts.seq_lens))
        with TorchRunner(loaded.model) as ref_runner:
            report = ParityReport(ref_name, str(onnx_path.parent), precision, runner.providers(),
                                  ref_runner.providers(), tol)  # fmt: skip
            report.notes.append(note)
            if not runner.has_cache:
                report.notes.append("the ONNX graph has no KV cache: each decode step re-runs the whole sequence")
            for case in tqdm(_cases(loaded, text_ids, opts), desc="parity", disable=not progress, leave=False):
                report.cases.append(_run_case(case, ref_runner, runner, tol, opts.new_tokens))
    return report


def _reference_config(reference):
    """The reference's config, read before any weights: a missing model or an unsupported architecture fails here."""

    return reference.model.config if isinstance(reference, Loaded) else load_config(str(reference))


def _onnx_runner(onnx_path: Path, opts: ParityOptions):
    """The runner of the export: onnxruntime, or the TensorRT engine built from it (compared by the same metrics)."""
    if opts.engine is not None:
        return TrtRunner(opts.engine)

    return load_ort_runner(onnx_path, None if opts.provider == "auto" else opts.provider, opts.threads)


def _check_same_depth(runner, onnx_path: Path, ref_config, ref_name: str) -> None:
    """The export and the reference must hold as many blocks (the graph's cache inputs, else its config.json)."""

    ref_blocks = num_blocks(ref_config)
    onnx_blocks = runner.num_layers if runner.has_cache else None
    if onnx_blocks is None and (onnx_path.parent / "config.json").is_file():
        from transformers import AutoConfig

        onnx_blocks = num_blocks(AutoConfig.from_pretrained(onnx_path.parent))
    if onnx_blocks is not None and onnx_blocks != ref_blocks:
        raise UsageError(
            f"the ONNX model has {onnx_blocks} layers but the reference {ref_name} has {ref_blocks} blocks; "
            "validate an export against the model it was exported from"
        )


def _cases(loaded, text_ids, opts: ParityOptions) -> list[Case]:
    cfg = loaded.model.config
    pad = cfg.pad_token_id if getattr(cfg, "pad_token_id", None) is not None else 0
    return make_cases(opts.batch_sizes, opts.seq_lens, int(cfg.vocab_size), int(pad), text_ids, opts.seed)


def _run_case(case: Case, ref_runner, runner, tol: Tolerances, new_tokens: int) -> CaseResult:
    """Both runners' greedy generations of one case, compared and gated."""
    ref = greedy_generate(ref_runner, case.input_ids, case.attention_mask, new_tokens)
    got = greedy_generate(runner, case.input_ids, case.attention_mask, new_tokens)
    if got.prefill_logits.shape != ref.prefill_logits.shape:
        raise UsageError(
            f"the ONNX model's logits have shape {got.prefill_logits.shape[1:]} per row but the reference's "
            f"{ref.prefill_logits.shape[1:]}: they are different models"
        )
    m = compare(ref, got, case.attention_mask, new_tokens)
    b, n = case.input_ids.shape
    result = CaseResult(case.name, case.source, b, n, new_tokens, **m)
    result.failures = tol.check(m)
    log.info("%s: max_abs %.3g kl %.3g first_diff %s", case.name, m["max_abs"], m["kl"], m["first_diff"])
    return result
