"""TensorRT engines: everything decidable without TensorRT runs here (profile derivation on real exported graphs,
the trtexec command, op/dtype/range pre-flight, the clear error without TensorRT); the engine builds, parity and
speed run only where TensorRT and a CUDA GPU are present and are skipped elsewhere with the reason."""

from __future__ import annotations

import json
import shlex
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from shortened.cli import main
from shortened.errors import UsageError
from shortened.exporters import tensorrt as T

# ------------------------------------------------------------------------------------------------ helpers


def export_tiny_onnx(model_dir, out_dir, precision: str = "fp32"):
    """The project's exporter: out_dir/model.onnx with Optimum's names and named dims, plus export.json."""
    from shortened.exporters.onnx import export_onnx

    export_onnx(str(model_dir), out_dir, precision=precision, progress=False)
    return out_dir


def synthetic_graph(path, kv_type=TensorProto.FLOAT, weight_type=TensorProto.FLOAT, extra_nodes=(), opset=20,
                    extra_opsets=()):  # fmt: skip
    """A one-layer graph with the exported I/O names (no weights data needed): for dtype and op checks."""
    b, s, p, t = "batch_size", "sequence_length", "past_sequence_length", "past_sequence_length + sequence_length"
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [b, s]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [b, t]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, [b, s]),
        helper.make_tensor_value_info("past_key_values.0.key", kv_type, [b, 2, p, 4]),
        helper.make_tensor_value_info("past_key_values.0.value", kv_type, [b, 2, p, 4]),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", kv_type, [b, s, 8]),
        helper.make_tensor_value_info("present.0.key", kv_type, [b, 2, t, 4]),
        helper.make_tensor_value_info("present.0.value", kv_type, [b, 2, t, 4]),
    ]
    emb = helper.make_tensor("emb", weight_type, [8, 8], np.zeros(64).tolist())
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
        helper.make_node("MatMul", ["h", "emb"], ["logits0"]),
        helper.make_node("Cast", ["logits0"], ["logits"], to=kv_type),
        helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"]),
        helper.make_node("Identity", ["past_key_values.0.value"], ["present.0.value"]),
        *extra_nodes,
    ]
    graph = helper.make_graph(nodes, "g", inputs, outputs, [emb])
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, make_tiny):
    """A 2-block random LLaMA exported once for this module."""
    root = tmp_path_factory.mktemp("trt")
    return export_tiny_onnx(make_tiny("llama", root / "llama", layers=2), root / "onnx")


def _no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now raises ImportError


# ------------------------------------------------------------------------------------------------ CI (no TensorRT)


def test_profile_from_tiny_export(tiny_onnx):
    onnx_path = tiny_onnx / "model.onnx"
    prof = T.derive_profile(onnx_path, batch=(1, 4, 16), seq=(1, 64, 256))
    names = [v.name for v in onnx.load(str(onnx_path), load_external_data=False).graph.input]
    assert list(prof) == names  # every graph input, in order
    assert prof["input_ids"] == {"min": [1, 1], "opt": [4, 1], "max": [16, 256]}
    assert prof["position_ids"] == prof["input_ids"]
    assert prof["attention_mask"] == {"min": [1, 1], "opt": [4, 64], "max": [16, 256]}
    kv = prof["past_key_values.1.value"]
    assert kv == {"min": [1, 2, 0, 16], "opt": [4, 2, 63, 16], "max": [16, 2, 255, 16]}
    for point in ("min", "opt"):  # the min and opt points are real steps: mask = past + new
        assert prof["attention_mask"][point][1] == kv[point][2] + prof["input_ids"][point][1]
    pre = T.derive_profile(onnx_path, batch=(1, 4, 16), seq=(1, 64, 256), opt_phase="prefill")
    assert pre["input_ids"]["opt"] == [4, 64] and pre["past_key_values.0.key"]["opt"] == [4, 2, 0, 16]


