"""An exported ONNX causal LM in onnxruntime behind the Runner interface.

The graph follows Optimum's names: inputs input_ids, attention_mask, (position_ids), past_key_values.{i}.key /
.value; outputs logits, present.{i}.key / .value. The cache stays in onnxruntime: each step binds the previous
step's `present` OrtValues as the next step's `past_key_values` through IOBinding, so on a GPU provider it never
leaves the device. A graph without cache inputs also works: the runner then re-runs the whole sequence each step.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from shortened.errors import UsageError
from shortened.model.families import geometry
from shortened.runtime.base import Runner

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")


def import_ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise UsageError("onnxruntime is not installed: pip install 'shortened[onnx]' (or onnxruntime-gpu)") from e
    return onnxruntime


def find_onnx_model(path: str | Path) -> Path:
    """The model file of an export directory (model.onnx, or its only .onnx file), or the .onnx file itself."""
    p = Path(path)
    if p.is_file() and p.suffix == ".onnx":
        return p
    if not p.is_dir():
        raise UsageError(f"ONNX model {path} not found; pass the directory written by `shortened export onnx`")
    if (p / "model.onnx").is_file():
        return p / "model.onnx"
    found = sorted(p.glob("*.onnx"))
    if len(found) != 1:
        raise UsageError(f"{path} holds no model.onnx; pass the directory written by `shortened export onnx`")
    return found[0]


_ELEM_NAMES = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64", 6: "int32", 7: "int64", 9: "bool"}
_ELEM_BYTES = {1: 4, 10: 2, 16: 2, 11: 8}


def graph_precision(model) -> dict:
    """The float types of an onnx ModelProto: KV-cache inputs, logits output and the weights (shares by bytes);
    "precision" (fp32, fp16, bf16 or None) is the KV cache's single type, else that of most weight bytes."""
    inits = {i.name for i in model.graph.initializer}
    kv = sorted({_ELEM_NAMES.get(t, str(t)) for v in model.graph.input
                 if v.name.startswith("past_key_values.") and v.name not in inits
                 for t in (v.type.tensor_type.elem_type,)})  # fmt: skip
    outs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    weight_bytes = {}
    for init in model.graph.initializer:
        if init.data_type in _ELEM_BYTES:
            n = 1
            for d in init.dims:
                n *= d
            name = _ELEM_NAMES[init.data_type]
            weight_bytes[name] = weight_bytes.get(name, 0) + n * _ELEM_BYTES[init.data_type]
    total = sum(weight_bytes.values()) or 1
    weights = {k: round(v / total, 4) for k, v in sorted(weight_bytes.items(), key=lambda kv: -kv[1])}
    dominant = next(iter(weights), None)
    graph = kv[0] if len(kv) == 1 else dominant
    name = {v: k for k, v in {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.items()}.get(graph)
    return {
        "precision": name,
        "kv_cache": kv,
        "logits": _ELEM_NAMES.get(outs.get("logits"), None),
        "weights": weights,
    }


def choose_providers(provider: str | None = None) -> list[str]:
    """Execution providers to request: CUDA where present else CPU (auto), or the one asked for, CPU as fallback.

    TensorRT only when asked for: its execution provider builds an engine per new input shape, which takes minutes.
    """
    ort = import_ort()
    available = ort.get_available_providers()
    if provider in (None, "auto"):
        first = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []
    else:
        name = PROVIDER_NAMES.get(provider.lower(), provider)
        if name not in available:
            raise UsageError(
                f"execution provider {name} is not available in this onnxruntime (it has {', '.join(available)}); "
                f"install onnxruntime-gpu for cuda/tensorrt, or use --provider cpu"
            )
        first = [name] + (["CUDAExecutionProvider"] if name == "TensorrtExecutionProvider" else [])
    return list(dict.fromkeys([*first, "CPUExecutionProvider"]))


def check_external_data(model_path: str | Path) -> None:
    """Every tensor the graph keeps in external files (model.onnx.data) must lie within those files; a truncated
    or missing data file is one line here instead of onnxruntime's C++ log."""
    import onnx

    model_path = Path(model_path)
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:
        raise UsageError(f"cannot read {model_path} as ONNX ({type(e).__name__}); re-export the model") from e
    need: dict = {}
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        need[info.get("location", "")] = max(need.get(info.get("location", ""), 0), end)
    for name, end in need.items():
        f = model_path.parent / name
        if not f.is_file():
            raise UsageError(f"{f} is missing: {model_path.name} keeps its weights there; copy the whole export")
        if f.stat().st_size < end:
            raise UsageError(f"{f} is truncated: {f.stat().st_size} bytes, the graph needs {end}; copy or re-export "
                             "the whole export")  # fmt: skip


def make_session(model_path: str | Path, provider: str | None = None, threads: int | None = None):
    """An InferenceSession with thread spinning off (steady latency, no busy cores between steps)."""
    ort = import_ort()
    check_external_data(model_path)
    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: a failure is reported as one line below, not as the C++ log
    if threads:
        so.intra_op_num_threads = int(threads)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(model_path), sess_options=so, providers=choose_providers(provider))
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"onnxruntime cannot load {model_path}: {str(e).splitlines()[0]}") from e


