"""Speed: prefill latency, per-token decode latency, tokens/s and peak memory of an original model and its
pruned candidate (and optionally a width-pruned baseline of the same size), with the ideal speedup beside it.

How the measurement stays honest on a noisy machine:
- every model runs in its own worker process: its own threads, and its own peak memory (resident set on CPU,
  allocated device memory on GPU), so the two models never share a number;
- warm-up runs first; then the models take turns (A B A B ..., the starting model rotating each repetition), so
  a slow drift of the machine hits all of them alike, and only one model computes at a time;
- onnxruntime sessions run with thread spinning off, so idle workers do not burn the cores the active one needs;
- medians and p90 over repetitions; speedups are computed pair by pair (A_i / B_i within repetition i) and then
  summarized, never as a ratio of two medians.

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

from ..errors import UsageError

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt")
# what a worker can measure: a Runner of a backend in the shared greedy loop, Hugging Face `generate` (eager
# PyTorch, the user's everyday baseline), or onnxruntime-genai's own runtime on a model-builder directory
KINDS = BACKENDS + ("hf-generate", "genai")


# ---------------------------------------------------------------------------------------------
# The ideal speedup: per-token forward FLOPs from the config (2 FLOPs per multiply-add)


def _shape(config) -> dict:
    from ..converter.families import num_blocks

    if config.model_type == "gpt2":
        h, heads = config.n_embd, config.n_head
        return dict(layers=num_blocks(config), hidden=h, heads=heads, kv=heads, head_dim=h // heads,
                    inter=config.n_inner or 4 * h, gated=False, vocab=config.vocab_size)  # fmt: skip
    heads = config.num_attention_heads
    return dict(
        layers=num_blocks(config),
        hidden=config.hidden_size,
        heads=heads,
        kv=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        inter=config.intermediate_size,
        gated=True,  # every supported family but GPT-2 has a gated MLP (gate, up, down)
        vocab=config.vocab_size,
    )


def flops_per_token(config, context: int = 0) -> dict:
    """Forward FLOPs of one token, from the config. With h hidden, nh query heads, nkv key/value heads, hd head
    size, I MLP width, V vocabulary, L blocks, and c the context length the token attends to:

        attention projections per block  2 * h * hd * (2*nh + 2*nkv)     (Q and O: nh heads; K and V: nkv heads)
        MLP per block                    2 * k * h * I                    (k = 3 gated: gate, up, down; else 2)
        attention scores per block       2 * 2 * nh * hd * c              (Q.K^T and P.V; only when context > 0)
        head                             2 * h * V
        total                            L * (projections + MLP + scores) + head

    Embedding lookups, norms, activations, rotary and biases are left out (a few per cent at most).
    """
    s = _shape(config)
    h, hd = s["hidden"], s["head_dim"]
    proj = 2 * h * hd * (2 * s["heads"] + 2 * s["kv"])
    mlp = 2 * (3 if s["gated"] else 2) * h * s["inter"]
    scores = 2 * 2 * s["heads"] * hd * int(context)
    block = proj + mlp + scores
    head = 2 * h * s["vocab"]
    return {"attention_projections": proj, "mlp": mlp, "attention_scores": scores, "block": block,
            "blocks": s["layers"] * block, "head": head, "total": s["layers"] * block + head,
            "layers": s["layers"], "context": int(context)}  # fmt: skip


def _config(model):
    if hasattr(model, "model_type"):
        return model
    from ..converter.loading import load_config

    return load_config(str(model))


def ideal_speedup(original, candidate, context: int = 0) -> float:
    """FLOPs(original) / FLOPs(candidate) per token; configs, or model directories to read them from."""
    return flops_per_token(_config(original), context)["total"] / flops_per_token(_config(candidate), context)["total"]


# ---------------------------------------------------------------------------------------------
# Statistics


def summarize(values) -> dict:
    """Median, p10 and p90 (linear interpolation) and count of a list of numbers."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {"median": None, "p10": None, "p90": None, "n": 0}
    return {"median": float(np.median(v)), "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90)),
            "n": int(v.size)}  # fmt: skip


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


