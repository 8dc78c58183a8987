"""TensorRT engines from the exported ONNX: profile, pre-flight, trtexec command, build, and the ORT-TensorRT route.

Everything that can be decided without TensorRT lives in plain functions (derive_profile, preflight,
trtexec_command, ort_tensorrt_provider_options); only build_engine() imports `tensorrt`. The network is
strongly typed: precision comes from the ONNX types (an fp16 engine is built from the fp16 ONNX export), which
TensorRT 10 enables with NetworkDefinitionCreationFlag.STRONGLY_TYPED and TensorRT 11 always does.

The sequence range (--seq min:opt:max) is the range of the total context (past + new tokens) the engine serves.
One optimization profile covers every dynamic input, derived from the ONNX's named dims:
    batch_size            -> --batch min:opt:max
    sequence_length       -> new tokens per call: seq.min .. seq.max (a prefill of the whole context)
    past_sequence_length  -> KV-cache length: 0 (prefill) .. seq.max - seq.min (decode at the end of the context)
    past + sequence (mask)-> seq.min .. seq.max
The min and opt points are whole, consistent steps (TensorRT rejects a profile whose opt shapes violate the
graph's shape constraints); opt is a decode step at seq.opt context (or a prefill of seq.opt tokens with
opt_phase="prefill"). At the max point every dim is at its own maximum, which no single step reaches; TensorRT
only warns about that.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from pathlib import Path

from shortened.errors import UsageError
from shortened.io import atomic_dir, check_output_dir, output_key, up_to_date, write_json
from shortened.runtime.onnxruntime import find_onnx_model, graph_precision
from shortened.runtime.tensorrt import (
    MIN_TENSORRT,
    require_tensorrt,
    tensorrt_unavailable_reason,
    version_tuple,
)

log = logging.getLogger(__name__)

DEFAULT_BATCH = (1, 8, 32)
DEFAULT_SEQ = (1, 128, 2048)
DEFAULT_WORKSPACE_GB = 4.0
DEFAULT_TARGET = "10.15"  # the op table below is TensorRT 10.15's; used when TensorRT is absent and none is named
PRECISIONS = {"fp32": 1, "fp16": 10, "bf16": 16}  # name -> ONNX TensorProto elem type
MAX_OPSET = 24  # onnx-tensorrt operators.md (10.15, 11.x): opsets 9 to 24
MIN_OPSET = 9

# ONNX operators TensorRT's ONNX parser supports (default domain), from onnx-tensorrt docs/operators.md for
# TensorRT 10.15 ("Y" rows). Ops added after 10.0 (per the onnx-tensorrt changelog) are listed in _ADDED_IN;
# everything else here is treated as available from 10.0 on.
SUPPORTED_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
    BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
    DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor
    Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
    GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If
    ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop
    LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg
    NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal
    RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
    ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
    RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu
    Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum
    Swish Tan Tanh TensorScatter ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)
_ADDED_IN = {
    "DeformConv": (10, 1),
    "BlackmanWindow": (10, 4),
    "HammingWindow": (10, 4),
    "HannWindow": (10, 4),
    "STFT": (10, 5),
    "Attention": (10, 14),
    "RotaryEmbedding": (10, 15),
    "RMSNormalization": (10, 15),
    "TensorScatter": (10, 15),
    "Swish": (11, 0),
}
_ORT_FUSION_HINT = "onnxruntime-only fused op: export the ONNX without --optimize for TensorRT"
# onnxruntime contrib ops that onnxruntime registers in the default ONNX domain (its fusions emit them)
_ORT_DEFAULT_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"})

# how a named dim maps to a range (names as Optimum and our exporter write them, spaces removed, lower case)
_ROLE_BY_DIM = {
    "batch_size": "batch",
    "batch": "batch",
    "sequence_length": "new",
    "seq": "new",
    "past_sequence_length": "past",
    "past": "past",
    "past_sequence_length+sequence_length": "total",
    "sequence_length+past_sequence_length": "total",
    "total_sequence_length": "total",
    "total": "total",
}


# ---------------------------------------------------------------------------------------------- ranges, profile


def parse_range(text: str | tuple | list, what: str = "range") -> tuple[int, int, int]:
    """'1:8:32' -> (1, 8, 32); '8' -> (8, 8, 8); a 3-tuple passes through. Raises UsageError on anything else."""
    if isinstance(text, (tuple, list)):
        parts = list(text)
    else:
        parts = str(text).replace(" ", "").split(":")
    if len(parts) == 1:
        parts = parts * 3
    try:
        vals = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        vals = ()
    if len(vals) != 3:
        raise UsageError(f"--{what} must be MIN:OPT:MAX integers (e.g. 1:8:32), got {text!r}")
    return vals


def check_ranges(batch, seq, max_positions: int | None = None) -> list[str]:
    """Problems with the user's ranges (empty when consistent)."""
    problems = []
    for what, (lo, opt, hi) in (("batch", batch), ("seq", seq)):
        if lo < 1:
            problems.append(f"--{what} minimum must be at least 1, got {lo}")
        if not lo <= opt <= hi:
            problems.append(f"--{what} must satisfy min <= opt <= max, got {lo}:{opt}:{hi}")
    if max_positions and seq[2] > max_positions:
        problems.append(f"--seq max {seq[2]} exceeds the model's max_position_embeddings {max_positions}; lower --seq")
    return problems


