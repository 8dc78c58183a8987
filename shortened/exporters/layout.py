"""The files and names of an export in Optimum's layout: model.onnx (+ model.onnx.data), export.json, the KV-cache
input/output names and shapes, and saving a graph with external data. Shared by the exporter and the quantizer."""

from __future__ import annotations

from pathlib import Path

from shortened.model.families import geometry

ONNX_FILE = "model.onnx"


DATA_FILE = "model.onnx.data"


RECORD_FILE = "export.json"


MIN_EXTERNAL_BYTES = 1024  # smaller tensors always stay in model.onnx


PROTOBUF_LIMIT = 2**31 - 1  # a single ONNX protobuf cannot exceed 2 GB: larger models must use external data


def kv_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return past, present


def cache_geometry(config) -> tuple[int, int, int, int]:
    """(num_layers, num_attention_heads, num_key_value_heads, head_dim) of a supported family's config."""
    g = geometry(config)
    return g.layers, g.heads, g.kv_heads, g.head_dim


def _weight_bytes(model) -> int:
    return sum(int(t.const_value.nbytes) for t in model.graph.initializers.values() if t.const_value is not None)


def save_graph(model, path: Path, threshold: int | None) -> bool:
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
