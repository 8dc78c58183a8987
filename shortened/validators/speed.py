"""Speed: prefill latency, per-token decode latency, tokens/s and peak memory of an original model and its
pruned candidate (and optionally a width-pruned baseline of the same size), with the ideal speedup beside it.

How the measurement stays honest on a noisy machine:
- every model runs in its own worker process: its own threads, and its own peak memory (resident set on CPU,
  allocated device memory on GPU), so the two models never share a number;
- warm-up runs first; then the models take turns (A B A B ..., the starting model rotating each repetition), so
  a slow drift of the machine hits all of them alike, and only one model computes at a time;
- onnxruntime sessions run with thread spinning off, so idle workers do not burn the cores the active one needs;
- medians and p90 over repetitions; speedups are computed pair by pair (A_i / B_i within repetition i) and then
  summarized, never as a ratio of two medians;
- repetitions continue until the 95% bootstrap interval (over the paired repetitions) of every speedup is narrower
  than +-ci_target (default 3%) or the time budget is spent; every speedup is reported with its interval, and a
  verdict ("faster", "slower") only where the interval excludes 1, else "not resolved";
- a measured speedup above the FLOP ideal by more than its interval is flagged (a disturbed baseline, cache effects);
- every worker runs with the same number of intra-op threads, pinned to the same cores; every model gets the same
  prompt tokens; first-token (prefill) and per-token (decode) latency are reported apart.

The ideal speedup comes from the configs alone (`flops_per_token`): what removing compute would give if time
were proportional to it.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from shortened.errors import UsageError
from shortened.model.cost import _config, flops_per_token, ideal_speedup
from shortened.model.families import geometry

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt")
# what a worker can measure: a Runner of a backend in the shared greedy loop, Hugging Face `generate` (eager
# PyTorch, the user's everyday baseline), or onnxruntime-genai's own runtime on a model-builder directory
KINDS = BACKENDS + ("hf-generate", "genai")


# ---------------------------------------------------------------------------------------------
# The ideal speedup: per-token forward FLOPs from the config (2 FLOPs per multiply-add)


# ---------------------------------------------------------------------------------------------
# Statistics


def summarize(values) -> dict:
    """Median, p10 and p90 (linear interpolation) and count of a list of numbers."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {"median": None, "p10": None, "p90": None, "n": 0}
    return {"median": float(np.median(v)), "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90)),
            "n": int(v.size)}  # fmt: skip