def _points(batch, seq, opt_phase: str) -> dict:
    """The value of each role (batch, new, past, total) at the min, opt and max points of the profile."""
    if opt_phase not in ("decode", "prefill"):
        raise UsageError(f"opt_phase must be 'decode' or 'prefill', got {opt_phase!r}")
    b, s = batch, seq
    if opt_phase == "decode":  # one new token after seq.opt - 1 cached ones (at least seq.min new tokens)
        opt_new = min(max(1, s[0]), s[1])
        opt = {"batch": b[1], "new": opt_new, "past": s[1] - opt_new, "total": s[1]}
    else:  # a prefill of seq.opt tokens with an empty cache
        opt = {"batch": b[1], "new": s[1], "past": 0, "total": s[1]}
    return {
        "min": {"batch": b[0], "new": s[0], "past": 0, "total": s[0]},
        "opt": opt,
        "max": {"batch": b[2], "new": s[2], "past": max(0, s[2] - s[0]), "total": s[2]},
    }


def _dim_role(dim_name: str, input_name: str, axis: int) -> str | None:
    role = _ROLE_BY_DIM.get(dim_name.replace(" ", "").lower())
    if role:
        return role
    # unnamed or oddly named symbols (e.g. 's0'): fall back on the Optimum layout of each input
    if axis == 0:
        return "batch"
    if input_name in ("input_ids", "position_ids", "inputs_embeds") and axis == 1:
        return "new"
    if input_name == "attention_mask" and axis == 1:
        return "total"
    if input_name.startswith("past_key_values.") and axis == 2:
        return "past"
    return None


def graph_inputs(model) -> dict:
    """{input name: (elem_type, [dim value or dim name or None])} of an onnx ModelProto, initializers excluded."""
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for v in model.graph.input:
        if v.name in inits:
            continue
        tt = v.type.tensor_type
        dims = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or None)
        out[v.name] = (tt.elem_type, dims)
    return out


def _load_onnx(onnx_path):
    import onnx

    try:
        return onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # a truncated or foreign file
        raise UsageError(f"cannot read {onnx_path} as ONNX ({type(e).__name__}: {e}); pass an exported model") from e


def derive_profile(onnx_path, batch=DEFAULT_BATCH, seq=DEFAULT_SEQ, opt_phase: str = "decode", model=None):
    """One optimization profile: {input name: {"min": [...], "opt": [...], "max": [...]}} for every graph input.

    Named dims map to ranges as the module docstring says; static dims stay fixed. Raises UsageError for a dim
    that maps to no range and for a static dim the ranges cannot meet.
    """
    batch, seq = parse_range(batch, "batch"), parse_range(seq, "seq")
    problems = check_ranges(batch, seq)
    if not problems:
        profile, problems = _derive(model if model is not None else _load_onnx(onnx_path), batch, seq, opt_phase)
    if problems:
        raise UsageError("; ".join(problems))
    return profile


def _derive(model, batch, seq, opt_phase):
    batch, seq = parse_range(batch, "batch"), parse_range(seq, "seq")
    points = _points(batch, seq, opt_phase)
    profile, problems = {}, []
    for name, (_, dims) in graph_inputs(model).items():
        shape = {k: [] for k in points}
        for axis, d in enumerate(dims):
            if isinstance(d, int):
                for k in points:
                    shape[k].append(d)
                continue
            role = _dim_role(d or "", name, axis)
            if role is None:
                problems.append(
                    f"input {name} axis {axis} has the dynamic dim {d!r}, which maps to no range; re-export "
                    "with the dims batch_size, sequence_length, past_sequence_length (Optimum's names)"
                )
                break
            for k in points:
                shape[k].append(points[k][role])
        else:
            profile[name] = shape
    problems += _static_conflicts(model, batch, seq, opt_phase)
    return profile, problems


