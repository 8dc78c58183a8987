"""`make gpu-check`: what can only be checked on a CUDA GPU, in one command, in under 8 minutes, with no download.

  1. convert   the whole `shortened convert` on SmolLM2 with --device cuda --dtype bfloat16 (PyTorch on the GPU,
               its speed step too; ONNX parity on whatever execution providers onnxruntime has there); skipped
               without the model or onnxruntime, saying so
  2. speed     random-weight LLaMA-2-7B and LLaMA-3-8B shaped models in bf16 built from their configs (decode
               speed does not depend on the weight values): the original, depth-pruned by 20% and 35% of the
               blocks, and width-pruned (narrower MLP and fewer head groups, converter/width.plan_width) to the
               same parameter counts; per-token decode latency and throughput at batch 1, 4, 16, 64, prompt 128,
               128 new tokens, with a static KV cache and the decode step captured in a CUDA graph (eager where the
               capture fails, and the row says so)
  3. report    gpu_check.json, gpu_check.md (one table: ms/token and tokens/s as median [p10-p90] over the
               repetitions, speedup over the original and its ideal from per-token FLOPs) and gpu_check.png (like
               the paper's latency / throughput figures); GPU, driver, torch and transformers versions on top

It needs only python with torch (CUDA), transformers 5.x and numpy, and the repo on PYTHONPATH (no virtual
environment of ours); what is absent (the model, onnxruntime, matplotlib, TensorRT) is skipped and said.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out out/gpu-check [--model DIR] [--skip-convert]
    PYTHONPATH=. python3 benchmarks/gpu_check.py --smoke --out /tmp/gc   # tiny configs on CPU, seconds (tests)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Hugging Face configs of the two models (meta-llama/Llama-2-7b-hf, meta-llama/Meta-Llama-3-8B), written out
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 rope_theta=10000.0)  # fmt: skip
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 rope_theta=500000.0)  # fmt: skip
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=256)  # fmt: skip
RATIOS = (0.20, 0.35)


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def environment() -> dict:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "transformers": transformers.__version__, "cuda_available": torch.cuda.is_available()}  # fmt: skip
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                           text=True)  # fmt: skip
        env["driver"] = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    for mod in ("onnxruntime", "tensorrt", "matplotlib"):
        env[mod] = None
        if importlib.util.find_spec(mod) is not None:
            try:
                m = __import__(mod)
                env[mod] = getattr(m, "__version__", "present")
                if mod == "onnxruntime":
                    env["onnxruntime_providers"] = m.get_available_providers()
            except Exception as e:  # a broken install: say so, do not stop
                env[mod] = f"import failed: {str(e).splitlines()[0]}"
    return env


# ---------------------------------------------------------------------------------------------
# 1. convert on SmolLM2


def run_convert(args, out: Path) -> dict:
    model = Path(args.model).expanduser()
    if not (model / "config.json").is_file():
        return {"status": "skipped", "reason": f"no SmolLM2 checkpoint at {model} (pass --model DIR; no download)"}
    if importlib.util.find_spec("onnxruntime") is None:
        return {"status": "skipped", "reason": "onnxruntime is not installed (pip install 'shortened[gpu]')"}
    shared = REPO.parent / "shared" / "data"
    calib = shared / "text" / "corpus_en.txt"
    text = calib if calib.is_file() else REPO / "README.md"  # no download: a text that is there
    evalt = shared / "wikitext2" / "test.raw.txt"
    evalt = evalt if evalt.is_file() else text
    cmd = [sys.executable, "-m", "shortened", "convert", "--config", str(REPO / "examples" / "smollm2.toml"),
           "--model", str(model), "--out", str(out / "convert"), "--calib", str(text), "--eval-text", str(evalt),
           "--device", "cuda", "--dtype", "bfloat16", "--speed-backend", "torch", "--batch-sizes", "1,8,32",
           "--force", "--quiet"]  # fmt: skip
    log("convert: " + " ".join(cmd[2:]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.convert_timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": args.convert_timeout, "command": cmd[2:]}
    res = {"status": "ok" if r.returncode == 0 else f"exit {r.returncode}", "seconds": round(time.time() - t0, 1),
           "command": cmd[2:], "calibration_text": str(text), "eval_text": str(evalt),
           "output_tail": (r.stdout + r.stderr)[-3000:]}  # fmt: skip
    manifest = out / "convert" / "manifest.json"
    if manifest.is_file():
        res["manifest"] = str(manifest)
    return res


# ---------------------------------------------------------------------------------------------
# 2. decode speed of depth- and width-pruned shapes


def variants(base: dict, smoke: bool) -> dict:
    """{name: config}: the original, depth-pruned by each ratio, width-pruned to each depth variant's count."""
    from transformers import LlamaConfig

    from shortened.converter.width import plan_width
    from shortened.model.cost import count_params_of_config
    from shortened.model.families import geometry

    orig = LlamaConfig(**base, tie_word_embeddings=False)
    out = {"original": orig}
    n = geometry(orig).layers
    for r in RATIOS:
        depth = LlamaConfig(**{**base, "num_hidden_layers": n - round(r * n)}, tie_word_embeddings=False)
        out[f"depth-{round(r * 100)}%"] = depth
        out[f"width-{round(r * 100)}%"] = plan_width(orig, count_params_of_config(depth), multiple_of=1 if smoke
                                                     else 64)["config"]  # fmt: skip
    return out


