"""Timing several models fairly: each in its own worker process, taking turns, repeated until the speedups are
resolved. What keeps the measurement honest on a noisy machine:

- every model runs in its own worker process: its own threads, and its own peak memory (resident set on CPU,
  allocated device memory on GPU), so the models never share a number;
- warm-up runs first; then the models take turns (A B A B ..., the starting model rotating each repetition), so
  a slow drift of the machine hits all of them alike, and only one model computes at a time;
- onnxruntime sessions run with thread spinning off, so idle workers do not burn the cores the active one needs;
- repetitions continue until the 95% bootstrap interval (over the paired repetitions) of every decode speedup is
  narrower than +-ci_target or the time budget is spent;
- every worker runs with the same number of intra-op threads (SpeedOptions.threads), pinned to the same cores, on
  the same device; every model gets the same prompt tokens;
- a batch size whose rough working memory exceeds what is free is skipped before it is tried.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from shortened.errors import UsageError
from shortened.model.cost import _config
from shortened.model.families import geometry
from shortened.model.loading import LoadOptions
from shortened.options import check, option
from shortened.runtime.base import timed_generate
from shortened.runtime.genai import load_genai
from shortened.runtime.hf_generate import load_hf_generate
from shortened.runtime.onnxruntime import load_ort_runner
from shortened.runtime.tensorrt import TrtRunner, engine_path
from shortened.runtime.torch_runner import load_torch_runner
from shortened.validators.stats import resolved

BACKENDS = ("torch", "onnxruntime", "tensorrt")
# what a worker can measure: a Runner of a backend in the shared greedy loop, Hugging Face `generate` (eager
# PyTorch, the user's everyday baseline), or onnxruntime-genai's own runtime on a model-builder directory
KINDS = BACKENDS + ("hf-generate", "genai")
PRECISIONS = ("fp32", "fp16", "bf16", "int4", "int8")


@dataclass
class SpeedOptions:
    """How the speed is measured; the same for every model of one run. Validated once, when made: types, choices
    and minimums (shortened.options.check), and batch sizes made sorted, distinct and positive."""

    batch_sizes: list[int] = option(default_factory=lambda: [1, 8, 32], help="batch sizes, each measured apart")
    prompt_len: int = option(128, "prompt tokens", min=1)
    new_tokens: int = option(32, "generated tokens per run (the first comes from the prompt step)", min=2)
    repeats: int = option(5, "interleaved repetitions per batch size, at least", min=1)
    warmup: int = option(1, "warm-up runs per model and batch size", min=0)
    device: str = option("cpu", "cpu or cuda[:N]")
    threads: int | None = option(None, "intra-op threads per model (default and 0: all cores)", min=0)
    precision: str = option("fp32", "precision of the ONNX exports and engines made for the run", choices=PRECISIONS)
    seed: int = option(0, "seed of the random prompt tokens")
    ci_target: float | None = option(0.03, "repeat until every speedup's 95% interval is within +-this (0 or "
                                     "None: exactly `repeats`)", min=0)  # fmt: skip
    time_budget_s: float = option(120.0, "stop repeating after this many seconds per batch size", min=0,
                                  flag="--time-budget")  # fmt: skip
    max_repeats: int | None = option(None, "at most this many repetitions (default and 0: 10 x repeats)", min=0)

    def __post_init__(self):
        check(self, "speed setting")
        self.ci_target = self.ci_target or None  # 0: exactly `repeats`, as on the command line
        bs = sorted(set(self.batch_sizes))
        if not bs or bs[0] < 1:
            raise UsageError(f"batch sizes must be positive integers, got {list(self.batch_sizes)}")
        self.batch_sizes = bs


@dataclass
class ModelSpec:
    name: str  # label in the report: original, candidate, width, ...
    path: str  # checkpoint dir (torch, hf-generate), ONNX dir (onnxruntime, genai), engine dir (tensorrt)
    kind: str = "torch"  # one of KINDS
    config_path: str | None = None  # where config.json is (for FLOPs and vocabulary), when not in `path`


# ---------------------------------------------------------------------------------------------
# The worker: one model in one process


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


def load_for_timing(spec: ModelSpec, options: SpeedOptions):
    """The spec's model as a Runner (torch, onnxruntime, tensorrt) or a TimedGenerator (hf-generate, genai)."""
    threads = options.threads or os.cpu_count()
    device = options.device
    if spec.kind == "torch":
        import torch

        torch.set_num_threads(threads)
        return load_torch_runner(spec.path, LoadOptions(device=device))
    if spec.kind == "onnxruntime":  # sessions with thread spinning off
        return load_ort_runner(spec.path, provider="cpu" if device == "cpu" else "cuda", threads=threads)
    if spec.kind == "tensorrt":
        return TrtRunner(engine_path(spec.path), device=device)
    if spec.kind == "hf-generate":
        return load_hf_generate(spec.path, device, threads)
    if spec.kind == "genai":
        return load_genai(spec.path, threads)
    raise UsageError(f"unknown backend {spec.kind!r}; choose one of {', '.join(KINDS)}")