def test_trtexec_command_matches_profile(tiny_onnx, tmp_path):
    onnx_path = tiny_onnx / "model.onnx"
    prof = T.derive_profile(onnx_path, batch=(1, 2, 8), seq=(1, 16, 128))
    argv = T.trtexec_command(onnx_path, tmp_path / "model.engine", prof, workspace_gb=2, timing_cache="tc.bin")
    assert argv[0] == "trtexec" and f"--onnx={onnx_path}" in argv and "--stronglyTyped" in argv
    assert "--memPoolSize=workspace:2048" in argv and "--timingCacheFile=tc.bin" in argv and "--noTF32" in argv
    assert "--noTF32" not in T.trtexec_command(onnx_path, "e", prof, tf32=True)
    shapes = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.startswith(("--min", "--opt", "--max"))}
    opt = dict(item.rsplit(":", 1) for item in shapes["--optShapes"].split(","))
    assert opt["input_ids"] == "2x1" and opt["attention_mask"] == "2x16" and opt["past_key_values.0.key"] == "2x2x15x16"
    mins = dict(item.rsplit(":", 1) for item in shapes["--minShapes"].split(","))
    assert set(mins) == set(prof) and mins["past_key_values.1.key"] == "1x2x0x16"
    assert shlex.split(shlex.join(argv)) == argv  # what trtexec.sh holds round-trips through the shell