def build(config, device: str, dtype):
    """A random-weight model of the config, built on the device (the speed is that of the shapes)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def rewind(cache, length: int) -> None:
    """Back to `length` cached tokens: transformers 5.x static layers count their length in a tensor that the
    decode step advances in place (what keeps the step capturable); older ones take cache_position alone."""
    for layer in getattr(cache, "layers", []):
        n = getattr(layer, "cumulative_length", None)
        if isinstance(n, __import__("torch").Tensor):
            n.fill_(length)


def decode_times(model, batch: int, prompt: int, new: int, reps: int, device: str, graphs: bool) -> dict:
    """Seconds of `new` decode steps after a `prompt`-token prefill, `reps` times, static KV cache; the decode
    step replayed from a CUDA graph when `graphs` (eager if the capture fails: the reason is returned)."""
    import inspect

    import torch
    from transformers import StaticCache

    cfg = model.config
    cache = StaticCache(config=cfg, max_cache_len=prompt + new)
    # the cache keyword: `cache` in newer 5.x (past_key_values deprecated, removed in 5.40), past_key_values before
    params = inspect.signature(model.forward).parameters
    kv = "cache" if "cache" in params else "past_key_values"
    with_pos = "cache_position" in params  # older 5.x: the slots come from cache_position; newer: from the cache
    ids = torch.randint(3, cfg.vocab_size, (batch, prompt), device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        first = {"cache_position": torch.arange(prompt, device=device)} if with_pos else {}
        if "logits_to_keep" in params:
            first["logits_to_keep"] = 1  # batch 64 x 128 x 128k vocabulary would be 2 GB of prefill logits
        logits = model(input_ids=ids, use_cache=True, **first, **{kv: cache}).logits
        tok = logits[:, -1:].argmax(-1)
        pos = torch.tensor([prompt], device=device)
        pos_ids = pos.expand(batch, 1).clone()

        def step():
            step_pos = {"cache_position": pos} if with_pos else {}
            out = model(input_ids=tok, position_ids=pos_ids, use_cache=True, **step_pos, **{kv: cache})
            return out.logits[:, -1:].argmax(-1)

        mode, graph, nxt = "eager", None, None
        if graphs:
            try:
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(2):
                        step()
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    nxt = step()
                mode = "cuda-graph"
            except Exception as e:  # noqa: BLE001 - any capture failure: measure eager and say why
                graph, mode = None, f"eager (CUDA graph capture failed: {type(e).__name__}: {str(e).splitlines()[0]})"
                torch.cuda.synchronize()
        times = []
        for rep in range(reps + 1):  # the first round warms up and is not counted
            rewind(cache, prompt)
            sync()
            t0 = time.perf_counter()
            for t in range(prompt, prompt + new):
                pos.fill_(t)
                pos_ids.fill_(t)
                if graph is not None:
                    graph.replay()
                    tok.copy_(nxt)
                else:
                    tok = step()
            sync()
            if rep:
                times.append(time.perf_counter() - t0)
    return {"seconds": times, "mode": mode}


def run_speed(args, deadline: float) -> list[dict]:
    import torch

    from shortened.model.cost import count_params_of_config, flops_per_token
    from shortened.model.families import geometry
    from shortened.validators.stats import summarize

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    bases = {"tiny": TINY} if args.smoke else {"LLaMA-2-7B": LLAMA2_7B, "LLaMA-3-8B": LLAMA3_8B}
    ctx = args.prompt + args.new // 2  # the attention cost at the mean context of the decode steps
    rows = []
    for base_name, base in bases.items():
        cfgs = variants(base, args.smoke)
        flops0 = flops_per_token(cfgs["original"], ctx)["total"]
        for name, cfg in cfgs.items():
            g = geometry(cfg)
            info = {"base": base_name, "variant": name, "blocks": g.layers,
                    "params": count_params_of_config(cfg), "intermediate_size": g.intermediate, "kv_heads": g.kv_heads,
                    "ideal_speedup": round(flops0 / flops_per_token(cfg, ctx)["total"], 4)}  # fmt: skip
            if time.time() > deadline:
                rows += [{**info, "batch": b, "skipped": "over the time budget"} for b in args.batches]
                continue
            log(f"speed: {base_name} {name} ({info['blocks']} blocks, {info['params'] / 1e9:.2f} B params)")
            model = build(cfg, device, dtype)
            for b in args.batches:
                row = {**info, "batch": b}
                if time.time() > deadline:
                    rows.append({**row, "skipped": "over the time budget"})
                    continue
                try:
                    d = decode_times(model, b, args.prompt, args.new, args.reps, device, graphs=not args.smoke)
                    ms = [1000 * s / args.new for s in d["seconds"]]
                    tps = [b * args.new / s for s in d["seconds"]]
                    row.update(mode=d["mode"], ms_per_token=summarize(ms), tokens_per_s=summarize(tps),
                               _seconds=d["seconds"])  # fmt: skip
                except torch.OutOfMemoryError:
                    row["skipped"] = "out of GPU memory"
                    torch.cuda.empty_cache()
                rows.append(row)
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
    # speedup over the original of the same base and batch, repetition by repetition
    by_key = {(r["base"], r["batch"]): r for r in rows if r["variant"] == "original" and "_seconds" in r}
    for r in rows:
        ref = by_key.get((r["base"], r["batch"]))
        if ref and "_seconds" in r:
            r["speedup"] = summarize([a / b for a, b in zip(ref["_seconds"], r["_seconds"])])
    for r in rows:
        r.pop("_seconds", None)
    return rows


# ---------------------------------------------------------------------------------------------
# 3. the table and the figure


def _f(st, digits=1):
    if not st or st.get("median") is None:
        return "-"
    return f"{st['median']:.{digits}f} [{st['p10']:.{digits}f}-{st['p90']:.{digits}f}]"


def table(report: dict) -> str:
    env, s = report["environment"], report["settings"]
    lines = [f"# gpu-check {report['date']}", "",
             f"GPU {env.get('gpu', 'none')} (driver {env.get('driver')}), torch {env['torch']} (CUDA "
             f"{env['torch_cuda']}), transformers {env['transformers']}; {s['dtype']}, prompt {s['prompt']}, "
             f"{s['new']} new tokens, {s['reps']} repetitions: median [p10-p90]", ""]  # fmt: skip
    c = report["convert"]
    lines += [f"convert on SmolLM2 (cuda, bfloat16): {c['status']}" + (f" ({c.get('reason')})" if c.get("reason")
              else f" in {c.get('seconds')} s"), ""]  # fmt: skip
    lines += ["| model | variant | blocks | params (B) | batch | ms/token | tokens/s | speedup | ideal | mode |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["speed"]:
        tail = (f"| {_f(r.get('ms_per_token'), 2)} | {_f(r.get('tokens_per_s'), 0)} | {_f(r.get('speedup'), 2)} "
                f"| {r['ideal_speedup']:.2f} | {r.get('mode', r.get('skipped', ''))} |")  # fmt: skip
        lines.append(f"| {r['base']} | {r['variant']} | {r['blocks']} | {r['params'] / 1e9:.3f} | {r['batch']} " + tail)
    return "\n".join(lines) + "\n"


def figure(report: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    bases = list(dict.fromkeys(r["base"] for r in report["speed"]))
    fig, axes = plt.subplots(len(bases), 3, figsize=(14, 3.6 * len(bases)), squeeze=False)
    for row_axes, base in zip(axes, bases):
        rows = [r for r in report["speed"] if r["base"] == base and "ms_per_token" in r]
        for i, name in enumerate(dict.fromkeys(r["variant"] for r in rows)):
            rs = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["batch"])
            bs = [r["batch"] for r in rs]
            style = "-" if name.startswith(("depth", "original")) else "--"
            row_axes[0].plot(bs, [r["ms_per_token"]["median"] for r in rs], "o" + style, color=f"C{i}", label=name)
            row_axes[1].plot(bs, [r["tokens_per_s"]["median"] for r in rs], "o" + style, color=f"C{i}", label=name)
            if name != "original" and all("speedup" in r for r in rs):
                row_axes[2].plot(bs, [r["speedup"]["median"] for r in rs], "o" + style, color=f"C{i}", label=name)
                row_axes[2].axhline(rs[0]["ideal_speedup"], color=f"C{i}", ls=":", lw=0.9)
        for ax, ylabel in zip(row_axes, ("ms per token (decode)", "tokens/s", "speedup (dotted: ideal)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.set_ylabel(ylabel)
            ax.set_title(base, fontsize=9)
            ax.legend(fontsize=7)
    env = report["environment"]
    fig.suptitle(f"{env.get('gpu', 'CPU (smoke)')}, torch {env['torch']}, {report['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="out/gpu-check")
    p.add_argument("--model", default=os.path.join(os.environ.get("SHORTENED_CACHE", "~/.cache/shortened"),
                                                   "smollm2-135m-instruct"))  # fmt: skip
    p.add_argument("--skip-convert", action="store_true")
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=450, help="speed rows past this much wall time are skipped")
    p.add_argument("--convert-timeout", type=int, default=200)
    p.add_argument("--smoke", action="store_true", help="tiny configs on CPU: the code path, no measurement")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    t0 = time.time()
    import torch

    threads = torch.get_num_threads()
    if args.smoke:
        args.batches, args.prompt, args.new, args.reps = [1, 2], 8, 4, 2
        torch.set_num_threads(1)  # tiny ops: threads only contend
    try:
        return _run(args, t0)
    finally:
        torch.set_num_threads(threads)


def _run(args, t0: float) -> int:
    import torch

    env = environment()
    log(json.dumps(env))
    if not args.smoke and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is visible (torch.cuda.is_available() is False); --smoke runs the code on CPU",
              file=sys.stderr)  # fmt: skip
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke or args.skip_convert:
        conv = {"status": "skipped", "reason": "--smoke" if args.smoke else "--skip-convert"}
    else:
        conv = run_convert(args, out)
    log(f"convert: {conv['status']} {conv.get('reason', '')}")
    speed = run_speed(args, deadline=t0 + args.budget_s)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": env, "convert": conv,
              "settings": {"prompt": args.prompt, "new": args.new, "reps": args.reps, "batches": args.batches,
                           "dtype": "float32" if args.smoke else "bfloat16", "smoke": args.smoke},
              "speed": speed, "seconds": None}  # fmt: skip
    report["seconds"] = round(time.time() - t0, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(table(report))
    fig = figure(report, out / "gpu_check.png")
    print(table(report))
    if fig is None:
        log("matplotlib is not installed: no figure")
    log(f"done in {report['seconds']} s: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