def _static_conflicts(model, batch, seq, opt_phase) -> list[str]:
    """A static batch or sequence dim that the requested ranges do not match (e.g. an export with batch 1)."""
    points = _points(batch, seq, opt_phase)
    problems = []
    for name, (_, dims) in graph_inputs(model).items():
        for axis, d in enumerate(dims):
            if not isinstance(d, int):
                continue
            role = _dim_role("", name, axis)
            if role in ("batch", "new", "total", "past"):
                lo, hi = points["min"][role], points["max"][role]
                if not lo == hi == d:
                    flag = "batch" if role == "batch" else "seq"
                    problems.append(
                        f"input {name} axis {axis} is fixed at {d} in the ONNX but --{flag} asks for {lo}..{hi}; "
                        f"re-export with a dynamic {role} dim or pass a range that is exactly {d}"
                    )
    return problems


def shape_spec(profile: dict, point: str) -> str:
    """trtexec / ORT shape spec of one point: 'input_ids:1x1,attention_mask:1x1,...'."""
    return ",".join(f"{name}:{'x'.join(str(v) for v in s[point])}" for name, s in profile.items())


# ---------------------------------------------------------------------------------------------- pre-flight


def installed_tensorrt_version() -> str | None:
    try:
        import tensorrt as trt
    except Exception:  # absent, or its libraries fail to load
        return None
    return getattr(trt, "__version__", None)


def _walk_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:  # If / Loop / Scan bodies
            if attr.type == attr.GRAPH:
                yield from _walk_nodes(attr.g)
            for g in attr.graphs:
                yield from _walk_nodes(g)


def op_support(model, trt_version: str) -> dict:
    """{"ops": {op: count}, "unsupported": {op: reason}} of a graph for one TensorRT version."""
    version = version_tuple(trt_version)
    functions = {(f.domain, f.name) for f in model.functions}
    nodes = list(_walk_nodes(model.graph))
    for f in model.functions:  # local functions are inlined by the parser: their bodies count
        nodes += list(f.node)
    counts, unsupported = {}, {}
    for node in nodes:
        if (node.domain, node.op_type) in functions:
            continue
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
        if node.domain not in ("", "ai.onnx"):
            hint = _ORT_FUSION_HINT if node.domain == "com.microsoft" else "a custom-domain op needs a TensorRT plugin"
            unsupported[key] = hint
        elif node.op_type in _ORT_DEFAULT_DOMAIN_OPS:
            unsupported[key] = _ORT_FUSION_HINT
        elif node.op_type not in SUPPORTED_OPS:
            unsupported[key] = f"not in TensorRT's ONNX-parser support list ({trt_version})"
        elif version < _ADDED_IN.get(node.op_type, (10, 0)):
            added = ".".join(map(str, _ADDED_IN[node.op_type]))
            unsupported[key] = f"supported from TensorRT {added} on, targeted {trt_version}"
        elif node.op_type == "Attention" and (any(node.input[4:]) or any(node.output[1:])):
            unsupported[key] = "TensorRT's Attention does not take past_key/past_value inputs or present outputs"
    return {"ops": dict(sorted(counts.items())), "unsupported": unsupported}