def _make_runner(spec: ModelSpec):
    threads = spec.threads or os.cpu_count()
    if spec.kind == "torch":
        import torch

        from ..converter.loading import LoadOptions
        from .runners.torch_runner import load_torch_runner

        torch.set_num_threads(threads)
        return load_torch_runner(spec.path, LoadOptions(device=spec.device))
    if spec.kind == "onnxruntime":
        from .runners.onnxruntime import load_ort_runner  # sessions with thread spinning off

        return load_ort_runner(spec.path, provider="cpu" if spec.device == "cpu" else "cuda", threads=threads)
    if spec.kind == "tensorrt":
        from .runners.tensorrt import TrtRunner, engine_path

        return TrtRunner(engine_path(spec.path), device=spec.device)
    raise UsageError(f"unknown backend {spec.kind!r}; choose one of {', '.join(KINDS)}")


class _RunnerMeasure:
    """A backend's Runner in the shared greedy loop: timings of every step."""

    def __init__(self, spec: ModelSpec):
        self.runner = _make_runner(spec)

    def run(self, input_ids: np.ndarray, new_tokens: int) -> tuple[float, list[float], list[int]]:
        from .runners.base import greedy_generate

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


def _kv_bytes(shape: dict, batch: int, length: int, bytes_per: int = 4) -> int:
    return 2 * shape["layers"] * batch * shape["kv"] * shape["head_dim"] * length * bytes_per