def bootstrap_ci(ratios, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of paired ratios (pairs resampled with replacement)."""
    r = np.asarray([x for x in ratios if x is not None], dtype=float)
    if r.size < 2:  # one pair says nothing about the spread
        return float("-inf"), float("inf")
    rng = np.random.default_rng(seed)
    meds = np.median(r[rng.integers(0, r.size, (n_boot, r.size))], axis=1)
    a = (1 - level) / 2
    return float(np.quantile(meds, a)), float(np.quantile(meds, 1 - a))


def speedup_stats(ratios, ideal: float | None = None, level: float = 0.95) -> dict:
    """Median, interval, relative half-width and verdict of paired speedups.

    verdict: "faster" / "slower" when the interval lies above / below 1, else "not resolved" (the interval is wider
    than the effect). above_ideal: the interval's lower end exceeds the FLOP ideal."""
    st = summarize(ratios)
    if st["median"] is None:
        return {**st, "ci_low": None, "ci_high": None, "ci_half_rel": None, "verdict": "not measured"}
    lo, hi = bootstrap_ci(ratios, level)
    if not np.isfinite(hi - lo):  # fewer than 2 pairs: no interval, no verdict
        return {**st, "ci_low": None, "ci_high": None, "ci_level": level, "ci_half_rel": None,
                "verdict": "not resolved"}  # fmt: skip
    half = (hi - lo) / 2 / st["median"]
    verdict = "faster" if lo > 1 else "slower" if hi < 1 else "not resolved"
    out = {**st, "ci_low": lo, "ci_high": hi, "ci_level": level, "ci_half_rel": half, "verdict": verdict}
    if ideal:
        out["above_ideal"] = bool(lo > ideal)
    return out


def resolved(runs: dict, baseline: str, target: float) -> bool:
    """Whether every model's decode speedup over `baseline` has an interval within +-target (relative) so far.
    runs: {name: [{"decode_s": [...]}, ...]} of one batch size, repetitions paired by index."""
    base = [float(np.mean(r["decode_s"])) for r in runs[baseline]]
    if len(base) < 3:
        return False
    for name, reps in runs.items():
        if name == baseline:
            continue
        ratios = pairwise_speedups(base, [float(np.mean(r["decode_s"])) for r in reps])
        lo, hi = bootstrap_ci(ratios)
        if not (hi - lo) / 2 <= target * float(np.median(ratios)):
            return False
    return True


def pairwise_speedups(base_times, times) -> list[float]:
    """Speedup of each repetition: base_i / time_i, pairing the runs of the same repetition."""
    if len(base_times) != len(times):
        raise ValueError(f"need paired runs: {len(base_times)} vs {len(times)}")
    return [a / b for a, b in zip(base_times, times)]


# ---------------------------------------------------------------------------------------------
# The worker: one model in one process


@dataclass
class ModelSpec:
    name: str  # label in the report: original, candidate, width, ...
    path: str  # checkpoint dir (torch, hf-generate), ONNX dir (onnxruntime, genai), engine dir (tensorrt)
    kind: str = "torch"  # one of KINDS
    device: str = "cpu"
    threads: int | None = None  # intra-op threads; None: all cores
    config_path: str | None = None  # where config.json is (for FLOPs and vocabulary), when not in `path`


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def pinned_cores(threads: int | None) -> list[int]:
    """The cores every worker is pinned to: the first `threads` of this process's (all when None)."""
    avail = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return avail[: threads or len(avail)]


def _make_runner(spec: ModelSpec):
    threads = spec.threads or os.cpu_count()
    if spec.kind == "torch":
        import torch

        from shortened.model.loading import LoadOptions
        from shortened.runtime.torch_runner import load_torch_runner

        torch.set_num_threads(threads)
        return load_torch_runner(spec.path, LoadOptions(device=spec.device))
    if spec.kind == "onnxruntime":
        from shortened.runtime.onnxruntime import load_ort_runner  # sessions with thread spinning off

        return load_ort_runner(spec.path, provider="cpu" if spec.device == "cpu" else "cuda", threads=threads)
    if spec.kind == "tensorrt":
        from shortened.runtime.tensorrt import TrtRunner, engine_path

        return TrtRunner(engine_path(spec.path), device=spec.device)
    raise UsageError(f"unknown backend {spec.kind!r}; choose one of {', '.join(KINDS)}")


class _RunnerMeasure:
    """A backend's Runner in the shared greedy loop: timings of every step."""

    def __init__(self, spec: ModelSpec):
        self.runner = _make_runner(spec)

    def run(self, input_ids: np.ndarray, new_tokens: int) -> tuple[float, list[float], list[int]]:
        from shortened.runtime.base import greedy_generate

        gen = greedy_generate(self.runner, input_ids, np.ones_like(input_ids), new_tokens)
        return gen.prefill_s, list(gen.decode_s), gen.tokens[0].tolist()

    def providers(self):
        return self.runner.providers()


class _HFGenerateMeasure:
    """Eager PyTorch through `model.generate` (greedy), timed at every step by a logits processor."""

    def __init__(self, spec: ModelSpec):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(spec.threads or os.cpu_count())
        self.torch = torch
        self.device = spec.device
        self.model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch.float32, use_safetensors=True)
        self.model.to(spec.device).eval()

    def run(self, input_ids: np.ndarray, new_tokens: int) -> tuple[float, list[float], list[int]]:
        torch = self.torch
        stamps = []

        def stamp(ids, scores):
            if self.device != "cpu":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return scores

        ids = torch.from_numpy(input_ids).to(self.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                logits_processor=[stamp],
                pad_token_id=0,
            )
        return stamps[0] - t0, list(np.diff(stamps)), out[0, input_ids.shape[1] :].tolist()

    def providers(self):
        return [f"torch eager ({self.device})"]


class _GenaiMeasure:
    """onnxruntime-genai's own runtime on a model-builder directory: its generator loop, its KV-cache buffers."""

    def __init__(self, spec: ModelSpec):
        import json

        og = _import_genai()
        cfg = og.Config(spec.path)
        threads = spec.threads or os.cpu_count()
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.og, self.model = og, og.Model(cfg)

    def run(self, input_ids: np.ndarray, new_tokens: int) -> tuple[float, list[float], list[int]]:
        og = self.og
        b, p = input_ids.shape
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=p + new_tokens, min_length=p + new_tokens, batch_size=b)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(input_ids.astype(np.int32))  # runs the prompt
        gen.generate_next_token()  # picks the first token from the prompt's logits (no model run)
        stamps = [time.perf_counter()]
        for _ in range(new_tokens - 1):
            gen.generate_next_token()  # runs the model on the last token, then picks the next
            stamps.append(time.perf_counter())
        return stamps[0] - t0, list(np.diff(stamps)), list(gen.get_sequence(0))[p : p + new_tokens]

    def providers(self):
        return ["onnxruntime-genai (cpu)"]