def blocked_qdq_problems(model, trt_version: str) -> list[str]:
    """Weight-only blocked quantization (DequantizeLinear with block_size, opset 21; `--precision int4 --quant-format
    qdq`): TensorRT 10.0 and later parse INT4 block-quantized weights, 2-D and symmetric only (zero points 0)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    found, problems = 0, set()
    for n in _walk_nodes(model.graph):
        if n.op_type != "DequantizeLinear" or not any(a.name == "block_size" and a.i for a in n.attribute):
            continue
        found += 1
        w = inits.get(n.input[0])
        if w is None:
            problems.add("blocked DequantizeLinear of a non-constant input (TensorRT quantizes weights only)")
            continue
        if w.data_type not in (22, 21):  # INT4, UINT4
            problems.add(f"blocked quantization of element type {w.data_type} (TensorRT blocks INT4 weights only)")
        if len(w.dims) != 2:
            problems.add(f"blocked quantization of a {len(w.dims)}-D weight (TensorRT: 2-D weights only)")
        if len(n.input) > 2 and n.input[2]:
            zp = inits.get(n.input[2])
            if zp is None or w.data_type == 21 or numpy_helper.to_array(zp).any():
                problems.add("asymmetric weights (zero points): TensorRT takes symmetric quantization only; "
                             "export int4 without --asymmetric")  # fmt: skip
    if found and version_tuple(trt_version) < (10, 0):
        problems.add(f"INT4 block-quantized weights need TensorRT 10.0 or later, targeted {trt_version}")
    return sorted(problems)


def _onnx_opset(model) -> int | None:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return None


def resolve_onnx(onnx_dir) -> tuple[Path, dict]:
    """(model.onnx path, export.json contents or {}) of an export directory or a .onnx file."""
    onnx_path = find_onnx_model(onnx_dir)
    meta = {}
    export_json = onnx_path.parent / "export.json"
    if export_json.is_file():
        try:
            meta = json.loads(export_json.read_text())
        except ValueError:
            meta = {}
    return onnx_path, meta


def _max_positions(onnx_path: Path, meta: dict) -> int | None:
    for src in (meta, meta.get("config", {}) if isinstance(meta.get("config"), dict) else {}):
        if isinstance(src.get("max_position_embeddings"), int):
            return src["max_position_embeddings"]
    cfg = onnx_path.parent / "config.json"
    if cfg.is_file():
        try:
            v = json.loads(cfg.read_text()).get("max_position_embeddings")
            return v if isinstance(v, int) else None
        except ValueError:
            return None
    return None


def preflight(onnx_path, batch=DEFAULT_BATCH, seq=DEFAULT_SEQ, precision: str | None = None,
              trt_version: str | None = None, opt_phase: str = "decode", max_positions: int | None = None,
              model=None) -> dict:  # fmt: skip
    """Checks that need no TensorRT: op support for the installed (or targeted) version, dtypes against the
    requested precision, and range consistency. Returns a report; report["problems"] empty means buildable."""
    model = model if model is not None else _load_onnx(onnx_path)
    batch, seq = parse_range(batch, "batch"), parse_range(seq, "seq")
    installed = installed_tensorrt_version()
    target = trt_version or installed or DEFAULT_TARGET
    problems, warnings = [], []

    if version_tuple(target) < MIN_TENSORRT:
        problems.append(f"TensorRT {target} is older than 10.0, which strongly typed LLM engines need; use 10 or 11")
    if installed and trt_version and version_tuple(installed) != version_tuple(trt_version):
        warnings.append(f"checked against TensorRT {trt_version} but {installed} is installed")

    opset = _onnx_opset(model)
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        problems.append(f"ONNX opset {opset} is outside TensorRT's {MIN_OPSET}..{MAX_OPSET}; re-export with opset 20")

    ops = op_support(model, target)
    if ops["unsupported"]:
        by_reason = {}
        for op, why in sorted(ops["unsupported"].items()):
            by_reason.setdefault(why, []).append(op)
        listed = "; ".join(f"{', '.join(op_names)} ({why})" for why, op_names in by_reason.items())
        problems.append(f"ops TensorRT {target} cannot parse: {listed}")

    problems += blocked_qdq_problems(model, target)
    prec = graph_precision(model)
    if precision is not None and precision not in PRECISIONS:
        problems.append(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    elif precision is not None and prec["precision"] != precision:
        have = prec["precision"] or "unknown"
        problems.append(
            f"requested {precision} but the graph in {Path(str(onnx_path)).name} is {have} "
            f"(KV cache {prec['kv_cache']}, weights {prec['weights']}); strongly typed engines take precision "
            "from the ONNX: re-export with "
            f"`shortened export onnx --precision {precision}` or pass --precision {have}"
        )
    if len(prec["kv_cache"]) > 1:
        problems.append(f"KV-cache inputs mix types {prec['kv_cache']}; re-export the ONNX")
    if "float64" in prec["weights"]:
        warnings.append("float64 weights: TensorRT casts them down to float32")
    if prec["precision"] == "bf16":
        warnings.append("bf16 engines need an Ampere or newer GPU")

    problems += check_ranges(batch, seq, max_positions)
    profile = {}
    if not any(p.startswith(("--batch", "--seq")) for p in problems):
        profile, prof_problems = _derive(model, batch, seq, opt_phase)
        problems += prof_problems
    return {
        "ok": not problems,
        "problems": problems,
        "warnings": warnings,
        "tensorrt_target": target,
        "tensorrt_installed": installed,
        "opset": opset,
        "precision": prec,
        "ops": ops["ops"],
        "unsupported_ops": ops["unsupported"],
        "batch": list(batch),
        "seq": list(seq),
        "opt_phase": opt_phase,
        "profile": profile,
    }


# ---------------------------------------------------------------------------------------------- trtexec


def trtexec_command(onnx_path, engine_path, profile: dict, workspace_gb: float = DEFAULT_WORKSPACE_GB,
                    timing_cache=None, tf32: bool = False) -> list[str]:  # fmt: skip
    """The trtexec argv that builds the same engine as build_engine (strongly typed, one profile)."""
    argv = [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--saveEngine={engine_path}",
        "--stronglyTyped",  # TensorRT 10: precision from the ONNX types; TensorRT 11: always on, accepted
        f"--minShapes={shape_spec(profile, 'min')}",
        f"--optShapes={shape_spec(profile, 'opt')}",
        f"--maxShapes={shape_spec(profile, 'max')}",
        f"--memPoolSize=workspace:{int(round(workspace_gb * 1024))}",  # MiB
    ]
    if not tf32:
        argv.append("--noTF32")
    if timing_cache is not None:
        argv.append(f"--timingCacheFile={timing_cache}")
    argv.append("--skipInference")
    return argv


# ---------------------------------------------------------------------------------------------- TensorRT itself


def _device_info() -> dict:
    try:
        import torch

        if torch.cuda.is_available():
            i = torch.cuda.current_device()
            return {
                "name": torch.cuda.get_device_name(i),
                "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                "cuda": torch.version.cuda,
            }
    except Exception:
        pass
    return {"name": "unknown"}


def _write_bytes_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(memoryview(data))
    os.replace(tmp, path)


def build_engine(onnx_path, engine_path, profile: dict, timing_cache=None, workspace_gb: float = DEFAULT_WORKSPACE_GB,
                 tf32: bool = False, verbose: bool = False) -> dict:  # fmt: skip
    """Parse the ONNX (external-data weights included), build a strongly typed engine with one profile, write it
    atomically. The timing cache file is read when it exists and written back after the build. tf32=False keeps
    fp32 math in fp32 (TensorRT otherwise may use TF32 tensor cores for float32 layers)."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly is None else 1 << int(strongly))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads model.onnx.data next to it
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UsageError(f"TensorRT's ONNX parser rejected {onnx_path}: {' | '.join(errors) or 'no detail'}")

    dynamic = [
        network.get_input(i).name for i in range(network.num_inputs) if any(d < 0 for d in network.get_input(i).shape)
    ]
    missing = [n for n in dynamic if n not in profile]
    if missing:
        raise UsageError(f"the profile has no shapes for dynamic inputs {missing}; derive it from this ONNX")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    opt_profile = builder.create_optimization_profile()
    for name in dynamic:
        s = profile[name]
        opt_profile.set_shape(name, tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))
    config.add_optimization_profile(opt_profile)
    cache_path = Path(timing_cache) if timing_cache else None
    cache_hit = bool(cache_path and cache_path.is_file())
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_hit else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    if plan is None:
        raise UsageError(f"TensorRT could not build an engine from {onnx_path}; rerun with -v for the builder log")
    engine_path = Path(engine_path)
    _write_bytes_atomic(engine_path, plan)
    if cache_path:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        _write_bytes_atomic(cache_path, config.get_timing_cache().serialize())
    return {
        "engine": engine_path.name,
        "engine_bytes": engine_path.stat().st_size,
        "build_s": round(build_s, 2),
        "tensorrt_version": trt.__version__,
        "strongly_typed": True,
        "timing_cache": str(cache_path) if cache_path else None,
        "timing_cache_reused": cache_hit,
        "workspace_gb": workspace_gb,
        "tf32": tf32,
        "device": _device_info(),
    }