class OrtRunner(Runner):
    name = "onnxruntime"

    def __init__(self, session, config: dict | None = None):
        self.session = session
        ins = {i.name: i for i in session.get_inputs()}
        self.input_types = {n: _NP_TYPES.get(i.type, np.float32) for n, i in ins.items()}
        past = sorted((int(m[1]), m[2] != "key", n) for n in ins if (m := _PAST.match(n)))
        self.past_names = [n for _, _, n in past]
        self.present_names = [n.replace("past_key_values", "present") for n in self.past_names]
        outs = [o.name for o in session.get_outputs()]
        missing = [n for n in self.present_names if n not in outs]
        if missing:
            raise UsageError(f"the ONNX graph has cache inputs but no output {missing[0]}; re-export the model")
        self.logits_name = "logits" if "logits" in outs else outs[0]
        self.num_layers = len(self.past_names) // 2
        self.has_cache = bool(self.past_names)
        self.device = "cuda" if session.get_providers()[0] != "CPUExecutionProvider" else "cpu"
        if self.has_cache:
            self.past_dtype = self.input_types[self.past_names[0]]
            self.kv_heads, self.head_dim = _kv_dims(ins[self.past_names[0]].shape, config or {})

    def _feed(self, input_ids, attention_mask, position_ids) -> dict:
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        return {k: np.ascontiguousarray(v, dtype=self.input_types[k]) for k, v in feed.items() if k in self.input_types}

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache=None):
        if not self.has_cache:
            return self._step_without_cache(input_ids, attention_mask, position_ids, cache)
        io = self.session.io_binding()
        for k, v in self._feed(input_ids, attention_mask, position_ids).items():
            io.bind_cpu_input(k, v)
        if cache is None:
            empty = np.zeros((input_ids.shape[0], self.kv_heads, 0, self.head_dim), self.past_dtype)
            for n in self.past_names:
                io.bind_cpu_input(n, empty)
        else:
            for n, v in zip(self.past_names, cache):
                io.bind_ortvalue_input(n, v)
        io.bind_output(self.logits_name, "cpu")
        for n in self.present_names:
            io.bind_output(n, self.device)
        self.session.run_with_iobinding(io)
        outs = io.get_outputs()
        return outs[0].numpy().astype(np.float32, copy=False), outs[1:]

    def _step_without_cache(self, input_ids, attention_mask, position_ids, history):
        """A graph without a cache: the 'cache' is the token history, and the whole sequence runs again."""
        if history is not None:
            input_ids = np.concatenate([history[0], input_ids], axis=1)
            position_ids = np.concatenate([history[1], position_ids], axis=1)
        new = position_ids.shape[1] if history is None else position_ids.shape[1] - history[1].shape[1]
        feed = self._feed(input_ids, attention_mask, position_ids)
        logits = self.session.run([self.logits_name], feed)[0]
        return logits[:, -new:].astype(np.float32, copy=False), (input_ids, position_ids)

    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def close(self) -> None:
        self.session = None


def _kv_dims(shape, config: dict) -> tuple[int, int]:
    """(kv heads, head dim) of the cache: the graph's static dims, else config.json."""
    if len(shape) == 4 and isinstance(shape[1], int) and isinstance(shape[3], int):
        return shape[1], shape[3]
    g = geometry(config)
    return g.kv_heads, g.head_dim


def load_ort_runner(path: str | Path, provider: str | None = None, threads: int | None = None) -> OrtRunner:
    """An OrtRunner for an export directory (or .onnx file); its config.json fills in dims the graph leaves open."""
    model = find_onnx_model(path)
    cfg_path = model.parent / "config.json"
    config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    return OrtRunner(make_session(model, provider, threads), config)