def _gpu_peak(kind: str, device: str):
    """Peak device memory allocated through torch: the whole model for torch, the I/O and cache buffers for
    TensorRT (its engine's own memory is not counted); onnxruntime's CUDA arena is not visible here (None)."""
    if device == "cpu" or kind not in ("torch", "hf-generate", "tensorrt"):
        return None
    try:
        import torch

        return int(torch.cuda.max_memory_allocated())
    except Exception:  # no torch CUDA in this worker
        return None


def _failure(e: BaseException) -> dict:
    return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def _worker(conn, spec: ModelSpec, options: SpeedOptions) -> None:
    """Load one model, then answer run requests until told to stop. Runs in its own process."""
    import warnings

    warnings.filterwarnings("ignore")
    base = _rss()
    cores = pinned_cores(options.threads)
    if cores and hasattr(os, "sched_setaffinity"):  # every model on the same cores, with as many threads
        os.sched_setaffinity(0, cores)
    t0 = time.perf_counter()
    try:
        model = load_for_timing(spec, options)
    except BaseException as e:  # report and quit: the parent turns it into one line
        conn.send(_failure(e))
        return
    with model:  # close() runs however this ends
        try:
            hello = {"ok": True, "load_s": time.perf_counter() - t0, "providers": model.providers(),
                     "baseline_rss": base, "loaded_rss": _rss()}  # fmt: skip
        except BaseException as e:
            conn.send(_failure(e))
            return
        conn.send(hello)
        run_rss = _serve(conn, model)
        conn.send({"peak_rss": _peak_rss(), "run_rss": run_rss, "baseline_rss": base,
                   "gpu_peak": _gpu_peak(spec.kind, options.device)})  # fmt: skip


def _serve(conn, model) -> int:
    """Answer run requests until None comes; returns the largest resident set seen right after a run."""
    run_rss = 0
    while (cmd := conn.recv()) is not None:
        try:
            t = timed_generate(model, cmd["input_ids"], cmd["new_tokens"])
            run_rss = max(run_rss, _rss())
            conn.send({"ok": True, "prefill_s": t.prefill_s, "decode_s": t.decode_s, "tokens": t.tokens})
        except BaseException as e:  # out of memory and friends: this batch size is skipped
            conn.send(_failure(e))
    return run_rss


def _context():
    """Workers fork from a fork server that has imported torch and transformers once (and started no threads):
    fresh processes, without paying the imports again for every model."""
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "transformers.modeling_utils", "shortened.validators.timing"])
    return ctx


class _Worker:
    def __init__(self, spec: ModelSpec, options: SpeedOptions):
        ctx = _context()
        self.spec, self.device = spec, options.device
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, spec, options), daemon=True)
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
# Memory: skip a batch size that cannot fit


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


def _does_not_fit(configs: dict, batch: int, options: SpeedOptions) -> str | None:
    """Why this batch size is skipped (the largest model's working memory above what is free), or None."""
    need = max(_need_bytes(c, batch, options.prompt_len, options.new_tokens) for c in configs.values())
    avail = _available_bytes(options.device)
    if need > avail:
        return f"needs about {need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
    return None


# ---------------------------------------------------------------------------------------------
# Interleaved measurement