def _import_genai():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise UsageError("onnxruntime-genai is not installed; pip install onnxruntime-genai") from None
    return og


_MEASURES = {"hf-generate": _HFGenerateMeasure, "genai": _GenaiMeasure}


def _gpu_peak(spec: ModelSpec):
    """Peak device memory allocated through torch: the whole model for torch, the I/O and cache buffers for
    TensorRT (its engine's own memory is not counted); onnxruntime's CUDA arena is not visible here (None)."""
    if spec.device == "cpu" or spec.kind not in ("torch", "hf-generate", "tensorrt"):
        return None
    try:
        import torch

        return int(torch.cuda.max_memory_allocated())
    except Exception:  # no torch CUDA in this worker
        return None


def _worker(conn, spec: ModelSpec) -> None:
    """Load one model, then answer run requests until told to stop. Runs in its own process."""
    import warnings

    warnings.filterwarnings("ignore")
    base = _rss()
    cores = pinned_cores(spec.threads)
    if cores and hasattr(os, "sched_setaffinity"):  # every model on the same cores, with as many threads
        os.sched_setaffinity(0, cores)
    try:
        t0 = time.perf_counter()
        m = _MEASURES.get(spec.kind, _RunnerMeasure)(spec)
        conn.send({"ok": True, "load_s": time.perf_counter() - t0, "providers": m.providers(),
                   "baseline_rss": base, "loaded_rss": _rss()})  # fmt: skip
    except BaseException as e:  # report and quit: the parent turns it into one line
        conn.send({"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
        return
    run_rss = 0
    while (cmd := conn.recv()) is not None:
        try:
            prefill, decode, tokens = m.run(cmd["input_ids"], cmd["new_tokens"])
            run_rss = max(run_rss, _rss())
            conn.send({"ok": True, "prefill_s": prefill, "decode_s": decode, "tokens": tokens})
        except BaseException as e:  # out of memory and friends: this batch size is skipped
            conn.send({"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
    conn.send({"peak_rss": _peak_rss(), "run_rss": run_rss, "baseline_rss": base, "gpu_peak": _gpu_peak(spec)})


def _context():
    """Workers fork from a fork server that has imported torch and transformers once (and started no threads):
    fresh processes, without paying the imports again for every model."""
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "transformers.modeling_utils", "shortened.validators.speed"])
    return ctx


class _Worker:
    def __init__(self, spec: ModelSpec):
        ctx = _context()
        self.spec = spec
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, spec), daemon=True)
        self.proc.start()
        child.close()

    def recv(self):
        try:
            return self.conn.recv()
        except EOFError:
            self.proc.join(5)
            return {"ok": False, "error": f"worker died (exit code {self.proc.exitcode}; out of memory?)"}

    def run(self, input_ids, new_tokens):
        try:
            self.conn.send({"input_ids": input_ids, "new_tokens": new_tokens})
        except (BrokenPipeError, OSError):
            return {"ok": False, "error": f"worker is gone (exit code {self.proc.exitcode})"}
        return self.recv()

    def stop(self) -> dict:
        try:
            self.conn.send(None)
            out = self.conn.recv()
        except (EOFError, BrokenPipeError, OSError):
            out = {}
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
        return out


# ---------------------------------------------------------------------------------------------
# Interleaved measurement


def _kv_bytes(g, batch: int, length: int, bytes_per: int = 4) -> int:
    return 2 * g.layers * batch * g.kv_heads * g.head_dim * length * bytes_per


def _need_bytes(config, batch: int, prompt_len: int, new_tokens: int) -> int:
    """Rough working memory of one generation: KV cache, prompt logits, and activations (x4 slack)."""
    g = geometry(config)
    kv = _kv_bytes(g, batch, prompt_len + new_tokens)
    logits = batch * prompt_len * g.vocab * 4
    acts = batch * prompt_len * max(g.intermediate, g.hidden * 4) * 4
    return 2 * (kv + logits + acts)