def test_preflight_passes_tiny_export_and_cli_check_only(tiny_onnx, capsys):
    rep = T.preflight(tiny_onnx / "model.onnx", precision="fp32", trt_version="10.0")
    assert rep["ok"], rep["problems"]
    assert rep["precision"]["precision"] == "fp32" and rep["precision"]["kv_cache"] == ["float32"]
    assert {"MatMul", "Softmax"} <= set(rep["ops"]) and not rep["unsupported_ops"]
    assert main(["export", "tensorrt", str(tiny_onnx), "--check-only", "--batch", "1:2:4", "--seq", "1:8:64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["check_only"] and out["preflight"]["ok"] and out["profile"]["input_ids"]["max"] == [4, 64]
    assert out["trtexec"].startswith("trtexec --onnx=")


def test_preflight_reports_unsupported_ops(tmp_path):
    unique = helper.make_node("Unique", ["h"], ["u"])  # not in TensorRT's parser list
    gqa = helper.make_node("GroupQueryAttention", ["h"], ["g"], domain="com.microsoft")  # ORT fusions (--optimize)
    norm = helper.make_node("SimplifiedLayerNormalization", ["h", "emb"], ["n"])  # ORT's, in the default domain
    extra = [unique, gqa, norm]
    path = synthetic_graph(tmp_path / "bad.onnx", extra_nodes=extra, extra_opsets=[("com.microsoft", 1)])
    rep = T.preflight(path, batch=(1, 1, 2), seq=(1, 4, 8), trt_version="10.15")
    assert not rep["ok"]
    assert set(rep["unsupported_ops"]) == {
        "Unique",
        "com.microsoft::GroupQueryAttention",
        "SimplifiedLayerNormalization",
    }
    assert "without --optimize" in rep["unsupported_ops"]["com.microsoft::GroupQueryAttention"]
    assert "SimplifiedLayerNormalization, com.microsoft::GroupQueryAttention (onnxruntime-only" in rep["problems"][0]
    with pytest.raises(UsageError, match="Unique"):
        T.export_tensorrt(path, tmp_path / "engine", batch=(1, 1, 2), seq=(1, 4, 8), check_only=True)
    assert not (tmp_path / "engine").exists()


def test_preflight_op_support_depends_on_version(tmp_path):
    rms = helper.make_node("RMSNormalization", ["h", "emb"], ["r"])
    attn = helper.make_node("Attention", ["h", "h", "h", "", "past_key_values.0.key", "past_key_values.0.value"],
                            ["a", "pk", "pv"])  # fmt: skip
    path = synthetic_graph(tmp_path / "g.onnx", extra_nodes=[rms, attn], opset=23)
    old = T.preflight(path, batch=(1, 1, 2), seq=(1, 4, 8), trt_version="10.14")["unsupported_ops"]
    assert "10.15" in old["RMSNormalization"]
    assert "past_key" in old["Attention"]  # Attention exists in 10.14, but not with a KV cache
    new = T.preflight(path, batch=(1, 1, 2), seq=(1, 4, 8), trt_version="11.0")["unsupported_ops"]
    assert "RMSNormalization" not in new and "Attention" in new


def test_preflight_precision_mismatch(tmp_path):
    fp16 = synthetic_graph(tmp_path / "fp16.onnx", TensorProto.FLOAT16, TensorProto.FLOAT16)
    rep = T.preflight(fp16, batch=(1, 1, 2), seq=(1, 4, 8), precision="fp16")
    assert rep["ok"] and rep["precision"]["precision"] == "fp16"
    rep = T.preflight(fp16, batch=(1, 1, 2), seq=(1, 4, 8), precision="fp32")
    assert not rep["ok"] and "requested fp32" in rep["problems"][0] and "--precision fp16" in rep["problems"][0]
    mixed = synthetic_graph(tmp_path / "mixed.onnx", TensorProto.FLOAT, TensorProto.FLOAT16)
    rep = T.preflight(mixed, batch=(1, 1, 2), seq=(1, 4, 8), precision="fp16")
    assert not rep["ok"] and "graph in mixed.onnx is fp32" in rep["problems"][0]  # the KV cache type decides


def test_preflight_range_consistency(tmp_path, tiny_onnx):
    path = synthetic_graph(tmp_path / "g.onnx")
    probs = T.preflight(path, batch=(4, 2, 8), seq=(0, 4, 8))["problems"]
    assert any("--batch must satisfy min <= opt <= max" in p for p in probs)
    assert any("--seq minimum must be at least 1" in p for p in probs)
    probs = T.preflight(tiny_onnx / "model.onnx", seq=(1, 128, 4096), max_positions=512)["problems"]
    assert probs == ["--seq max 4096 exceeds the model's max_position_embeddings 512; lower --seq"]
    with pytest.raises(UsageError, match="max_position_embeddings 512"):  # read from the export directory
        T.export_tensorrt(tiny_onnx, tmp_path / "e", seq=(1, 128, 4096), check_only=True)
    with pytest.raises(UsageError, match="min <= opt <= max"):
        T.derive_profile(path, batch=(1, 8, 4))
    with pytest.raises(UsageError, match="MIN:OPT:MAX"):
        T.parse_range("1:2", "seq")
    assert T.parse_range("8") == (8, 8, 8)


def test_profile_rejects_static_and_unknown_dims(tmp_path):
    path = synthetic_graph(tmp_path / "g.onnx")
    m = onnx.load(str(path))
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # input_ids exported with batch 1
    m.graph.input[3].type.tensor_type.shape.dim[1].dim_param = "heads"  # a dim no range describes
    onnx.save(m, str(tmp_path / "static.onnx"))
    with pytest.raises(UsageError) as e:
        T.derive_profile(tmp_path / "static.onnx", batch=(1, 2, 4), seq=(1, 4, 8))
    assert "input_ids axis 0 is fixed at 1" in str(e.value) and "'heads'" in str(e.value)
    prof, problems = T._derive(m, (1, 1, 1), (1, 4, 8), "decode")  # batch exactly 1 matches the static dim
    assert prof["input_ids"]["max"] == [1, 8] and len(problems) == 1 and "'heads'" in problems[0]


def test_clear_error_without_tensorrt(tiny_onnx, tmp_path, monkeypatch, capsys):
    _no_tensorrt(monkeypatch)
    reason = T.tensorrt_unavailable_reason()
    assert reason.startswith("TensorRT is not installed") and "pip install tensorrt" in reason
    code = main(["export", "tensorrt", str(tiny_onnx), "--out", str(tmp_path / "engine"), "--seq", "1:8:64"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "TensorRT is not installed" in err
    assert not (tmp_path / "engine").exists()  # nothing written
    from shortened.runtime.tensorrt import TrtRunner

    with pytest.raises(UsageError, match="TensorRT is not installed"):
        TrtRunner(tmp_path)


def test_cli_needs_out_unless_check_only(tiny_onnx, capsys):
    assert main(["export", "tensorrt", str(tiny_onnx)]) == 2
    assert "--out is required" in capsys.readouterr().err
    assert main(["export", "tensorrt", str(tiny_onnx / "missing"), "--check-only"]) == 2
    assert "not found" in capsys.readouterr().err


def test_ort_tensorrt_provider_options(tiny_onnx, tmp_path):
    provs = T.ort_tensorrt_providers(tiny_onnx / "model.onnx", tmp_path / "cache", batch=(1, 1, 2), seq=(1, 8, 32))
    name, opts = provs[0]
    assert name == "TensorrtExecutionProvider" and provs[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert opts["trt_engine_cache_enable"] and opts["trt_engine_cache_path"] == str(tmp_path / "cache")
    assert (tmp_path / "cache").is_dir() and opts["trt_fp16_enable"] is False
    assert "input_ids:1x1" in opts["trt_profile_min_shapes"] and "attention_mask:2x32" in opts["trt_profile_max_shapes"]


# ------------------------------------------------------------------------------------------------ integration


@pytest.mark.integration
def test_profile_from_pruned_smollm2_export(smollm2_24_onnx):
    """SmolLM2-135M pruned to 24 blocks and exported: the profile covers 3 + 48 inputs with its real KV shape."""
    _, onnx_dir = smollm2_24_onnx
    rep = T.preflight(onnx_dir / "model.onnx", batch=(1, 8, 32), seq=(1, 128, 2048), precision="fp32")
    assert rep["ok"], rep["problems"]
    prof = rep["profile"]
    assert len(prof) == 3 + 2 * 24
    assert prof["past_key_values.23.value"] == {"min": [1, 3, 0, 64], "opt": [8, 3, 127, 64], "max": [32, 3, 2047, 64]}
    assert prof["attention_mask"]["max"] == [32, 2048] and prof["input_ids"]["opt"] == [8, 1]
    cmd = T.trtexec_command(onnx_dir / "model.onnx", "model.engine", prof)
    assert sum(a.count("past_key_values.") for a in cmd) == 3 * 48
    with pytest.raises(UsageError, match="max_position_embeddings 8192"):  # from the export's config.json
        T.export_tensorrt(onnx_dir, "unused", seq=(1, 128, 16384), check_only=True)


# ------------------------------------------------------------------------------------------------ GPU (TensorRT)


@pytest.fixture(scope="module")
def gpu():
    reason = T.tensorrt_unavailable_reason(runtime=True)
    if reason:
        pytest.skip(f"needs TensorRT and a CUDA GPU: {reason}")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_build_parity_and_speed(gpu, precision, tmp_path_factory, capsys, make_tiny):
    """Build a tiny LLaMA engine, check it against the fp32 PyTorch model with the parity validator's named
    tolerances (left-padded batch, cached decode), and time a greedy run."""
    import torch
    from transformers import AutoModelForCausalLM

    from shortened.runtime.base import greedy_generate
    from shortened.runtime.tensorrt import TrtRunner
    from shortened.runtime.torch_runner import TorchRunner
    from shortened.validators.parity import compare, tolerances_for

    root = tmp_path_factory.mktemp(f"trt-{precision}")
    model_dir = make_tiny("llama", root / "llama", layers=2)
    onnx_dir = export_tiny_onnx(model_dir, root / "onnx", precision)
    cache = root / "timing.cache"
    kw = dict(batch=(1, 2, 4), seq=(1, 32, 128), timing_cache=cache, workspace_gb=1)
    rec = T.export_tensorrt(onnx_dir, root / "engine", precision=precision, **kw)
    assert (root / "engine" / "model.engine").is_file() and cache.is_file() and not rec["timing_cache_reused"]
    assert json.loads((root / "engine" / "build.json").read_text())["precision"] == precision
    assert (root / "engine" / "trtexec.sh").read_text().count("--stronglyTyped") == 1
    assert T.export_tensorrt(onnx_dir, root / "engine2", **kw)["timing_cache_reused"]

    ref = TorchRunner(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).cuda())
    trt = TrtRunner(root / "engine")
    ids = np.random.default_rng(0).integers(3, 250, (2, 12))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    m = compare(greedy_generate(ref, ids, mask, 16), greedy_generate(trt, ids, mask, 16), mask, 16)
    assert tolerances_for(precision).check(m) == [], m

    gen = greedy_generate(trt, ids[:1], mask[:1], 64)
    assert gen.tokens.shape == (1, 64)
    with capsys.disabled():
        speed = f"prefill {gen.prefill_s * 1000:.2f} ms, {63 / sum(gen.decode_s):.0f} decode tok/s"
        print(f"\nTensorRT {precision}: max|d| {m['max_abs']:.2e}, kl {m['kl']:.1e}; {speed} on {trt.providers()[1]}")
    trt.close()


def test_validate_parity_backend_tensorrt_without_tensorrt_is_exit_2(tmp_path, capsys):
    from shortened.cli import main

    code = main(["validate", "parity", "--reference", str(tmp_path), "--onnx", str(tmp_path), "--backend", "tensorrt"])
    assert code == 2 and "--engine" in capsys.readouterr().err