def export_tensorrt(onnx_dir, out, batch=DEFAULT_BATCH, seq=DEFAULT_SEQ, precision: str | None = None,
                    timing_cache=None, workspace_gb: float = DEFAULT_WORKSPACE_GB, check_only: bool = False,
                    force: bool = False, trt_version: str | None = None, opt_phase: str = "decode",
                    tf32: bool = False, verbose: bool = False) -> dict:  # fmt: skip
    """Pre-flight, then (unless check_only) build out/model.engine with out/trtexec.sh and out/build.json.

    Pre-flight problems and a missing TensorRT or GPU raise UsageError (exit 2) before anything is written.
    """
    onnx_path, meta = resolve_onnx(onnx_dir)
    key = None
    if out and not check_only:  # before the pre-flight: an output over its own input is refused first
        settings = dict(onnx=str(onnx_dir), batch=batch, seq=seq, precision=precision, timing_cache=timing_cache,
                        workspace_gb=workspace_gb, trt_version=trt_version, opt_phase=opt_phase, tf32=tf32)  # fmt: skip
        key = output_key({"ONNX export": onnx_path.parent}, settings)  # the timing cache is a setting: it changes
        if (done := up_to_date(out, key, force)) is not None:
            return done
        check_output_dir(out, force, inputs={"ONNX export": onnx_path.parent})
    if not workspace_gb or workspace_gb <= 0:
        raise UsageError(f"--workspace-gb must be positive, got {workspace_gb}")
    report = preflight(
        onnx_path, batch, seq, precision, trt_version, opt_phase, max_positions=_max_positions(onnx_path, meta)
    )
    if not report["ok"]:
        raise UsageError("pre-flight failed: " + "; ".join(report["problems"]))
    for w in report["warnings"]:
        log.warning(w)
    profile = report["profile"]
    engine_final = Path(out).resolve() / "model.engine" if out else Path("model.engine")
    argv = trtexec_command(onnx_path.resolve(), engine_final, profile, workspace_gb, timing_cache, tf32)
    result = {
        "onnx": str(onnx_path),
        "out": str(out) if out else None,
        "precision": report["precision"]["precision"],
        "profile": profile,
        "trtexec": shlex.join(argv),
        "preflight": {k: report[k] for k in ("ok", "problems", "warnings", "tensorrt_target", "unsupported_ops")},
    }
    if check_only:
        return {"check_only": True, **result}
    reason = tensorrt_unavailable_reason()
    if reason:
        raise UsageError(reason)
    record = {}
    with atomic_dir(out, force, inputs={"ONNX export": onnx_path.parent}, key=key, result=record) as tmp:
        built = build_engine(onnx_path, tmp / "model.engine", profile, timing_cache, workspace_gb, tf32, verbose)
        (tmp / "trtexec.sh").write_text("#!/bin/sh\n# builds the same engine as `shortened export tensorrt`\n"
                                        + " \\\n  ".join(shlex.quote(a) for a in argv) + "\n")  # fmt: skip
        record.update(result)
        record.update(built, batch=report["batch"], seq=report["seq"], opt_phase=opt_phase, onnx_export=meta or None)
        write_json(tmp / "build.json", record)
    return record


