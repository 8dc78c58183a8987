"""Export a causal LM to ONNX with its KV cache, in Optimum's layout, ready for onnxruntime and onnxruntime-genai.

The default exporter traces a small wrapper with `torch.onnx.export(dynamo=True)`. The wrapper takes the cache as
flat tensors, so one graph serves the prefill (empty past, length 0) and every decode step:

    inputs   input_ids [batch_size, sequence_length]
             attention_mask [batch_size, past_sequence_length + sequence_length]
             position_ids [batch_size, sequence_length]
             past_key_values.{i}.key / .value [batch_size, num_key_value_heads, past_sequence_length, head_dim]
    outputs  logits [batch_size, sequence_length, vocab_size] (always float32)
             present.{i}.key / .value [batch_size, num_key_value_heads, past_sequence_length + sequence_length,
                                       head_dim]

The KV cache has the graph's precision (fp16 graphs take and return fp16 caches, as Optimum's and genai's do).
`cache=False` exports a plain logits model (input_ids, attention_mask, position_ids -> logits).

The output directory holds model.onnx (+ model.onnx.data, the weights), config.json, generation_config.json, the
tokenizer, genai_config.json (onnxruntime-genai) and export.json (how it was made).

`optimize=True` writes a graph for onnxruntime (CPU and CUDA providers; not TensorRT). LLaMA-like families (LLaMA,
Mistral, Qwen2, Qwen3) are traced through exporters/fused.py: one packed QKV MatMul and one GroupQueryAttention (RoPE
inside) per layer, RMSNorms fused, about 6x fewer nodes than the generic graph. Other families get
onnxscript's fusions on the generic graph. Either way the result is checked on a left-padded batch with decode steps
(against PyTorch, or against the unfused graph) and falls back to a plainer graph if it does not match.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shortened.errors import UsageError
from shortened.exporters.fused import FusedCausalLM, unsupported_reason
from shortened.exporters.layout import (
    DATA_FILE,
    MIN_EXTERNAL_BYTES,
    ONNX_FILE,
    RECORD_FILE,
    cache_geometry,
    kv_names,
    save_graph,
)
from shortened.exporters.ort_ops import translation_table
from shortened.exporters.quantize import (
    BITS,
    QUANTIZED,
    QuantOptions,
    WindowReader,
    calibration_windows,
    quant_options_for,
    quantize_proto,
)
from shortened.io import atomic_dir, check_output_dir, output_key, up_to_date, write_json
from shortened.model.checkpoint import make_config_portable
from shortened.model.families import geometry
from shortened.model.loading import Loaded, LoadOptions, load_config, load_model, torch_dtype
from shortened.options import check, option
from shortened.runtime.base import position_ids_from_mask
from shortened.versions import EXPORT_PACKAGES, versions

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
EXPORTERS = ("torch", "optimum")
MIN_OPSET = 18  # the dynamo exporter's floor
# Optimum's dim names
BATCH, SEQ, PAST = "batch_size", "sequence_length", "past_sequence_length"
TOTAL = f"{PAST} + {SEQ}"
ATTENTION_FUSIONS = ("fuse_sdpa", "fuse_gqa", "fuse_qkv_gqa", "fuse_mha1", "fuse_mha2", "fuse_mha_scale",
                     "fuse_mha_bias", "fuse_attention", "replace_sdpa_by_mha")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The traced wrapper


def _wrapper(model, cache: bool):
    import torch
    from transformers import DynamicCache

    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5.2x renamed it
    n_layers = cache_geometry(model.config)[0]

    class CausalLMWithFlatCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            kw = {}
            if cache:  # plain full-attention layers (no config): every layer keeps past + new, as Optimum's graphs
                pairs = [(past[2 * i], past[2 * i + 1]) for i in range(n_layers)]
                kw = {cache_kw: DynamicCache(ddp_cache_data=pairs), "use_cache": True}
            else:
                kw = {"use_cache": False}
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)
            if not cache:
                return out.logits.float()
            c = out.get("cache", None) or out.past_key_values
            return (out.logits.float(), *[t for layer in c.layers for t in (layer.keys, layer.values)])

    return CausalLMWithFlatCache().eval()


def _example_inputs(config, dtype, cache: bool):
    """Small example inputs (batch 2, 3 new tokens, 4 past) and shared named dynamic dims."""
    import torch
    from torch.export import Dim

    n_layers, _, kv, head_dim = cache_geometry(config)
    b, s, p = 2, 3, 4 if cache else 0
    ids = torch.randint(3, min(200, config.vocab_size), (b, s))
    mask = torch.ones(b, p + s, dtype=torch.long)
    pos = torch.arange(p, p + s)[None].repeat(b, 1)
    batch, seq = Dim(BATCH), Dim(SEQ)
    dims = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq}}
    past = []
    if cache:
        past = [torch.zeros(b, kv, p, head_dim, dtype=dtype) for _ in range(2 * n_layers)]
        # the mask length is past + seq; torch.export cannot say so, so it gets its own dim (renamed after export).
        # transformers' mask code guards mask length >= past + seq, whose smallest traced value is 2 + 2.
        dims["attention_mask"] = {0: batch, 1: Dim("attention_length", min=4)}
        dims["past"] = tuple({0: batch, 2: Dim(PAST)} for _ in past)
    return (ids, mask, pos, *past), dims


def _trace(model, cache: bool, opset: int | None, fused: bool = False):
    """The ONNX graph (an onnx_ir model) of `model`; fused: the onnxruntime-specific graph of exporters/fused.py."""
    import torch

    n_layers = cache_geometry(model.config)[0]
    args, dims = _example_inputs(model.config, model.dtype, cache)
    past_names, present_names = kv_names(n_layers) if cache else ([], [])
    kwargs = dict(opset_version=opset) if opset else {}
    if fused:
        wrapper = FusedCausalLM(model).eval()
        kwargs["custom_translation_table"] = translation_table()
    else:
        wrapper = _wrapper(model, cache)
    if not log.isEnabledFor(logging.INFO):  # torch.onnx's own notices (e.g. "torchvision is not installed")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        program = torch.onnx.export(
            wrapper, args, dynamic_shapes=dims, dynamo=True, verbose=False,
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names], **kwargs,
        )  # fmt: skip
    m = program.model
    if cache:  # Optimum's name for the mask length
        mask = m.graph.inputs[1]
        mask.shape = type(mask.shape)([mask.shape[0], TOTAL])
    return m


# ---------------------------------------------------------------------------------------------
# Optimization (onnxscript's onnxruntime fusions), kept only if a left-padded batch still matches


@contextlib.contextmanager
def _without_attention_fusions():
    from onnxscript.rewriter.ort_fusions import _core

    saved = {n: getattr(_core, n) for n in ATTENTION_FUSIONS if hasattr(_core, n)}
    for n in saved:
        setattr(_core, n, lambda *a, **k: 0)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(_core, n, f)


def _fuse(model, attention: bool):
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    with contextlib.nullcontext() if attention else _without_attention_fusions():
        model, counts = optimize_for_ort(model)
    return model, {k: int(v) for k, v in counts.items() if v}


def _onnx_stepper(path: Path, config):
    """step(ids, mask, pos, state) -> (logits, state) for an exported graph; state is its KV cache."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    past0 = inputs.get("past_key_values.0.key")
    kv_dtype = np.float16 if past0 is not None and past0.type == "tensor(float16)" else np.float32
    n_layers, _, kv, head_dim = cache_geometry(config)

    def step(ids, mask, pos, state):
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        feed = {n: v for n, v in feed.items() if n in inputs}
        if past0 is not None:
            for i, name in enumerate(kv_names(n_layers)[0]):
                feed[name] = np.zeros((ids.shape[0], kv, 0, head_dim), kv_dtype) if state is None else state[i]
        res = sess.run(None, feed)
        return res[0].astype(np.float32), res[1:]

    return step, past0 is not None