def _available_bytes(device: str) -> int:
    if device != "cpu":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    import psutil

    return int(psutil.virtual_memory().available)


def measure(
    specs: list[ModelSpec],
    batch_sizes=(1, 8, 32),
    prompt_len: int = 128,
    new_tokens: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    progress: bool = True,
    ci_target: float | None = None,
    time_budget_s: float = 120.0,
    max_repeats: int | None = None,
    baseline: str | None = None,
) -> dict:
    """Run each spec in its own worker; warm up; then interleave the specs over at least `repeats` repetitions.

    ci_target: keep repeating (up to max_repeats, default 10 x repeats, and time_budget_s per batch size) until the
    bootstrap interval of every decode speedup over `baseline` (default: the first spec) is within +-ci_target
    (relative); None: exactly `repeats`. Returns {"models": {name: info}, "runs": {batch: {name: [{"prefill_s",
    "decode_s"}, ...]}}, "skipped": [...], "repetitions": {batch: {"n", "resolved", "seconds"}}}.
    """
    from tqdm.auto import tqdm

    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UsageError(f"model names must differ: {names}")
    configs = {s.name: _config(s.config_path or s.path) for s in specs}
    vocab = min(geometry(c).vocab for c in configs.values())
    baseline = baseline or names[0]
    max_repeats = max(repeats, max_repeats or 10 * repeats) if ci_target else repeats
    workers = {s.name: _Worker(s) for s in specs}
    models, runs, skipped, load, tokens, reps_info = {}, {}, [], {}, {}, {}
    try:
        for name, w in workers.items():
            r = w.recv()
            if not r["ok"]:
                raise UsageError(f"cannot load {name} ({w.spec.path}) for {w.spec.kind}: {r['error']}")
            models[name] = {"path": w.spec.path, "kind": w.spec.kind, "device": w.spec.device,
                            "providers": r["providers"], "load_s": r["load_s"]}  # fmt: skip
        rng = np.random.default_rng(seed)
        total = len(batch_sizes) * (warmup + repeats) * len(specs)  # the minimum; adaptive rounds extend it
        bar = tqdm(total=total, desc="speed", disable=not progress, file=sys.stderr)
        load_before = os.getloadavg()
        for i, b in enumerate(batch_sizes):
            need = max(_need_bytes(c, b, prompt_len, new_tokens) for c in configs.values())
            avail = _available_bytes(specs[0].device)
            if need > avail:
                skipped.append({"batch": b, "reason": f"needs about {need / 2**30:.1f} GiB, "
                                f"{avail / 2**30:.1f} GiB available"})  # fmt: skip
                bar.update((warmup + repeats) * len(specs))
                continue
            ids = rng.integers(3, vocab, size=(b, prompt_len), dtype=np.int64)
            runs[b] = {n: [] for n in names}
            failed = None
            t_batch, rep = time.perf_counter(), -1
            while True:
                rep += 1
                done = rep - warmup  # measured repetitions so far
                if done >= repeats and (
                    done >= max_repeats
                    or not ci_target
                    or resolved(runs[b], baseline, ci_target)
                    or time.perf_counter() - t_batch > time_budget_s
                ):
                    break
                if done >= repeats:
                    bar.total += len(names)
                k = rep % len(names)
                for name in names[k:] + names[:k]:  # rotate who goes first
                    r = workers[name].run(ids, new_tokens)
                    bar.update(1)
                    if not r["ok"]:
                        failed = f"{name}: {r['error']}"
                        break
                    if rep >= warmup:
                        runs[b][name].append({"prefill_s": r["prefill_s"], "decode_s": r["decode_s"]})
                    tokens.setdefault(b, {})[name] = r["tokens"]  # greedy tokens of the first row
                if failed:
                    break
            n_done = len(runs[b][baseline]) if b in runs else 0
            reps_info[b] = {
                "n": n_done,
                "seconds": round(time.perf_counter() - t_batch, 1),
                "resolved": bool(ci_target) and not failed and resolved(runs[b], baseline, ci_target),
            }
            if failed:
                del runs[b]
                skipped.append({"batch": b, "reason": f"failed ({failed}); likely does not fit memory"})
                bar.update(max(0, (i + 1) * (warmup + repeats) * len(specs) - bar.n))
        bar.close()
        load = {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]}
    finally:
        for name, w in workers.items():
            mem = w.stop()
            if name in models:
                models[name].update({
                    "peak_rss_mb": _mb(mem.get("peak_rss")),
                    "run_rss_mb": _mb(mem.get("run_rss")),
                    "baseline_rss_mb": _mb(mem.get("baseline_rss")),
                    "gpu_peak_mb": _mb(mem.get("gpu_peak")),
                })  # fmt: skip
    return {"models": models, "runs": runs, "skipped": skipped, "load_average": load, "tokens": tokens,
            "repetitions": reps_info}  # fmt: skip


