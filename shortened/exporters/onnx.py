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
import inspect
import logging
import resource
import shutil
import sys
import time
from pathlib import Path

from shortened.errors import UsageError
from shortened.model.families import geometry
from shortened.versions import EXPORT_PACKAGES, versions

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
RECORD_FILE = "export.json"
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
QUANTIZED = ("int4", "int8")  # weight-only: an fp32 graph whose MatMul weights are int4/int8 (exporters/quantize.py)
EXPORTERS = ("torch", "optimum")
MIN_OPSET = 18  # the dynamo exporter's floor
MIN_EXTERNAL_BYTES = 1024  # smaller tensors always stay in model.onnx
PROTOBUF_LIMIT = 2**31 - 1  # a single ONNX protobuf cannot exceed 2 GB: larger models must use external data
# Optimum's dim names
BATCH, SEQ, PAST = "batch_size", "sequence_length", "past_sequence_length"
TOTAL = f"{PAST} + {SEQ}"
ATTENTION_FUSIONS = ("fuse_sdpa", "fuse_gqa", "fuse_qkv_gqa", "fuse_mha1", "fuse_mha2", "fuse_mha_scale",
                     "fuse_mha_bias", "fuse_attention", "replace_sdpa_by_mha")  # fmt: skip


def kv_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return past, present


def cache_geometry(config) -> tuple[int, int, int, int]:
    """(num_layers, num_attention_heads, num_key_value_heads, head_dim) of a supported family's config."""
    g = geometry(config)
    return g.layers, g.heads, g.kv_heads, g.head_dim


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
        from shortened.exporters.fused import FusedCausalLM
        from shortened.exporters.ort_ops import translation_table

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

    from shortened.runtime.base import position_ids_from_mask

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

    from shortened.runtime.base import position_ids_from_mask

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
    _save(fused, staging / ONNX_FILE, threshold)
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
    _save(model, plain / ONNX_FILE, threshold)
    nodes_before = _count_nodes(model)
    tol = _tolerance(precision)
    info = {"graph": "generic", "nodes_before": nodes_before}
    for attention in (True, False):
        fused, counts = _fuse(model if attention else onnx_ir.load(plain / ONNX_FILE), attention)
        _save(fused, staging / ONNX_FILE, threshold)
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
    _save(result, staging / ONNX_FILE, threshold)
    shutil.rmtree(plain)
    return result, info


# ---------------------------------------------------------------------------------------------
# Saving


def _count_nodes(model) -> int:
    return sum(1 for _ in model.graph.all_nodes()) if hasattr(model.graph, "all_nodes") else len(model.graph)


def _count_op(model, op_type: str) -> int:
    return sum(1 for n in model.graph.all_nodes() if n.op_type == op_type)


def _weight_bytes(model) -> int:
    return sum(int(t.const_value.nbytes) for t in model.graph.initializers.values() if t.const_value is not None)


def _save(model, path: Path, threshold: int | None) -> bool:
    """Save with tensors of `threshold` (at least 1024) bytes or more in model.onnx.data; None: one file, unless the
    weights exceed what one protobuf holds (2 GB), where external data is forced."""
    import onnx_ir

    for p in (path, path.with_name(DATA_FILE)):
        p.unlink(missing_ok=True)
    external = threshold is not None or _weight_bytes(model) > PROTOBUF_LIMIT
    if external:
        # small tensors (shape constants) stay inline: onnxruntime's shape inference cannot read them from a file
        size = max(threshold or 0, MIN_EXTERNAL_BYTES)
        onnx_ir.save(model, path, external_data=DATA_FILE, size_threshold_bytes=size)
    else:  # weights that still live in another file (a loaded model) come into memory first
        onnx_ir.save(onnx_ir.external_data.load_to_model(model), path)
    return path.with_name(DATA_FILE).is_file()


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
    from shortened.io import write_json
    from shortened.model.checkpoint import make_config_portable

    model.config.save_pretrained(staging)
    make_config_portable(staging)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    write_json(staging / "genai_config.json", genai_config(model.config, gen, ONNX_FILE, cache, share_buffer=fused))


# ---------------------------------------------------------------------------------------------
# The entry point


def _check_args(precision, opset, exporter, optimize, external_data_threshold) -> None:
    if precision not in PRECISIONS and precision not in QUANTIZED:
        raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join([*PRECISIONS, *QUANTIZED])}")
    if precision in QUANTIZED and exporter != "torch":
        raise UsageError(f"--precision {precision} is made from the torch exporter's graph; drop --exporter optimum")
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter {exporter!r}; choose torch or optimum")
    if opset is not None and (not isinstance(opset, int) or opset < MIN_OPSET):
        raise UsageError(f"--opset must be an integer >= {MIN_OPSET} for the dynamo exporter, got {opset!r}")
    if optimize and precision == "bf16":
        raise UsageError("--optimize cannot be verified for bf16 (onnxruntime's CPU provider has no bf16 kernels); "
                         "drop --optimize or export fp16")  # fmt: skip
    if external_data_threshold is not None and external_data_threshold < MIN_EXTERNAL_BYTES:
        raise UsageError(f"--external-data-threshold must be at least {MIN_EXTERNAL_BYTES} bytes (smaller tensors "
                         f"always stay in model.onnx), or -1 for one file; got {external_data_threshold}")  # fmt: skip