# ---------------------------------------------------------------------------------------------- ORT route


def ort_tensorrt_provider_options(cache_dir, profile: dict | None = None, fp16: bool = False,
                                  workspace_gb: float = DEFAULT_WORKSPACE_GB) -> dict:  # fmt: skip
    """Options for onnxruntime's TensorrtExecutionProvider: engine and timing caches in cache_dir, the explicit
    profile (shapes as trtexec writes them) and the workspace. fp16=True asks TensorRT 10 to consider fp16
    kernels for an fp32 graph (weak typing; TensorRT 11 builds from the ONNX types only)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    opts = {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
        "trt_fp16_enable": bool(fp16),
        "trt_max_workspace_size": int(workspace_gb * (1 << 30)),
    }
    if profile:
        opts["trt_profile_min_shapes"] = shape_spec(profile, "min")
        opts["trt_profile_opt_shapes"] = shape_spec(profile, "opt")
        opts["trt_profile_max_shapes"] = shape_spec(profile, "max")
    return opts


def ort_tensorrt_providers(onnx_path, cache_dir, batch=DEFAULT_BATCH, seq=DEFAULT_SEQ, fp16: bool = False,
                           workspace_gb: float = DEFAULT_WORKSPACE_GB) -> list:  # fmt: skip
    """The providers list for onnxruntime.InferenceSession: TensorRT first (profile derived from the ONNX), then
    CUDA and CPU for anything TensorRT does not take."""
    profile = derive_profile(onnx_path, batch, seq)
    opts = ort_tensorrt_provider_options(cache_dir, profile, fp16, workspace_gb)
    return [("TensorrtExecutionProvider", opts), "CUDAExecutionProvider", "CPUExecutionProvider"]