def _mb(x):
    return None if x is None else round(x / 2**20, 1)


# ---------------------------------------------------------------------------------------------
# The report


@dataclass
class SpeedReport:
    backend: str
    settings: dict
    models: dict  # name -> path, kind, params, blocks, providers, memory, ideal speedups
    rows: list = field(default_factory=list)  # one per (batch, model)
    skipped: list = field(default_factory=list)
    baseline: str = "original"

    def to_dict(self) -> dict:
        return asdict(self)

    def row(self, batch: int, name: str) -> dict | None:
        return next((r for r in self.rows if r["batch"] == batch and r["model"] == name), None)

    def decode_speedup(self, batch: int, name: str = "candidate") -> float | None:
        r = self.row(batch, name)
        return None if r is None else r["decode_speedup"]["median"]

    def table(self) -> str:
        s = self.settings
        reps = s.get("repetitions") or {}
        n_reps = ", ".join(f"batch {b}: {v['n']}{'' if v['resolved'] else ' (not resolved)'}"
                           for b, v in reps.items()) or s["repeats"]  # fmt: skip
        target = s.get("ci_target")
        lines = [
            f"backend {self.backend} on {s['device']}, prompt {s['prompt_len']}, {s['new_tokens']} new tokens, "
            f"interleaved repetitions after {s['warmup']} warm-up ({n_reps}"
            f"{f'; until every interval is within +-{target:.0%}' if target else ''}); median (p90); speedups pair "
            f"by pair against the original with their 95% bootstrap interval [low, high]",
            f"{s.get('threads')} intra-op threads per model, pinned to cores {s.get('cores')}; load average "
            f"(1, 5, 15 min) before {s.get('load_average', {}).get('before')}, after "
            f"{s.get('load_average', {}).get('after')} on {s.get('cpu_count')} CPUs (a busy machine slows all models)",
            "",
            "| batch | model | blocks | params (M) | first token ms | decode ms/token | tokens/s | decode speedup "
            "[95% interval] | verdict | ideal | of ideal | prefill speedup |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in self.rows:
            m = self.models[r["model"]]
            sp, pp = r["decode_speedup"], r["prefill_speedup"]
            ideal = m.get("ideal_decode_speedup")
            of_ideal = f"{sp['median'] / ideal:.2f}" if sp["median"] and ideal else "-"
            params = f"{m['params'] / 1e6:.1f}" if m.get("params") else "-"
            verdict = "-" if r["model"] == self.baseline else sp.get("verdict", "-")
            if sp.get("above_ideal"):
                verdict += " (ABOVE IDEAL: disturbed baseline or cache effects?)"
            lines.append(
                f"| {r['batch']} | {r['model']} | {m.get('blocks', '-')} | {params} | {_fmt(r['prefill_ms'])} "
                f"| {_fmt(r['decode_ms_per_token'], 2)} | {_fmt(r['tokens_per_s'])} | {_fmt_ci(sp)} | {verdict} "
                f"| {f'{ideal:.3f}x' if ideal else '-'} | {of_ideal} | {_fmt_ci(pp)} |"
            )
        for r in self.rows:
            dw = r.get("depth_vs_width")
            if dw:
                lines.append(f"| {r['batch']} | depth vs width | | | | | | {_fmt_ci(dw)} | {dw['verdict']} | | | |")
        for sk in self.skipped:
            lines.append(f"| {sk['batch']} | skipped: {sk['reason']} | | | | | | | | | |")
        lines += ["", "| model | peak RSS MB | RSS while running MB | RSS before loading MB | GPU peak MB | runs on |",
                  "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for name, m in self.models.items():
            lines.append(
                f"| {name} | {m.get('peak_rss_mb')} | {m.get('run_rss_mb')} | {m.get('baseline_rss_mb')} "
                f"| {m.get('gpu_peak_mb') or '-'} | {', '.join(m.get('providers') or [])} |"
            )
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path | None:
        return plot_speed(self, path)


def _fmt_ci(st: dict) -> str:
    if not st or st.get("median") is None:
        return "-"
    lo, hi = st.get("ci_low"), st.get("ci_high")
    if lo is None:
        return f"{st['median']:.3f}x [no interval]"
    return f"{st['median']:.3f}x [{lo:.3f}, {hi:.3f}]"


def _fmt(st: dict, digits: int = 1, unit: str = "") -> str:
    if not st or st.get("median") is None:
        return "-"
    return f"{st['median']:.{digits}f}{unit} ({st['p90']:.{digits}f})"


def build_rows(runs: dict, baseline: str = "original") -> list[dict]:
    """Per (batch, model): prefill ms, decode ms per token and tokens/s (median, p10, p90 over repetitions), and
    the decode and prefill speedups over `baseline` computed repetition by repetition."""
    rows = []
    for b, per_model in runs.items():
        base = per_model.get(baseline)
        for name, reps in per_model.items():
            prefill = [r["prefill_s"] for r in reps]
            decode = [float(np.mean(r["decode_s"])) for r in reps]  # seconds per decode step of the batch
            row = {
                "batch": b,
                "model": name,
                "prefill_ms": summarize([x * 1e3 for x in prefill]),
                "decode_ms_per_token": summarize([x * 1e3 for x in decode]),
                "tokens_per_s": summarize([b / x for x in decode]),
                "decode_s": decode,
                "prefill_s": prefill,
            }
            if base is not None:
                base_decode = [float(np.mean(r["decode_s"])) for r in base]
                row["decode_speedups"] = pairwise_speedups(base_decode, decode)
                row["prefill_speedups"] = pairwise_speedups([r["prefill_s"] for r in base], prefill)
            row["decode_speedup"] = speedup_stats(row.get("decode_speedups", []))
            row["prefill_speedup"] = speedup_stats(row.get("prefill_speedups", []))
            rows.append(row)
        cand, width = per_model.get("candidate"), per_model.get("width")
        if cand and width:  # depth against width, pair by pair: > 1 means the depth-pruned model decodes faster
            r = next(x for x in rows if x["batch"] == b and x["model"] == "candidate")
            ratios = pairwise_speedups([float(np.mean(x["decode_s"])) for x in width],
                                       [float(np.mean(x["decode_s"])) for x in cand])  # fmt: skip
            st = speedup_stats(ratios)
            st["verdict"] = {"faster": "depth faster", "slower": "width faster"}.get(st["verdict"], st["verdict"])
            r["depth_vs_width"] = st
    return rows


def flag_above_ideal(rows: list[dict], models: dict) -> None:
    """Mark speedups whose interval lies entirely above the model's FLOP ideal."""
    for r in rows:
        ideal = models.get(r["model"], {}).get("ideal_decode_speedup")
        sp = r["decode_speedup"]
        if ideal and sp.get("ci_low") is not None:
            sp["above_ideal"] = bool(sp["ci_low"] > ideal)


def plot_speed(report: SpeedReport, path: str | Path) -> Path | None:
    """Decode tokens/s and decode speedup (with each model's ideal, dashed) against batch size."""
    from shortened.plots import _plt

    plt = _plt()
    if plt is None:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = {"original": "#1f77b4", "candidate": "#d62728", "width": "#2ca02c"}
    for i, name in enumerate(report.models):
        rows = sorted((r for r in report.rows if r["model"] == name), key=lambda r: r["batch"])
        if not rows:
            continue
        c = colors.get(name, f"C{i + 3}")
        bs = [r["batch"] for r in rows]
        label = {"candidate": "depth-pruned", "width": "width-pruned"}.get(name, name)
        ax1.plot(bs, [r["tokens_per_s"]["median"] for r in rows], "o-", color=c, label=label)
        if name != report.baseline:
            med = np.array([r["decode_speedup"]["median"] for r in rows], float)
            lo = np.array([r["decode_speedup"].get("ci_low") or m for r, m in zip(rows, med)], float)
            hi = np.array([r["decode_speedup"].get("ci_high") or m for r, m in zip(rows, med)], float)
            lo, hi = np.where(np.isfinite(lo), lo, med), np.where(np.isfinite(hi), hi, med)
            ax2.errorbar(bs, med, yerr=[med - lo, hi - med], fmt="o-", color=c, capsize=3,
                         label=f"{label} (95% interval)")  # fmt: skip
            ideal = report.models[name].get("ideal_decode_speedup")
            if ideal:
                ax2.axhline(ideal, color=c, ls="--", lw=0.9, label=f"{label} ideal {ideal:.2f}x")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.legend(fontsize=8)
    ax2.axhline(1.0, color="k", lw=0.6)
    ax1.set_ylabel("decode tokens/s")
    ax2.set_ylabel("decode speedup over original")
    s = report.settings
    fig.suptitle(f"{report.backend} ({s['device']}), prompt {s['prompt_len']}, {s['new_tokens']} new tokens",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# The library entry point


def _is_weight_quantized(onnx_dir) -> bool:
    import json

    p = Path(onnx_dir) / "export.json"
    return p.is_file() and json.loads(p.read_text()).get("precision") in ("int4", "int8")


def _check_backend(backend: str, device: str) -> None:
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


def _prepare(name: str, path: str, backend: str, work: Path, optimize: bool, precision: str, batch_sizes,
             prompt_len: int, new_tokens: int, onnx_dir=None) -> str:  # fmt: skip
    """The artifact a backend runs: the checkpoint itself (torch), an ONNX export (given, or made here), or a
    TensorRT engine built from it."""
    if backend == "torch":
        return path
    onnx_dir = Path(onnx_dir or path)
    if not (onnx_dir / "model.onnx").is_file():
        from shortened.exporters.onnx import export_onnx

        onnx_dir = work / f"{name}-onnx"
        log.info("exporting %s to ONNX (%s)", name, onnx_dir)
        optimize = optimize and backend == "onnxruntime"  # the fused graph holds onnxruntime-only ops
        export_onnx(path, onnx_dir, precision=precision, cache=True, optimize=optimize, force=True, progress=False)
    if backend == "onnxruntime":
        return str(onnx_dir)
    from shortened.exporters.tensorrt import export_tensorrt

    engine_dir = work / f"{name}-trt"
    seq_max = prompt_len + new_tokens
    export_tensorrt(onnx_dir, engine_dir, batch=(1, min(8, max(batch_sizes)), max(batch_sizes)),
                    seq=(1, prompt_len, seq_max), precision=precision)  # fmt: skip
    return str(engine_dir)


def bench(
    original: str,
    candidate: str,
    backend: str = "torch",
    batch_sizes=(1, 8, 32),
    prompt_len: int = 128,
    new_tokens: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    width_baseline: bool | str = False,
    device: str = "cpu",
    threads: int | None = None,
    precision: str = "fp32",
    optimize: bool = False,
    seed: int = 0,
    onnx_dirs: dict | None = None,
    work_dir: str | Path | None = None,
    report: str | Path | None = None,
    plot: str | Path | None = None,
    progress: bool = True,
    ci_target: float | None = 0.03,
    time_budget_s: float = 120.0,
    max_repeats: int | None = None,
    extra_candidates: dict | None = None,
) -> SpeedReport:
    """Measure the candidate (and a width-pruned baseline of the same size) against the original.

    original, candidate: checkpoint directories (ONNX directories also work for the onnxruntime backend).
    width_baseline: True builds one (`shortened.converter.width.width_prune`) matched to the candidate's
    parameter count; a path uses that checkpoint. onnx_dirs: ONNX exports already made, by model name
    ("original", "candidate", "width"), used by the onnxruntime/tensorrt backends instead of exporting.
    Artifacts made here (width checkpoint, ONNX exports, engines) go to `work_dir` (a temporary directory,
    removed afterwards, when not given). repeats is the minimum: repetitions go on until every speedup's 95%
    bootstrap interval is within +-ci_target (None: exactly `repeats`), max_repeats, or time_budget_s per batch size.
    extra_candidates: {name: ONNX dir} of other exports of the candidate (e.g. its int4 export), measured in the same
    interleaved run (onnxruntime backend); weight-only quantized ones get no FLOP ideal (it does not apply).
    """
    from shortened.model.cost import count_params_of_config

    _check_backend(backend, device)
    bs = sorted({int(b) for b in batch_sizes})
    if not bs or bs[0] < 1:
        raise UsageError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if prompt_len < 1 or new_tokens < 2 or repeats < 1 or warmup < 0:
        raise UsageError("need prompt_len >= 1, new_tokens >= 2, repeats >= 1 and warmup >= 0")
    paths = {"original": str(original), "candidate": str(candidate)}
    onnx = {"original": None, "candidate": None, "width": None, **(onnx_dirs or {})}
    unknown = set(onnx) - {"original", "candidate", "width"}
    if unknown:
        raise UsageError(f"onnx_dirs names must be original, candidate or width; got {sorted(unknown)}")
    for name, d in onnx.items():
        if d is not None and name in paths:
            from shortened.model.families import num_blocks

            have, want = num_blocks(_config(d)), num_blocks(_config(paths[name]))
            if have != want:
                raise UsageError(f"the ONNX export {d} has {have} blocks but the {name} checkpoint has {want}; "
                                 "pass the export of that checkpoint")  # fmt: skip
    configs = {k: _config(v) for k, v in paths.items()}  # bad paths fail here, before any work
    from shortened.model.loading import check_length

    for name, cfg in configs.items():
        check_length(cfg, prompt_len + new_tokens, f"--prompt-len + --new-tokens for the {name} model:")
    from shortened.io import check_output_file

    inputs = {
        "original": original,
        "candidate": candidate,
        "width baseline": width_baseline if isinstance(width_baseline, (str, Path)) else None,
        "ONNX export": list(filter(None, onnx.values())),
    }
    for p in (report, plot):
        if p is not None:
            check_output_file(p, force=True, inputs=inputs)  # before any work; rewrites only our own reports
    if work_dir is not None:
        from shortened.io import check_no_overlap, real_path

        check_no_overlap(real_path(work_dir), inputs)  # exports and the width baseline are written there
    if isinstance(width_baseline, (str, Path)):
        paths["width"] = str(width_baseline)
        configs["width"] = _config(paths["width"])
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="shortened-bench-")
        work = Path(tmp.name)
    else:
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
    try:
        if width_baseline is True:
            from shortened.converter.width import width_prune

            out = work / "width"
            target = count_params_of_config(configs["candidate"])
            width_prune(paths["original"], target, out, force=True)
            paths["width"], configs["width"] = str(out), _config(str(out))
        specs = [
            ModelSpec(
                name,
                _prepare(name, p, backend, work, optimize, precision, bs, prompt_len, new_tokens, onnx[name]),
                backend,
                device,
                threads,
                config_path=p,
            )  # fmt: skip
            for name, p in paths.items()
        ]
        for name, d in (extra_candidates or {}).items():
            if backend != "onnxruntime":
                raise UsageError("extra candidates (other precisions of the export) run on the onnxruntime backend")
            specs.append(ModelSpec(name, str(d), backend, device, threads, config_path=paths["candidate"]))
            configs[name] = configs["candidate"]
        raw = measure(specs, bs, prompt_len, new_tokens, repeats, warmup, seed, progress, ci_target, time_budget_s,
                      max_repeats, baseline="original")  # fmt: skip
    finally:
        if tmp is not None:
            tmp.cleanup()
    decode_ctx = prompt_len + new_tokens // 2  # the average context a decode step attends to
    from shortened.model.families import num_blocks

    for name, info in raw["models"].items():
        cfg = configs[name]
        info.update({"params": count_params_of_config(cfg), "blocks": num_blocks(cfg),
                     "flops_per_token": flops_per_token(cfg, decode_ctx)["total"]})  # fmt: skip
        quantized = name in (extra_candidates or {}) and _is_weight_quantized(info["path"])
        if name != "original" and not quantized:
            info["ideal_decode_speedup"] = ideal_speedup(configs["original"], cfg, decode_ctx)
            info["ideal_speedup_weights_only"] = ideal_speedup(configs["original"], cfg, 0)
            info["ideal_prefill_speedup"] = ideal_speedup(configs["original"], cfg, prompt_len // 2)
    settings = dict(device=device, batch_sizes=bs, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats,
                    warmup=warmup, threads=threads or os.cpu_count(), precision=precision, optimize=optimize,
                    seed=seed, decode_context_for_ideal=decode_ctx, load_average=raw["load_average"],
                    cpu_count=os.cpu_count(), ci_target=ci_target, time_budget_s=time_budget_s,
                    repetitions=raw["repetitions"], cores=pinned_cores(threads))  # fmt: skip
    rows = build_rows(raw["runs"])
    flag_above_ideal(rows, raw["models"])
    rep = SpeedReport(backend, settings, raw["models"], rows, raw["skipped"])
    if report is not None:
        from shortened.io import write_output_json

        write_output_json(report, rep.to_dict(), inputs=inputs)
    if plot is not None:
        from shortened.io import atomic_file

        with atomic_file(plot, True, inputs) as tmp:
            rep.plot(tmp)
    return rep