def _torch_stepper(model):
    """The same for a PyTorch model, recomputing the whole sequence each step (no cache to get wrong)."""
    import numpy as np
    import torch

    def step(ids, mask, pos, state):
        full = ids if state is None else np.concatenate([state, ids], 1)
        positions = torch.from_numpy(position_ids_from_mask(mask, mask.shape[1]))
        with torch.no_grad():
            out = model(
                input_ids=torch.from_numpy(full), attention_mask=torch.from_numpy(mask), position_ids=positions
            ).logits
        return out[:, -ids.shape[1] :].float().numpy(), full

    return step, True


def padded_batch_check(reference, candidate, config, steps: int = 2, seed: int = 0) -> float:
    """Largest logit difference (relative to the reference's largest logit) between two implementations of the same
    model (each an exported graph's path or a PyTorch model) on a left-padded batch of 2: a prefill of 6 tokens (the
    second row padded by 3), then `steps` cached decode steps."""
    import numpy as np

    rng = np.random.default_rng(seed)
    runs = [_onnx_stepper(Path(x), config) if isinstance(x, (str, Path)) else _torch_stepper(x)
            for x in (reference, candidate)]  # fmt: skip
    decode = all(cached for _, cached in runs)
    ids = rng.integers(3, min(200, config.vocab_size), (2, 6)).astype(np.int64)
    mask = np.ones((2, 6), np.int64)
    mask[1, :3] = 0
    states = [None, None]
    worst, scale = 0.0, 1e-6
    for _ in range(steps + 1):
        pos = position_ids_from_mask(mask, ids.shape[1])
        outs = []
        for k, (step, _) in enumerate(runs):
            logits, states[k] = step(ids, mask, pos, states[k])
            outs.append(logits)
        real = mask[:, -ids.shape[1] :].astype(bool)
        worst = max(worst, float(np.abs(outs[0] - outs[1])[real].max()))
        scale = max(scale, float(np.abs(outs[0][real]).max()))
        if not decode:
            break
        ids = outs[0][:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    return worst / scale


def _tolerance(precision: str) -> float:
    return 1e-3 if precision == "fp32" else 2e-2


def optimize_fused(staging: Path, model, torch_model, precision: str, threshold: int) -> tuple[object, dict | None]:
    """The fused graph (exporters/fused.py) with its RMSNorms fused too, saved to staging, checked against PyTorch on
    a left-padded batch; returns (model, info), or (None, info) when it does not match (the caller falls back)."""
    nodes_before = _count_nodes(model)
    fused, counts = _fuse(model, attention=False)
    save_graph(fused, staging / ONNX_FILE, threshold)
    diff = padded_batch_check(torch_model, staging / ONNX_FILE, torch_model.config)
    info = {"graph": "fused", "nodes_before": nodes_before, "nodes_after": _count_nodes(fused),
            "fused": {"group_query_attention": _count_op(fused, "GroupQueryAttention"), **counts},
            "padded_rel_diff_vs_torch": diff}  # fmt: skip
    if diff > _tolerance(precision):
        log.warning("the fused graph differs from PyTorch on a left-padded batch (%.2g); using the generic one", diff)
        for p in (staging / ONNX_FILE, staging / DATA_FILE):
            p.unlink(missing_ok=True)
        return None, info
    return fused, info


def optimize_graph(staging: Path, model, config, precision: str, threshold: int) -> tuple[object, dict]:
    """onnxscript's fusions on the generic graph; returns (model, info). The unfused graph is staged at staging/plain
    to check against; fusions that change a left-padded batch are dropped."""
    import onnx_ir

    plain = staging / "plain"
    plain.mkdir()
    save_graph(model, plain / ONNX_FILE, threshold)
    nodes_before = _count_nodes(model)
    tol = _tolerance(precision)
    info = {"graph": "generic", "nodes_before": nodes_before}
    for attention in (True, False):
        fused, counts = _fuse(model if attention else onnx_ir.load(plain / ONNX_FILE), attention)
        save_graph(fused, staging / ONNX_FILE, threshold)
        try:
            diff, error = padded_batch_check(plain / ONNX_FILE, staging / ONNX_FILE, config), None
        except Exception as e:  # a fusion that leaves an invalid graph (e.g. mixed fp16/fp32 norms)
            diff, error = float("inf"), f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        tried = {"attention_fusions": attention, "fused": counts, "rel_diff": None if error else diff}
        info.setdefault("tried", []).append({**tried, "error": error} if error else tried)
        if diff <= tol:
            info.update(
                fused=counts, attention_fusions=attention, padded_rel_diff=diff, nodes_after=_count_nodes(fused)
            )
            shutil.rmtree(plain)
            return fused, info
        log.warning("fused graph (attention fusions %s) not kept: %s", attention,
                    error or f"differs on a left-padded batch ({diff:.2g})")  # fmt: skip
    info.update(
        fused={},
        attention_fusions=False,
        nodes_after=nodes_before,
        kept="unfused: the fused graphs were wrong or invalid",
    )
    for p in (staging / ONNX_FILE, staging / DATA_FILE):
        p.unlink(missing_ok=True)
    result = onnx_ir.load(plain / ONNX_FILE)
    save_graph(result, staging / ONNX_FILE, threshold)
    shutil.rmtree(plain)
    return result, info


# ---------------------------------------------------------------------------------------------
# Saving


def _count_nodes(model) -> int:
    return sum(1 for _ in model.graph.all_nodes()) if hasattr(model.graph, "all_nodes") else len(model.graph)


def _count_op(model, op_type: str) -> int:
    return sum(1 for n in model.graph.all_nodes() if n.op_type == op_type)


def genai_config(config, generation_config=None, filename: str = ONNX_FILE, cache: bool = True,
                 share_buffer: bool = False) -> dict:  # fmt: skip
    """onnxruntime-genai's genai_config.json for a graph in this module's layout. share_buffer: the graph's KV cache
    can be updated in place (GroupQueryAttention writes present into past's buffer), as genai's own models do."""
    n_layers, heads, kv, head_dim = cache_geometry(config)
    past, present = ("past_key_values.%d.key", "past_key_values.%d.value"), ("present.%d.key", "present.%d.value")
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids"}
    outputs = {"logits": "logits"}
    if cache:
        inputs.update(past_key_names=past[0], past_value_names=past[1])
        outputs.update(present_key_names=present[0], present_value_names=present[1])
    gen = generation_config

    def tok(name):
        v = getattr(gen, name, None) if gen is not None else None
        return v if v is not None else getattr(config, name, None)

    eos = tok("eos_token_id")
    pad = tok("pad_token_id")
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)
    return {
        "model": {
            "bos_token_id": tok("bos_token_id"),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": head_dim,
                "hidden_size": geometry(config).hidden,
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": heads,
                "num_hidden_layers": n_layers,
                "num_key_value_heads": kv,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": config.model_type,
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": share_buffer, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }  # fmt: skip


def _write_side_files(staging: Path, model, tokenizer, cache: bool, fused: bool = False) -> None:

    model.config.save_pretrained(staging)
    make_config_portable(staging)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    write_json(staging / "genai_config.json", genai_config(model.config, gen, ONNX_FILE, cache, share_buffer=fused))


# ---------------------------------------------------------------------------------------------
# The options


def _bytes_or_one_file(text: str) -> int | None:
    """--external-data-threshold's text: a number of bytes, or -1 for one file (None)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    return None if value == -1 else value


@dataclass
class ExportOptions:
    """What export_onnx makes (export.json records the result). int4/int8 take `quant` (QuantOptions, its own
    dataclass: quantize_export and convert.toml's quant_options table use it alone, and export.json records it)."""

    precision: str = option("fp32", "weights, compute and cache; int4/int8: fp32 graph with weight-only quantized "
                            "MatMuls", choices=(*PRECISIONS, *QUANTIZED))  # fmt: skip
    opset: int | None = option(None, f"ONNX opset (default: the exporter's own, {MIN_OPSET} or newer)")
    cache: bool = option(
        True, "the graph takes and returns a KV cache; --no-cache: a plain logits model", flag="--no-cache"
    )
    optimize: bool = option(False, "onnxruntime fusions, kept only if padded batches match")
    exporter: str = option("torch", "torch.onnx (dynamo) or Optimum", choices=EXPORTERS)
    external_data_threshold: int | None = option(
        MIN_EXTERNAL_BYTES, f"tensors of this many bytes (>= {MIN_EXTERNAL_BYTES}) or more go to model.onnx.data "
        "(-1, or None from Python: one file, < 2 GB)", parse=_bytes_or_one_file,
    )  # fmt: skip
    quant: QuantOptions | dict | None = option(None, "int4/int8: how the weights are quantized (QuantOptions or a "
                                               "dict of its fields)", cli=False)  # fmt: skip
    calib: str | None = option(None, "calibration text for --quant-method gptq (.txt, .jsonl or hf:DATASET)")

    @property
    def traced(self) -> str:
        """The precision that is traced: int4/int8 start from the fp32 graph."""
        return "fp32" if self.precision in QUANTIZED else self.precision

    def validate(self) -> ExportOptions:
        """Every bad value or combination as one UsageError line, before any work; resolves `quant` (None unless
        int4/int8). Returns self."""
        if self.precision not in PRECISIONS and self.precision not in QUANTIZED:
            raise UsageError(f"unknown precision {self.precision!r}; choose one of "
                             f"{', '.join([*PRECISIONS, *QUANTIZED])}")  # fmt: skip
        if self.precision in QUANTIZED and self.exporter != "torch":
            raise UsageError(f"--precision {self.precision} is made from the torch exporter's graph; drop --exporter "
                             "optimum")  # fmt: skip
        if self.exporter not in EXPORTERS:
            raise UsageError(f"unknown exporter {self.exporter!r}; choose torch or optimum")
        if self.opset is not None and (not isinstance(self.opset, int) or self.opset < MIN_OPSET):
            raise UsageError(f"--opset must be an integer >= {MIN_OPSET} for the dynamo exporter, got {self.opset!r}")
        if self.optimize and self.precision == "bf16":
            raise UsageError("--optimize cannot be verified for bf16 (onnxruntime's CPU provider has no bf16 "
                             "kernels); drop --optimize or export fp16")  # fmt: skip
        threshold = self.external_data_threshold
        if threshold is not None and threshold < MIN_EXTERNAL_BYTES:
            raise UsageError(f"--external-data-threshold must be at least {MIN_EXTERNAL_BYTES} bytes (smaller tensors "
                             f"always stay in model.onnx), or -1 for one file; got {threshold}")  # fmt: skip
        self.quant = quant_options_for(self.precision, self.quant, self.optimize, self.calib)
        return check(self, "export option")


# ---------------------------------------------------------------------------------------------
# The entry point


def export_onnx(model, out, options: ExportOptions | None = None, *, force: bool = False, progress: bool = True,
                load=None, **fields) -> dict:  # fmt: skip
    """Export a causal LM (checkpoint dir, hub id or a loaded `Loaded`) to `out`; returns a summary (see module doc).

    options: an ExportOptions; its fields may also come as keywords (precision="fp16", quant={...}), which replace
    the options'. force: replace an existing `out`. load: LoadOptions for loading (its dtype is replaced by the
    precision's, its device by the CPU).
    """

    opts = dataclasses.replace(options or ExportOptions(), **fields).validate()
    source = model.source if isinstance(model, Loaded) else str(model)
    settings = {"options": opts, "load": load}  # a model in memory may differ from its source: no key
    key = None if isinstance(model, Loaded) else output_key({"model": source, "calibration": opts.calib}, settings)
    if (done := up_to_date(out, key, force)) is not None:
        return done
    check_output_dir(out, force, inputs=(source,))
    if not isinstance(model, Loaded):
        load_config(str(model), (load or LoadOptions()).trust_remote_code)  # missing or unsupported: fail here
    t0 = time.perf_counter()
    if opts.exporter == "optimum":
        return _export_optimum(model, out, opts, force, t0, key)
    summary = {}  # filled in below; atomic_dir's marker keeps it for up_to_date
    with _stages(progress) as stage:
        torch_model, tokenizer = _load_on_cpu(model, opts, load, stage)
        onnx_model, fused_reason = _first_graph(torch_model, opts, stage)
        with atomic_dir(out, force, inputs=(source,), key=key, result=summary) as staging:
            onnx_model, info = _optimize_or_save(staging, onnx_model, torch_model, opts, fused_reason, stage)
            if opts.quant:
                stage(opts.precision)
                onnx_model, info["quantization"] = _quantize(staging, onnx_model, torch_model, tokenizer, opts)
            stage("side files")
            summary.update(_finish(staging, out, onnx_model, torch_model, tokenizer, opts, info, source, t0))
    return summary


@contextlib.contextmanager
def _stages(progress: bool):
    """stage(name): the next of the export's steps on a progress bar (stderr), closed however the export ends."""
    from tqdm import tqdm

    bar = tqdm(total=5, desc="export onnx", file=sys.stderr, disable=not progress, leave=False)
    try:
        yield lambda name: (bar.set_postfix_str(name), bar.update(1))
    finally:
        bar.close()


def _load_on_cpu(model, opts: ExportOptions, load, stage):
    """(torch model, tokenizer or None): loaded in the traced precision on the CPU; a caller's model in another
    dtype is converted as a copy, never the caller's weights."""

    if isinstance(model, Loaded):
        loaded = model
    else:
        stage("load")
        lo = LoadOptions(**{**vars(load or LoadOptions()), "dtype": PRECISIONS[opts.traced], "device": "cpu"})
        loaded = load_model(str(model), lo, tokenizer="optional")
    torch_model = loaded.model
    if str(torch_model.device) != "cpu":
        raise UsageError(f"export needs the model on the CPU, it is on {torch_model.device}; load it with device=cpu")
    dtype = torch_dtype(PRECISIONS[opts.traced])
    if torch_model.dtype != dtype:
        import copy

        torch_model = copy.deepcopy(torch_model).to(dtype)
    return torch_model, loaded.tokenizer


def _first_graph(torch_model, opts: ExportOptions, stage):
    """(traced graph, why the fused decoder is not used or None): with optimize, the fused decoder of
    exporters/fused.py where the family supports it, else the generic graph."""
    fused_reason = None
    if opts.optimize:
        fused_reason = unsupported_reason(torch_model) if opts.cache else "a graph without KV cache"
    stage("trace")
    fused = opts.optimize and fused_reason is None
    return _trace_or_explain(torch_model, opts.cache, opts.opset, fused=fused), fused_reason


def _optimize_or_save(staging, onnx_model, torch_model, opts: ExportOptions, fused_reason, stage):
    """The graph saved to staging, optimized if asked (fused decoder checked against PyTorch, else onnxscript's
    fusions on a re-traced generic graph); returns (graph, optimize info)."""
    threshold = opts.external_data_threshold
    if not opts.optimize:
        stage("save")
        save_graph(onnx_model, staging / ONNX_FILE, threshold)
        return onnx_model, {}
    stage("optimize")
    if fused_reason is None:
        fused_model, info = optimize_fused(staging, onnx_model, torch_model, opts.traced, threshold)
        if fused_model is not None:
            return fused_model, info
        fused_reason = f"differs from PyTorch by {info['padded_rel_diff_vs_torch']:.2g}"
        onnx_model = _trace_or_explain(torch_model, opts.cache, opts.opset)
    onnx_model, info = optimize_graph(staging, onnx_model, torch_model.config, opts.traced, threshold)
    info["fused_graph_not_used"] = fused_reason
    log.info("onnxruntime's fused decoder not used (%s): generic graph with onnxscript fusions", fused_reason)
    return onnx_model, info


def _quantize(staging, onnx_model, torch_model, tokenizer, opts: ExportOptions):
    """Quantize the staged fp32 graph in place (exporters/quantize.py); returns (onnx_ir model, record). The
    record holds the padded-batch difference of the quantized graph against PyTorch fp32 (for information:
    parity judges it)."""
    import onnx_ir

    t0 = time.perf_counter()
    proto = onnx_ir.to_proto(onnx_ir.external_data.load_to_model(onnx_model))
    reader = None
    if opts.quant.method == "gptq":
        windows = calibration_windows(opts.calib, tokenizer)
        has_cache = any(i.name.startswith("past_key_values") for i in proto.graph.input)
        reader = WindowReader(windows, torch_model.config, has_cache)
    qproto, record = quantize_proto(proto, BITS[opts.precision], opts.quant, torch_model.config, reader)
    if reader is not None:
        record["calibration"] = {"source": str(opts.calib), "windows": len(reader.feeds)}
    model = onnx_ir.from_proto(qproto)
    save_graph(model, staging / ONNX_FILE, opts.external_data_threshold)
    record["seconds"] = round(time.perf_counter() - t0, 2)
    if opts.quant.format == "qoperator":
        record["padded_rel_diff_vs_torch_fp32"] = padded_batch_check(torch_model, staging / ONNX_FILE,
                                                                     torch_model.config)  # fmt: skip
    return model, record


def _trace_or_explain(torch_model, cache, opset, fused=False):
    try:
        return _trace(torch_model, cache, opset, fused)
    except Exception as e:
        config = torch_model.config
        raise UsageError(
            f"torch.onnx.export failed for {config.model_type} ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:300]}); try --exporter optimum"
        ) from e


def _finish(staging, out, onnx_model, torch_model, tokenizer, opts: ExportOptions, info, source, t0) -> dict:
    """The side files (config, tokenizer, genai_config.json) and export.json beside the staged graph; returns the
    summary."""

    _write_side_files(staging, torch_model, tokenizer, opts.cache, fused=info.get("graph") == "fused")
    n_layers = cache_geometry(torch_model.config)[0]
    summary = _summary(staging, out, onnx_model, "torch", opts.precision, opts.cache, n_layers, t0, info, source)
    write_json(staging / RECORD_FILE, {**summary, "versions": versions(EXPORT_PACKAGES)})
    return summary


def _summary(staging, out, onnx_model, exporter, precision, cache, n_layers, t0, info, source) -> dict:
    files = [p for p in staging.rglob("*") if p.is_file()]
    return {
        "path": str(Path(out) / ONNX_FILE),
        "source": source,
        "exporter": exporter,
        "precision": precision,
        "opset": int(onnx_model.opset_imports.get("", 0)),
        "cache": cache,
        "num_layers": n_layers,
        "nodes": _count_nodes(onnx_model),
        "size_bytes": sum(p.stat().st_size for p in files if p.name.startswith(ONNX_FILE)),
        "external_data": (staging / DATA_FILE).is_file(),
        "inputs": [v.name for v in onnx_model.graph.inputs],
        "outputs": [v.name for v in onnx_model.graph.outputs],
        "optimize": {k: v for k, v in info.items() if k != "quantization"} or None,
        "quantization": info.get("quantization"),
        "seconds": round(time.perf_counter() - t0, 2),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


# ---------------------------------------------------------------------------------------------
# Optimum's exporter (optimum-onnx; needs transformers < 4.58)


def _export_optimum(model, out, opts: ExportOptions, force, t0, key=None) -> dict:
    import onnx_ir

    try:
        from optimum.exporters.onnx import main_export
    except ImportError as e:
        raise UsageError(
            "--exporter optimum needs optimum-onnx, which needs transformers<4.58: pip install optimum-onnx "
            "'transformers<4.58' in a separate environment (`make .venv-optimum`), or use --exporter torch"
        ) from e
    if isinstance(model, Loaded):
        raise UsageError("--exporter optimum exports from a checkpoint directory or hub id, not a loaded model")
    if opts.optimize:
        raise UsageError("--optimize applies to the torch exporter; drop it with --exporter optimum")
    config = load_config(str(model))
    n_layers = cache_geometry(config)[0]
    precision, cache = opts.precision, opts.cache
    summary = {}
    with atomic_dir(out, force, inputs=(str(model),), key=key, result=summary) as staging:
        raw = staging / "optimum"
        task = "text-generation-with-past" if cache else "text-generation"
        dtype = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}[precision]
        with contextlib.redirect_stdout(sys.stderr):
            main_export(str(model), raw, task=task, opset=opts.opset, device="cpu", dtype=dtype, do_validation=False)
        found = sorted(raw.glob("*.onnx"))
        if not found:
            raise UsageError(f"optimum wrote no .onnx file for {model}")
        onnx_model = onnx_ir.load(found[0])
        save_graph(onnx_model, staging / ONNX_FILE, opts.external_data_threshold)
        for p in raw.iterdir():
            if p.suffix != ".onnx" and not p.name.endswith((".onnx_data", ".onnx.data")):
                shutil.move(str(p), staging / p.name)
        shutil.rmtree(raw)
        from transformers import AutoConfig, GenerationConfig

        cfg = AutoConfig.from_pretrained(staging)
        gen = None
        with contextlib.suppress(OSError):
            gen = GenerationConfig.from_pretrained(staging)
        write_json(staging / "genai_config.json", genai_config(cfg, gen, ONNX_FILE, cache))
        summary.update(_summary(staging, out, onnx_model, "optimum", precision, cache, n_layers, t0, {}, str(model)))
        write_json(staging / RECORD_FILE, {**summary, "versions": versions(EXPORT_PACKAGES)})
    return summary


__all__ = ["ONNX_FILE", "DATA_FILE", "ExportOptions", "export_onnx", "genai_config", "kv_names",
           "padded_batch_check"]  # fmt: skip
