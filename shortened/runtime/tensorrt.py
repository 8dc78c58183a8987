"""TensorRT runner: one deserialized engine, one execution context, shapes set per call, the KV cache on the GPU.

Device buffers are torch CUDA tensors (no pycuda): inputs are copied to the device, outputs are allocated at the
shapes the context reports once every input shape is set, and `present.*` outputs become the next step's
`past_key_values.*` inputs without leaving the device. Needs TensorRT 10+ and a CUDA build of torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shortened.errors import UsageError
from shortened.runtime.base import Runner


def _torch_dtype(trt, dtype):
    import torch

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.BOOL: torch.bool,
        trt.DataType.INT8: torch.int8,
        trt.DataType.UINT8: torch.uint8,
    }
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    if dtype not in table:
        raise UsageError(f"engine I/O type {dtype} has no torch equivalent; rebuild from a float32/float16 ONNX")
    return table[dtype]


def engine_path(path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "model.engine"
    if not p.is_file():
        raise UsageError(f"no TensorRT engine at {path}; build one with `shortened export tensorrt`")
    return p


class TrtRunner(Runner):
    name = "tensorrt"

    def __init__(self, engine, device: str = "cuda", verbose: bool = False):

        trt = require_tensorrt(runtime=True)
        import torch

        self.trt, self.torch = trt, torch
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise UsageError(f"the TensorRT runner runs on a CUDA device, got --device {device}")
        torch.cuda.set_device(self.device)
        self.logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_path(engine).read_bytes())
        if self.engine is None:
            raise UsageError(
                f"TensorRT {trt.__version__} could not load {engine}: engines only load on the TensorRT version and "
                "GPU kind that built them; rebuild it here with `shortened export tensorrt`"
            )
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.num_layers = sum(1 for n in self.inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        self.has_cache = self.num_layers > 0
        if "logits" not in self.outputs or "input_ids" not in self.inputs:
            raise UsageError(f"{engine} does not have the input_ids -> logits I/O of an exported causal LM")
        kv = tuple(self.engine.get_tensor_shape("past_key_values.0.key")) if self.num_layers else ()
        self.kv_heads, self.head_dim = (kv[1], kv[3]) if len(kv) == 4 else (0, 0)
        self._dummy = torch.empty(1, dtype=torch.uint8, device=self.device)  # address for zero-size tensors

    def providers(self) -> list[str]:
        return [f"TensorRT {self.trt.__version__}", self.torch.cuda.get_device_name(self.device)]

    def profile_range(self, name: str):
        """(min, opt, max) shapes of an input in the engine's single optimization profile."""
        return tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0))

    def _check_shape(self, name: str, shape) -> None:
        lo, _, hi = self.profile_range(name)
        if any(not a <= v <= b for v, a, b in zip(shape, lo, hi)):
            raise UsageError(
                f"{name} shape {list(shape)} is outside the engine's profile {list(lo)}..{list(hi)}; rebuild the "
                "engine with wider --batch/--seq ranges"
            )

    def _address(self, t) -> int:
        return t.data_ptr() if t.numel() else self._dummy.data_ptr()

    def step(self, input_ids, attention_mask, position_ids, cache=None):
        torch = self.torch
        batch = input_ids.shape[0]
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        with torch.cuda.stream(self.stream):
            tensors = {}
            for name in self.inputs:
                if name in feeds:
                    arr = np.ascontiguousarray(feeds[name])
                    tensors[name] = torch.from_numpy(arr).to(self.device, self.dtypes[name], non_blocking=False)
                elif name.startswith("past_key_values."):
                    _, layer, kind = name.split(".")
                    if cache is None:  # first step: an empty cache
                        shape = (batch, self.kv_heads, 0, self.head_dim)
                        tensors[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                    else:
                        tensors[name] = cache[int(layer)][0 if kind == "key" else 1]
                else:
                    raise UsageError(f"the engine has an input {name} this runner does not know how to feed")
            for name, t in tensors.items():
                self._check_shape(name, t.shape)
                if not self.context.set_input_shape(name, tuple(t.shape)):
                    raise UsageError(f"TensorRT rejected the shape {list(t.shape)} of {name}")
                self.context.set_tensor_address(name, self._address(t))
            outs = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise UsageError(f"output {name} has no known shape after setting the inputs: {shape}")
                outs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                self.context.set_tensor_address(name, self._address(outs[name]))
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed; rerun with verbose=True for the log")
        self.stream.synchronize()
        logits = outs["logits"].float().cpu().numpy()
        new_cache = [(outs[f"present.{i}.key"], outs[f"present.{i}.value"]) for i in range(self.num_layers)]
        return logits, new_cache

    def close(self) -> None:
        self.context = None
        self.engine = None
        self.runtime = None


def tensorrt_unavailable_reason(runtime: bool = False) -> str | None:
    """None when TensorRT (10+) and a GPU it can use are here; otherwise one line saying what is missing and how
    to get it. runtime=True also needs torch with CUDA (the runner's device buffers are torch CUDA tensors)."""
    try:
        import tensorrt as trt
    except ImportError:
        return f"TensorRT is not installed (no `tensorrt` Python package): {INSTALL_HINT}"
    except OSError as e:  # the package is there but its CUDA libraries are not
        return f"TensorRT is installed but its libraries failed to load ({e}): {INSTALL_HINT}"
    version = getattr(trt, "__version__", "0.0")
    if version_tuple(version) < MIN_TENSORRT:
        return f"TensorRT {version} is too old (10.0 or newer needed): pip install -U tensorrt"
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return None
    if runtime:
        return (
            "no CUDA GPU visible to torch (torch.cuda.is_available() is False): the TensorRT runner needs an "
            "NVIDIA GPU and a CUDA build of torch"
        )
    try:  # no CUDA torch: ask TensorRT itself whether it can reach a GPU
        ok = trt.Builder(trt.Logger(trt.Logger.ERROR)) is not None
    except Exception:
        ok = False
    return None if ok else "no NVIDIA GPU usable by TensorRT (CUDA initialization failed): run on a machine with one"


def require_tensorrt(runtime: bool = False):
    """Import and return the tensorrt module, or raise UsageError (exit 2) with the one-line reason."""
    reason = tensorrt_unavailable_reason(runtime)
    if reason:
        raise UsageError(reason)
    import tensorrt as trt

    return trt


MIN_TENSORRT = (10, 0)


INSTALL_HINT = "install it with `pip install tensorrt` (TensorRT 10 or 11) on a machine with an NVIDIA GPU and driver"


def version_tuple(v: str | None) -> tuple[int, int]:
    try:
        major, minor = (str(v).split(".") + ["0"])[:2]
        return int(major), int(minor)
    except ValueError:
        raise UsageError(f"TensorRT version must look like 10.15 or 11.0, got {v!r}") from None