def _need_bytes(config, batch: int, prompt_len: int, new_tokens: int) -> int:
    """Rough working memory of one generation: KV cache, prompt logits, and activations (x4 slack)."""
    s = _shape(config)
    kv = _kv_bytes(s, batch, prompt_len + new_tokens)
    logits = batch * prompt_len * s["vocab"] * 4
    acts = batch * prompt_len * max(s["inter"], s["hidden"] * 4) * 4
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
) -> dict:
    """Run each spec in its own worker; warm up; then interleave the specs over `repeats` repetitions.

    Returns {"models": {name: info}, "runs": {batch: {name: [{"prefill_s", "decode_s"}, ...]}}, "skipped": [...]}.
    """
    from tqdm.auto import tqdm

    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UsageError(f"model names must differ: {names}")
    configs = {s.name: _config(s.config_path or s.path) for s in specs}
    vocab = min(_shape(c)["vocab"] for c in configs.values())
    workers = {s.name: _Worker(s) for s in specs}
    models, runs, skipped, load, tokens = {}, {}, [], {}, {}
    try:
        for name, w in workers.items():
            r = w.recv()
            if not r["ok"]:
                raise UsageError(f"cannot load {name} ({w.spec.path}) for {w.spec.kind}: {r['error']}")
            models[name] = {"path": w.spec.path, "kind": w.spec.kind, "device": w.spec.device,
                            "providers": r["providers"], "load_s": r["load_s"]}  # fmt: skip
        rng = np.random.default_rng(seed)
        total = len(batch_sizes) * (warmup + repeats) * len(specs)
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
            for rep in range(warmup + repeats):
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
            if failed:
                del runs[b]
                skipped.append({"batch": b, "reason": f"failed ({failed}); likely does not fit memory"})
                bar.update((i + 1) * (warmup + repeats) * len(specs) - bar.n)
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
    return {"models": models, "runs": runs, "skipped": skipped, "load_average": load, "tokens": tokens}


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
        lines = [
            f"backend {self.backend} on {s['device']}, prompt {s['prompt_len']}, {s['new_tokens']} new tokens, "
            f"{s['repeats']} interleaved repetitions after {s['warmup']} warm-up; median (p90); "
            "speedups pair by pair against the original",
            f"load average (1, 5, 15 min) before {s.get('load_average', {}).get('before')}, after "
            f"{s.get('load_average', {}).get('after')} on {s.get('cpu_count')} CPUs (a busy machine slows all models)",
            "",
            "| batch | model | blocks | params (M) | prefill ms | decode ms/token | tokens/s | decode speedup "
            "| ideal | of ideal | prefill speedup |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in self.rows:
            m = self.models[r["model"]]
            sp, pp = r["decode_speedup"], r["prefill_speedup"]
            ideal = m.get("ideal_decode_speedup")
            of_ideal = f"{sp['median'] / ideal:.2f}" if sp["median"] and ideal else "-"
            params = f"{m['params'] / 1e6:.1f}" if m.get("params") else "-"
            lines.append(
                f"| {r['batch']} | {r['model']} | {m.get('blocks', '-')} | {params} | {_fmt(r['prefill_ms'])} "
                f"| {_fmt(r['decode_ms_per_token'], 2)} | {_fmt(r['tokens_per_s'])} | {_fmt(sp, 3, 'x')} "
                f"| {f'{ideal:.3f}x' if ideal else '-'} | {of_ideal} | {_fmt(pp, 3, 'x')} |"
            )
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
            row["decode_speedup"] = summarize(row.get("decode_speedups", []))
            row["prefill_speedup"] = summarize(row.get("prefill_speedups", []))
            rows.append(row)
    return rows


def plot_speed(report: SpeedReport, path: str | Path) -> Path | None:
    """Decode tokens/s and decode speedup (with each model's ideal, dashed) against batch size."""
    from ..plots import _plt

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
            ax2.plot(bs, [r["decode_speedup"]["median"] for r in rows], "o-", color=c, label=label)
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
            from ..exporters.tensorrt import tensorrt_unavailable_reason
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
        from ..exporters.onnx import export_onnx

        onnx_dir = work / f"{name}-onnx"
        log.info("exporting %s to ONNX (%s)", name, onnx_dir)
        optimize = optimize and backend == "onnxruntime"  # the fused graph holds onnxruntime-only ops
        export_onnx(path, onnx_dir, precision=precision, cache=True, optimize=optimize, force=True, progress=False)
    if backend == "onnxruntime":
        return str(onnx_dir)
    from ..exporters.tensorrt import export_tensorrt

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
) -> SpeedReport:
    """Measure the candidate (and a width-pruned baseline of the same size) against the original.

    original, candidate: checkpoint directories (ONNX directories also work for the onnxruntime backend).
    width_baseline: True builds one (`shortened.converter.width.width_prune`) matched to the candidate's
    parameter count; a path uses that checkpoint. onnx_dirs: ONNX exports already made, by model name
    ("original", "candidate", "width"), used by the onnxruntime/tensorrt backends instead of exporting.
    Artifacts made here (width checkpoint, ONNX exports, engines) go to `work_dir` (a temporary directory,
    removed afterwards, when not given).
    """
    from ..converter.width import count_params_of_config

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
            from ..converter.families import num_blocks

            have, want = num_blocks(_config(d)), num_blocks(_config(paths[name]))
            if have != want:
                raise UsageError(f"the ONNX export {d} has {have} blocks but the {name} checkpoint has {want}; "
                                 "pass the export of that checkpoint")  # fmt: skip
    configs = {k: _config(v) for k, v in paths.items()}  # bad paths fail here, before any work
    from ..converter.loading import check_length

    for name, cfg in configs.items():
        check_length(cfg, prompt_len + new_tokens, f"--prompt-len + --new-tokens for the {name} model:")
    from ..io import check_output_file

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
        from ..io import check_no_overlap, real_path

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
            from ..converter.width import width_prune

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
        raw = measure(specs, bs, prompt_len, new_tokens, repeats, warmup, seed, progress)
    finally:
        if tmp is not None:
            tmp.cleanup()
    decode_ctx = prompt_len + new_tokens // 2  # the average context a decode step attends to
    from ..converter.families import num_blocks

    for name, info in raw["models"].items():
        cfg = configs[name]
        info.update({"params": count_params_of_config(cfg), "blocks": num_blocks(cfg),
                     "flops_per_token": flops_per_token(cfg, decode_ctx)["total"]})  # fmt: skip
        if name != "original":
            info["ideal_decode_speedup"] = ideal_speedup(configs["original"], cfg, decode_ctx)
            info["ideal_speedup_weights_only"] = ideal_speedup(configs["original"], cfg, 0)
            info["ideal_prefill_speedup"] = ideal_speedup(configs["original"], cfg, prompt_len // 2)
    settings = dict(device=device, batch_sizes=bs, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats,
                    warmup=warmup, threads=threads or os.cpu_count(), precision=precision, optimize=optimize,
                    seed=seed, decode_context_for_ideal=decode_ctx, load_average=raw["load_average"],
                    cpu_count=os.cpu_count())  # fmt: skip
    rep = SpeedReport(backend, settings, raw["models"], build_rows(raw["runs"]), raw["skipped"])
    if report is not None:
        from ..io import write_output_json

        write_output_json(report, rep.to_dict(), inputs=inputs)
    if plot is not None:
        from ..io import atomic_file

        with atomic_file(plot, True, inputs) as tmp:
            rep.plot(tmp)
    return rep