def measure(specs: list[ModelSpec], options: SpeedOptions, baseline: str | None = None, progress: bool = True) -> dict:
    """Run each spec in its own worker; warm up; then interleave the specs over at least `options.repeats`
    repetitions per batch size.

    options.ci_target: keep repeating (up to max_repeats, default 10 x repeats, and time_budget_s per batch size)
    until the bootstrap interval of every decode speedup over `baseline` (default: the first spec) is within
    +-ci_target (relative); None: exactly `repeats`. Returns {"models": {name: info}, "runs": {batch: {name:
    [{"prefill_s", "decode_s"}, ...]}}, "skipped": [...], "repetitions": {batch: {"n", "resolved", "seconds"}},
    "tokens": {batch: {name: greedy tokens of the first row}}, "load_average": {"before", "after"}}.
    """
    from tqdm.auto import tqdm

    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UsageError(f"model names must differ: {names}")
    configs = {s.name: _config(s.config_path or s.path) for s in specs}
    vocab = min(geometry(c).vocab for c in configs.values())
    baseline = baseline or names[0]
    o = options
    per_batch = (o.warmup + o.repeats) * len(specs)  # runs per batch size at least; adaptive rounds add more
    workers = {s.name: _Worker(s, o) for s in specs}
    models, runs, skipped, load, tokens, reps_info = {}, {}, [], {}, {}, {}
    try:
        models = _loaded(workers)
        rng = np.random.default_rng(o.seed)
        bar = tqdm(total=len(o.batch_sizes) * per_batch, desc="speed", disable=not progress, file=sys.stderr)
        load_before = os.getloadavg()
        for i, b in enumerate(o.batch_sizes):
            why = _does_not_fit(configs, b, o)
            if why:
                skipped.append({"batch": b, "reason": why})
                bar.update(per_batch)
                continue
            ids = rng.integers(3, vocab, size=(b, o.prompt_len), dtype=np.int64)
            runs[b], toks, failed, reps_info[b] = _measure_batch(workers, ids, o, baseline, bar)
            if toks:
                tokens[b] = toks
            if failed:
                del runs[b]
                skipped.append({"batch": b, "reason": f"failed ({failed}); likely does not fit memory"})
                bar.update(max(0, (i + 1) * per_batch - bar.n))
        bar.close()
        load = {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]}
    finally:
        _stop(workers, models)
    return {"models": models, "runs": runs, "skipped": skipped, "load_average": load, "tokens": tokens,
            "repetitions": reps_info}  # fmt: skip


def _loaded(workers: dict) -> dict:
    """Wait for every worker's model; the first that fails to load is one UsageError."""
    models = {}
    for name, w in workers.items():
        r = w.recv()
        if not r["ok"]:
            raise UsageError(f"cannot load {name} ({w.spec.path}) for {w.spec.kind}: {r['error']}")
        models[name] = {"path": w.spec.path, "kind": w.spec.kind, "device": w.device,
                        "providers": r["providers"], "load_s": r["load_s"]}  # fmt: skip
    return models


def _measure_batch(workers: dict, ids, o: SpeedOptions, baseline: str, bar):
    """Warm-up rounds, then rounds until done (see measure). Returns (runs {name: [...]}, greedy tokens {name:
    [...]}, the failure that ended it or None, {"n", "seconds", "resolved"})."""
    names = list(workers)
    max_repeats = max(o.repeats, o.max_repeats or 10 * o.repeats) if o.ci_target else o.repeats
    runs, tokens, failed = {n: [] for n in names}, {}, None
    t_batch, rep = time.perf_counter(), -1
    while True:
        rep += 1
        done = rep - o.warmup  # measured repetitions so far
        if done >= o.repeats and (
            done >= max_repeats
            or not o.ci_target
            or resolved(runs, baseline, o.ci_target)
            or time.perf_counter() - t_batch > o.time_budget_s
        ):
            break
        if done >= o.repeats:
            bar.total += len(names)
        failed = _round(workers, rep, ids, o.new_tokens, rep >= o.warmup, runs, tokens, bar)
        if failed:
            break
    info = {
        "n": len(runs[baseline]),
        "seconds": round(time.perf_counter() - t_batch, 1),
        "resolved": bool(o.ci_target) and not failed and resolved(runs, baseline, o.ci_target),
    }
    return runs, tokens, failed, info


def _round(workers: dict, rep: int, ids, new_tokens: int, keep: bool, runs: dict, tokens: dict, bar) -> str | None:
    """One repetition: every model once, the first rotating with `rep`. Returns the failure that stopped it."""
    names = list(workers)
    k = rep % len(names)
    for name in names[k:] + names[:k]:  # rotate who goes first
        r = workers[name].run(ids, new_tokens)
        bar.update(1)
        if not r["ok"]:
            return f"{name}: {r['error']}"
        if keep:
            runs[name].append({"prefill_s": r["prefill_s"], "decode_s": r["decode_s"]})
        tokens[name] = r["tokens"]  # greedy tokens of the first row
    return None


def _stop(workers: dict, models: dict) -> None:
    """Stop every worker; its memory numbers go into its model's entry."""
    for name, w in workers.items():
        mem = w.stop()
        if name in models:
            models[name].update({
                "peak_rss_mb": _mb(mem.get("peak_rss")),
                "run_rss_mb": _mb(mem.get("run_rss")),
                "baseline_rss_mb": _mb(mem.get("baseline_rss")),
                "gpu_peak_mb": _mb(mem.get("gpu_peak")),
            })  # fmt: skip


def _mb(x):
    return None if x is None else round(x / 2**20, 1)