def export_onnx(
    model,
    out,
    precision: str = "fp32",
    opset: int | None = None,
    cache: bool = True,
    optimize: bool = False,
    exporter: str = "torch",
    external_data_threshold: int | None = 1024,
    force: bool = False,
    load=None,
    progress: bool = True,
    quant=None,
    calib: str | None = None,
) -> dict:
    """Export a causal LM (checkpoint dir, hub id or a loaded `Loaded`) to `out`; returns a summary (see module doc).

    precision: fp32 | fp16 | bf16 (the weights, the compute and the KV cache; logits stay float32), or int4 | int8:
    the fp32 graph with its MatMul weights quantized by onnxruntime's weight-only quantizer; `quant` is a
    exporters.quantize.QuantOptions (or a dict of its fields), `calib` the calibration source GPTQ needs.
    opset: ONNX opset (default: the exporter's). cache: KV-cache graph (True) or a plain logits graph.
    optimize: onnxruntime fusions, kept only if they keep padded-batch parity. exporter: torch | optimum.
    external_data_threshold: tensors of this many bytes (>= 1024) or more go to model.onnx.data (None: one file,
    unless the weights exceed 2 GB). load: LoadOptions for loading (its dtype is replaced by `precision`).
    """
    settings = {k: v for k, v in locals().items() if k not in ("out", "force", "progress")}
    from tqdm import tqdm

    from shortened.io import atomic_dir, check_output_dir, output_key, up_to_date, write_json
    from shortened.model.loading import Loaded, LoadOptions, load_config, load_model, torch_dtype

    _check_args(precision, opset, exporter, optimize, external_data_threshold)
    qopts = _quant_options(precision, quant, optimize, calib)
    base = "fp32" if qopts else precision  # what is traced: quantized exports start from the fp32 graph
    source = model.source if isinstance(model, Loaded) else str(model)
    key = None if isinstance(model, Loaded) else output_key({"model": source, "calibration": calib}, settings)
    if (done := up_to_date(out, key, force)) is not None:
        return done
    check_output_dir(out, force, inputs=(source,))
    if not isinstance(model, Loaded):
        load_config(str(model), (load or LoadOptions()).trust_remote_code)  # missing or unsupported: fail here
    t0 = time.perf_counter()
    if exporter == "optimum":
        return _export_optimum(model, out, precision, opset, cache, optimize, force, external_data_threshold, t0,
                               key)  # fmt: skip
    bar = tqdm(total=5, desc="export onnx", file=sys.stderr, disable=not progress, leave=False)
    stage = lambda name: (bar.set_postfix_str(name), bar.update(1))  # noqa: E731
    dtype = torch_dtype(PRECISIONS[base])
    if isinstance(model, Loaded):
        loaded = model
    else:
        stage("load")
        opts = LoadOptions(**{**vars(load or LoadOptions()), "dtype": PRECISIONS[base], "device": "cpu"})
        loaded = load_model(str(model), opts, tokenizer="optional")
    torch_model = loaded.model
    if str(torch_model.device) != "cpu":
        raise UsageError(f"export needs the model on the CPU, it is on {torch_model.device}; load it with device=cpu")
    config = torch_model.config
    n_layers = cache_geometry(config)[0]
    if torch_model.dtype != dtype:  # a caller's model in another dtype: convert a copy, never the caller's weights
        import copy

        torch_model = copy.deepcopy(torch_model).to(dtype)
    fused_reason = None
    if optimize:
        from shortened.exporters.fused import unsupported_reason

        fused_reason = unsupported_reason(torch_model) if cache else "a graph without KV cache"
    try:
        stage("trace")
        onnx_model = _trace_or_explain(torch_model, cache, opset, fused=optimize and fused_reason is None)
        summary = {}  # filled in below; the marker keeps it for up_to_date
        with atomic_dir(out, force, inputs=(source,), key=key, result=summary) as staging:
            info = {}
            if optimize:
                stage("optimize")
                if fused_reason is None:
                    fused_model, info = optimize_fused(staging, onnx_model, torch_model, base, external_data_threshold)
                    if fused_model is None:
                        fused_reason = f"differs from PyTorch by {info['padded_rel_diff_vs_torch']:.2g}"
                        onnx_model = _trace_or_explain(torch_model, cache, opset)
                    else:
                        onnx_model = fused_model
                if fused_reason is not None:
                    onnx_model, info = optimize_graph(staging, onnx_model, config, base, external_data_threshold)
                    info["fused_graph_not_used"] = fused_reason
                    log.info("onnxruntime's fused decoder not used (%s): generic graph with onnxscript fusions",
                             fused_reason)  # fmt: skip
            else:
                stage("save")
                _save(onnx_model, staging / ONNX_FILE, external_data_threshold)
            if qopts:
                stage(precision)
                onnx_model, info["quantization"] = _quantize(
                    staging, onnx_model, torch_model, loaded.tokenizer, precision, qopts, calib, external_data_threshold
                )
            stage("side files")
            _write_side_files(staging, torch_model, loaded.tokenizer, cache, fused=info.get("graph") == "fused")
            summary.update(_summary(staging, out, onnx_model, "torch", precision, cache, n_layers, t0, info, source))
            write_json(staging / RECORD_FILE, {**summary, "versions": versions(EXPORT_PACKAGES)})
    finally:
        bar.close()
    return summary


