"""int4/int8 weight-only exports (onnxruntime's MatMulNBits quantizer), their parity against fp32 PyTorch, and
perplexity through the exported artifact. Tiny models only; one fp32 export per family, quantized twice."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from shortened.cli import main
from shortened.errors import UsageError

FAMILY_GRAPHS = {"llama": True, "qwen2": False, "mistral": True}  # optimize: fused (GQA) graph or portable
PARITY = dict(batch_sizes=(1, 2), seq_lens=(12,), new_tokens=6, progress=False)


@pytest.fixture(scope="module")
def small_models(tmp_path_factory, make_tiny):
    """2-block random models (the tracing time grows with the blocks; 2 are enough to quantize and compare)."""
    root = tmp_path_factory.mktemp("q-models")
    return {fam: make_tiny(fam, root / fam, layers=2) for fam in FAMILY_GRAPHS}


@pytest.fixture(scope="module")
def fp32_exports(small_models, tmp_path_factory):
    from shortened.exporters.onnx import export_onnx

    root = tmp_path_factory.mktemp("q-fp32")
    out = {}
    for fam, optimize in FAMILY_GRAPHS.items():
        export_onnx(str(small_models[fam]), root / fam, optimize=optimize, progress=False)
        out[fam] = root / fam
    return out


def _ops(path):
    return [n.op_type for n in onnx.load(str(path / "model.onnx"), load_external_data=False).graph.node]


@pytest.mark.parametrize("family", list(FAMILY_GRAPHS))
def test_int4_and_int8_exports_pass_their_parity_defaults(family, small_models, fp32_exports, tmp_path):
    from shortened.exporters.quantize import quantize_export
    from shortened.validators.parity import DEFAULT_TOLERANCES, validate_parity

    sizes = {"fp32": json.loads((fp32_exports[family] / "export.json").read_text())["size_bytes"]}
    for precision in ("int4", "int8"):
        out = tmp_path / precision
        summary = quantize_export(fp32_exports[family], out, precision)
        q = json.loads((out / "export.json").read_text())["quantization"]
        assert q["bits"] == int(precision[3]) and q["block_size"] == 32 and q["head_bits"] == 8
        assert q["method"] == {"int4": "hqq", "int8": "rtn"}[precision]
        assert q["head_quantized"] and q["quantized_matmuls"] == q["matmuls"]
        ops = _ops(out)
        # every MatMul with a constant weight (attention's stay), gate and up packed into one node
        assert ops.count("MatMulNBits") + q["packed_matmuls"] == q["matmuls"]
        assert ("GroupQueryAttention" in ops) == FAMILY_GRAPHS[family]
        assert (out / "genai_config.json").is_file() and (out / "tokenizer.json").is_file()
        sizes[precision] = summary["size_bytes"]
        rep = validate_parity(str(small_models[family]), out, **PARITY)
        assert rep.precision == precision and rep.tolerances == DEFAULT_TOLERANCES[precision]
        assert rep.passed, rep.table()
        assert all(c.mean_kl > 0 for c in rep.cases)  # the quantized model really differs from fp32
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"]


def test_export_int4_cli_and_a_wrongly_quantized_weight_fails_parity(small_models, tmp_path, capsys):
    src = str(small_models["llama"])
    out = tmp_path / "int4"
    assert main(["export", "onnx", src, "--out", str(out), "--precision", "int4", "--optimize"]) == 0
    rec = json.loads((out / "export.json").read_text())
    assert rec["precision"] == "int4" and rec["optimize"]["graph"] == "fused"
    q = rec["quantization"]
    assert q["accuracy_level"] == 4 and q["method"] == "hqq" and q["head_bits"] == 8 and q["head_method"] == "rtn"
    assert rec["quantization"]["padded_rel_diff_vs_torch_fp32"] < 1
    args = ["validate", "parity", "--reference", src, "--batch-sizes", "1,2", "--seq-lens", "12", "--new-tokens", "6"]
    assert main([*args, "--onnx", str(out)]) == 0
    capsys.readouterr()
    # one weight quantized wrongly: the scales of one MLP projection doubled
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    model = onnx.load(str(bad / "model.onnx"))
    name = next(n.input[2] for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[2].startswith("val"))
    init = next(t for t in model.graph.initializer if t.name == name)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init, str(bad)) * 2, name))
    onnx.save(model, str(bad / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    assert main([*args, "--onnx", str(bad)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_tied_embedding_is_gathered_from_the_quantized_head(tmp_path, char_tokenizer, tiny_config):
    """A tied model (SmolLM2's layout): the embedding reads the head's int4/int8 table (GatherBlockQuantized), no fp32
    table is left, symmetric and asymmetric, and the export still matches fp32 PyTorch within the defaults."""
    import torch
    from transformers import AutoModelForCausalLM

    from shortened.exporters.onnx import export_onnx
    from shortened.exporters.quantize import quantize_export
    from shortened.model.checkpoint import save_checkpoint
    from shortened.validators.parity import validate_parity

    cfg = tiny_config("llama", layers=2)
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    save_checkpoint(model, char_tokenizer(), tmp_path / "tied")
    export_onnx(str(tmp_path / "tied"), tmp_path / "fp32", optimize=True, progress=False)
    for precision, quant in (("int4", {"symmetric": False}), ("int8", {})):
        out = tmp_path / precision
        quantize_export(tmp_path / "fp32", out, precision, quant=quant)
        q = json.loads((out / "export.json").read_text())["quantization"]
        assert q["tied_embeddings"] and q["embedding_table"].startswith("shared with the quantized head")
        m = onnx.load(str(out / "model.onnx"), load_external_data=False)
        assert [n.op_type for n in m.graph.node].count("GatherBlockQuantized") == 1
        floats = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
        tables = [t.name for t in floats if sorted(t.dims) == [64, 256]]
        assert not tables  # no fp32 copy of the vocabulary table (embedding or head) is left
        rep = validate_parity(str(tmp_path / "tied"), out, **PARITY)
        assert rep.passed, rep.table()


def test_qdq_int4_runs_in_onnxruntime_and_passes_tensorrt_preflight(small_models, fp32_exports, tmp_path):
    from shortened.exporters.quantize import quantize_export
    from shortened.exporters.tensorrt import preflight
    from shortened.validators.parity import validate_parity

    out = tmp_path / "qdq"
    quantize_export(fp32_exports["qwen2"], out, "int4", quant={"format": "qdq"})
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(a.i == 32 for n in dq for a in n.attribute if a.name == "block_size")
    assert not any(n.domain == "com.microsoft" for n in m.graph.node)
    assert validate_parity(str(small_models["qwen2"]), out, **PARITY).passed
    report = preflight(out / "model.onnx", batch=(1, 1, 2), seq=(1, 16, 64), trt_version="10.15")
    assert report["ok"], report["problems"]
    asym = tmp_path / "asym"
    quantize_export(fp32_exports["qwen2"], asym, "int4", quant={"format": "qdq", "symmetric": False})
    bad = preflight(asym / "model.onnx", batch=(1, 1, 2), seq=(1, 16, 64), trt_version="10.15")
    assert not bad["ok"] and any("symmetric" in p for p in bad["problems"])
    with pytest.raises(UsageError, match="TensorRT"):
        quantize_export(fp32_exports["llama"], tmp_path / "x", "int4", quant={"format": "qdq"})  # the fused graph


def test_bad_quantization_options_exit_2(small_models, fp32_exports, tmp_path, capsys):
    src = str(small_models["llama"])
    cases = [
        (["--precision", "int8", "--quant-method", "hqq"], "4 bits"),
        (["--precision", "int4", "--quant-method", "gptq"], "calibration"),
        (["--precision", "int4", "--block-size", "48"], "block size"),
        (["--precision", "int4", "--quant-format", "qdq", "--optimize"], "TensorRT"),
        (["--precision", "int4", "--exporter", "optimum"], "torch exporter"),
    ]
    for extra, message in cases:
        assert main(["export", "onnx", src, "--out", str(tmp_path / "o"), *extra]) == 2, extra
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    from shortened.exporters.quantize import quantize_export

    with pytest.raises(UsageError, match="unknown quantization option"):
        quantize_export(fp32_exports["llama"], tmp_path / "y", "int4", quant={"bits": 3})


def test_onnx_perplexity_equals_pytorch_for_fp32(small_models, fp32_exports, calib_file):
    from shortened.model.loading import load_model
    from shortened.validators.quality import evaluate, perplexity

    for fam in ("llama", "qwen2"):
        m = load_model(str(small_models[fam]))
        ref = perplexity(m.model, m.tokenizer, str(calib_file), seq_len=32, max_windows=6, progress=False)
        got = evaluate(str(fp32_exports[fam]), ppl=str(calib_file), seq_len=32, max_windows=6, progress=False)
        p = got["perplexity"][str(calib_file)]
        assert got["runtime"] == "onnxruntime" and p["tokens"] == ref.tokens
        assert p["ppl"] == pytest.approx(ref.ppl, rel=1e-4)
    with pytest.raises(UsageError, match="zero-shot"):
        evaluate(str(fp32_exports["llama"]), ppl=str(calib_file), tasks="arc_easy")


def test_gptq_is_calibrated_on_the_calibration_set(small_models, fp32_exports, calib_file, tmp_path):
    from shortened.exporters.quantize import quantize_export
    from shortened.validators.parity import validate_parity

    out = tmp_path / "gptq"
    quantize_export(fp32_exports["llama"], out, "int4", quant={"method": "gptq"}, calib=str(calib_file))
    q = json.loads((out / "export.json").read_text())["quantization"]
    assert q["method"] == "gptq" and q["calibration"]["windows"] == 10
    assert "MatMulNBits" in _ops(out)
    assert validate_parity(str(small_models["llama"]), out, **PARITY).passed
    assert np.isfinite(q["seconds"])


def test_convert_with_fp32_and_int4_gives_each_its_rows(tmp_path, calib_file, capsys, make_tiny):
    """`precisions = ["fp32", "int4"]`: both exported (int4 from the fp32 export), each with its parity, quality
    (through onnxruntime) and speed rows; --max-ppl-ratio gates the deployed (last) artifact."""

    src = make_tiny("llama", tmp_path / "m", layers=4)
    args = ["convert", "--model", str(src), "--out", str(tmp_path / "b"), "--calib", str(calib_file), "--seq-len",
            "32", "--num-samples", "2", "--no-protect", "--remove", "1", "--eval-text", str(calib_file),
            "--eval-max-windows", "3", "--batch-sizes", "1", "--repeats", "2", "--speed-ci-target", "0",
            "--prompt-len", "6", "--new-tokens", "3", "--parity-new-tokens", "4", "--parity-batch-sizes", "1,2",
            "--no-width-baseline", "--precisions", "fp32,int4", "--quiet"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    out = tmp_path / "b"
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["exports"]) == {"fp32", "int4"} and m["exports"]["int4"]["quantized_from"].endswith("onnx")
    assert "MatMulNBits" in _ops(out / "onnx-int4")
    assert set(m["parity"]["by_precision"]) == {"fp32", "int4"} and m["parity"]["passed"]
    assert (out / "parity-int4.txt").is_file()
    q = m["quality"]
    assert {"original", "pruned", "onnx fp32", "onnx int4"} <= set(q)
    assert q["onnx fp32"]["ppl"] == pytest.approx(q["pruned"]["ppl"], rel=1e-4)
    rows = json.loads((out / "speed.json").read_text())["rows"]
    assert {r["model"] for r in rows} == {"original", "candidate", "candidate-int4"}
    assert all("ci_low" in r["decode_speedup"] for r in rows)
    ratio = q["onnx int4"]["ppl"] / q["original"]["ppl"]
    capsys.readouterr()
    gate = ["--force", "--max-ppl-ratio", str(ratio * 0.999)]  # just below the int4 artifact's ratio: fails
    assert main([*args, *gate]) == 1
    assert "onnx int4 / original" in capsys.readouterr().err


def test_genai_runs_the_int4_export(small_models, fp32_exports, tmp_path, genai_greedy):
    """genai_config.json stays right: onnxruntime-genai generates from our int4 export the tokens our own
    onnxruntime loop generates from it (the same artifact in two runtimes)."""
    from shortened.exporters.quantize import quantize_export
    from shortened.runtime.base import greedy_generate
    from shortened.runtime.onnxruntime import load_ort_runner

    out = tmp_path / "int4"
    quantize_export(fp32_exports["llama"], out, "int4")
    prompt = [5, 9, 17, 33, 65]
    ours = greedy_generate(load_ort_runner(out), np.array([prompt]), np.ones((1, 5), np.int64), 8).tokens[0]
    assert genai_greedy(out, prompt, 8)[len(prompt) :] == ours.tolist()


def test_hqq_uint8_zero_points_are_exactly_its_float_ones(fp32_exports, tmp_path):
    """The default hqq int4 writes uint8 zero points (MatMulNBits' fast CPU kernel) plus a per-block offset matmul:
    the same function as hqq's float zero points, so with fp32 compute (accuracy level 1; level 4 quantizes the
    activations to int8 on the fast path only) the logits agree to float rounding."""
    from shortened.exporters.quantize import quantize_export
    from shortened.runtime.onnxruntime import load_ort_runner

    out = {}
    for name, extra in (("uint8", {}), ("float", {"float_zero_points": True})):
        quant = {"method": "hqq", "accuracy_level": 1, **extra}
        quantize_export(fp32_exports["llama"], tmp_path / name, "int4", quant=quant)
        out[name] = tmp_path / name
    g = onnx.load(str(out["uint8"] / "model.onnx")).graph
    inits = {t.name: t for t in g.initializer}
    hqq = [n for n in g.node if n.op_type == "MatMulNBits" and len(n.input) > 3 and n.input[3]]
    assert hqq and all(inits[n.input[3]].data_type == onnx.TensorProto.UINT8 for n in hqq)
    assert sum(n.name.endswith("/ReduceSum") for n in g.node) == len(hqq)
    ids = np.random.default_rng(0).integers(0, 100, (2, 9))
    logits = {}
    for name, d in out.items():
        r = load_ort_runner(d)
        logits[name], _ = r.step(ids, np.ones_like(ids), np.broadcast_to(np.arange(9), ids.shape).copy(), None)
    ref = logits["float"]
    assert np.abs(logits["uint8"] - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max())


def test_packing_gate_and_up_into_one_matmulnbits_keeps_the_logits(fp32_exports, tmp_path):
    """The default packs the MatMulNBits that share an input (gate/up) into one node + Split, and hqq's offset
    chain is then made once per input: the same function as the unpacked graph, to float rounding."""
    from shortened.exporters.quantize import quantize_export
    from shortened.runtime.onnxruntime import load_ort_runner

    logits, ops = {}, {}
    ids = np.random.default_rng(1).integers(0, 100, (2, 9))
    for name, pack in (("packed", True), ("apart", False)):
        rec = quantize_export(fp32_exports["llama"], tmp_path / name, "int4", quant={"pack": pack})
        ops[name] = _ops(tmp_path / name)
        q = rec["quantization"]
        assert q["quantized_matmuls"] == q["matmuls"] and q["packed_matmuls"] == (2 if pack else 0)  # 2 blocks
        assert q["offset_chains"] == ops[name].count("ReduceSum") > 0  # every hqq node's chain, as recorded
        r = load_ort_runner(tmp_path / name)
        logits[name], _ = r.step(ids, np.ones_like(ids), np.broadcast_to(np.arange(9), ids.shape).copy(), None)
    assert ops["packed"].count("MatMulNBits") == ops["apart"].count("MatMulNBits") - 2
    assert ops["packed"].count("Split") == ops["apart"].count("Split") + 2
    assert ops["packed"].count("ReduceSum") == ops["apart"].count("ReduceSum") - 2  # one block-sum chain per input
    assert np.abs(logits["packed"] - logits["apart"]).max() <= 1e-5 * max(1.0, np.abs(logits["apart"]).max())