def _quant_options(precision, quant, optimize, calib):
    """The QuantOptions of an int4/int8 export (None for float precisions), checked before any work."""
    from shortened.exporters.quantize import BITS, QuantOptions

    if precision not in QUANTIZED:
        if quant:
            raise UsageError(f"quantization options apply to --precision int4/int8, not {precision}")
        return None
    if isinstance(quant, dict):
        import dataclasses

        names = {f.name for f in dataclasses.fields(QuantOptions)}
        unknown = sorted(set(quant) - names)
        if unknown:
            raise UsageError(f"unknown quantization option {unknown[0]!r}; known: {', '.join(sorted(names))}")
        quant = QuantOptions(**quant)
    opts = (quant or QuantOptions()).resolved(BITS[precision])
    opts.validate(BITS[precision])
    if opts.format == "qdq" and optimize:
        raise UsageError("the QDQ format is for TensorRT, which cannot run the fused graph: drop --optimize")
    if opts.method == "gptq" and not calib:
        raise UsageError("GPTQ needs calibration text: pass --calib FILE (the calibration set)")
    return opts


def _quantize(staging, onnx_model, torch_model, tokenizer, precision, opts, calib, threshold):
    """Quantize the staged fp32 graph in place (exporters/quantize.py); returns (onnx_ir model, record). The
    record holds the padded-batch difference of the quantized graph against PyTorch fp32 (for information:
    parity judges it)."""
    import onnx_ir

    from shortened.exporters.quantize import BITS, WindowReader, calibration_windows, quantize_proto

    t0 = time.perf_counter()
    proto = onnx_ir.to_proto(onnx_ir.external_data.load_to_model(onnx_model))
    reader = None
    if opts.method == "gptq":
        windows = calibration_windows(calib, tokenizer)
        has_cache = any(i.name.startswith("past_key_values") for i in proto.graph.input)
        reader = WindowReader(windows, torch_model.config, has_cache)
    qproto, record = quantize_proto(proto, BITS[precision], opts, torch_model.config, reader)
    if reader is not None:
        record["calibration"] = {"source": str(calib), "windows": len(reader.feeds)}
    model = onnx_ir.from_proto(qproto)
    _save(model, staging / ONNX_FILE, threshold)
    record["seconds"] = round(time.perf_counter() - t0, 2)
    if opts.format == "qoperator":
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


def _export_optimum(model, out, precision, opset, cache, optimize, force, threshold, t0, key=None) -> dict:
    import onnx_ir

    from shortened.io import atomic_dir, write_json
    from shortened.model.loading import Loaded, load_config

    try:
        from optimum.exporters.onnx import main_export
    except ImportError as e:
        raise UsageError(
            "--exporter optimum needs optimum-onnx, which needs transformers<4.58: pip install optimum-onnx "
            "'transformers<4.58' in a separate environment (`make .venv-optimum`), or use --exporter torch"
        ) from e
    if isinstance(model, Loaded):
        raise UsageError("--exporter optimum exports from a checkpoint directory or hub id, not a loaded model")
    if optimize:
        raise UsageError("--optimize applies to the torch exporter; drop it with --exporter optimum")
    config = load_config(str(model))
    n_layers = cache_geometry(config)[0]
    summary = {}
    with atomic_dir(out, force, inputs=(str(model),), key=key, result=summary) as staging:
        raw = staging / "optimum"
        task = "text-generation-with-past" if cache else "text-generation"
        dtype = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}[precision]
        with contextlib.redirect_stdout(sys.stderr):
            main_export(str(model), raw, task=task, opset=opset, device="cpu", dtype=dtype, do_validation=False)
        found = sorted(raw.glob("*.onnx"))
        if not found:
            raise UsageError(f"optimum wrote no .onnx file for {model}")
        onnx_model = onnx_ir.load(found[0])
        _save(onnx_model, staging / ONNX_FILE, threshold)
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


__all__ = ["ONNX_FILE", "DATA_FILE", "export_onnx", "genai_config", "kv_names", "padded_batch_check"]
