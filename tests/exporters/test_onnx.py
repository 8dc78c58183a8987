"""The ONNX exporter: Optimum's layout, fp32 logits within 1e-4 of PyTorch (padded batches, decode steps), every
family, fp16, external data, --optimize keeping padded-batch parity, genai_config, and bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch

from shortened.cli import main
from shortened.errors import UsageError
from shortened.exporters import onnx as X
from shortened.model.families import num_blocks
from shortened.runtime.base import position_ids_from_mask

TOL = 1e-4


@pytest.fixture(scope="module")
def pruned(tiny_models, tmp_path_factory):
    """pruned(family, keep) -> checkpoint dir of the tiny model keeping `keep` of its 6 blocks (6: the original)."""
    from shortened.converter.steps import prune

    root = tmp_path_factory.mktemp("pruned")

    def get(family, keep):
        if keep == 6:
            return tiny_models[family]
        src = root / f"{family}-keep{keep}"
        if not src.exists():
            drop = list(range(1, 1 + 6 - keep))
            prune(str(tiny_models[family]), src, blocks=drop, no_protect=True, progress=False)
        return src

    return get


@pytest.fixture(scope="module")
def exported(pruned, tmp_path_factory):
    """Lazily exported tiny models: get(family, keep, **export kwargs) -> (checkpoint dir, export dir, summary).
    Pruned models (keep < 6) also keep the tests fast: export time grows with the number of blocks."""
    root = tmp_path_factory.mktemp("onnx")
    done = {}

    def get(family="llama", keep=6, **kw):
        key = (family, keep, tuple(sorted(kw.items())))
        if key not in done:
            src = pruned(family, keep)
            out = root / f"{family}-{keep}-{len(done)}"
            done[key] = (src, out, X.export_onnx(str(src), out, progress=False, **kw))
        return done[key]

    return get


def session(onnx_dir):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(onnx_dir / X.ONNX_FILE), so, providers=["CPUExecutionProvider"])


def run_both(model_dir, onnx_dir, prompt_len=9, pad=4, steps=3, kv_dtype=np.float32, seed=0):
    """Left-padded batch of 2 (row 1 padded by `pad`), empty past, then greedy decode steps, through PyTorch (with its
    own cache) and onnxruntime (with the graph's presents). Returns per-step (torch logits, ort logits, real mask)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sess = session(onnx_dir)
    names = [i.name for i in sess.get_inputs()]
    n_layers, _, kv, head_dim = X.cache_geometry(model.config)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (2, prompt_len), generator=g)
    mask = torch.ones(2, prompt_len, dtype=torch.long)
    mask[1, :pad] = 0
    past, ref_cache, results = None, None, []
    for _ in range(steps + 1):
        pos = torch.from_numpy(position_ids_from_mask(mask.numpy(), ids.shape[1]))
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=ref_cache, use_cache=True)
        ref_cache = ref.past_key_values
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
        if "past_key_values.0.key" in names:
            empty = np.zeros((2, kv, 0, head_dim), kv_dtype)
            feed.update({n: empty if past is None else past[i] for i, n in enumerate(X.kv_names(n_layers)[0])})
        outs = sess.run(None, feed)
        past = outs[1:]
        results.append((ref.logits.float().numpy(), outs[0], mask[:, -ids.shape[1] :].bool().numpy()))
        ids = torch.from_numpy(outs[0][:, -1].argmax(-1))[:, None]
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    return results


def max_diff(results) -> float:
    return max(float(np.abs(a - b)[real].max()) for a, b, real in results)


def same_greedy(results) -> bool:
    return all((a[:, -1].argmax(-1) == b[:, -1].argmax(-1)).all() for a, b, _ in results)


# ---------------------------------------------------------------------------------------------
# fp32 parity, every family


# one block per family beyond the full and pruned llama (export time grows with blocks); gemma2 keeps a sliding and a
# full-attention block
@pytest.mark.parametrize("family,keep", [("llama", 6), ("llama", 2), ("mistral", 1), ("qwen2", 1), ("qwen3", 1),
                                         ("gemma2", 2), ("phi3", 1), ("gpt2", 1)])  # fmt: skip
def test_fp32_matches_pytorch(exported, family, keep):
    src, out, summary = exported(family, keep)
    assert summary["num_layers"] == keep == num_blocks(json_config(src))
    res = run_both(src, out, prompt_len=11 if family == "gemma2" else 7)  # gemma2: past its sliding window of 8
    assert max_diff(res) < TOL
    assert same_greedy(res)


def json_config(path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def test_layout_is_optimums(exported):
    src, out, summary = exported("llama", 2)
    m = onnx.load(str(out / X.ONNX_FILE), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in m.graph.input}
    dims.update({v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in m.graph.output})
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "past_sequence_length + sequence_length"]
    assert dims["position_ids"] == ["batch_size", "sequence_length"]
    assert dims["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 16]
    assert dims["present.0.key"] == ["batch_size", 2, "past_sequence_length + sequence_length", 16]
    assert dims["logits"] == ["batch_size", "sequence_length", 256]
    assert [v.name for v in m.graph.output] == ["logits"] + X.kv_names(2)[1]
    for f in ("config.json", "generation_config.json", "tokenizer.json", "genai_config.json", "export.json"):
        assert (out / f).is_file(), f
    rec = json.loads((out / "export.json").read_text())
    assert rec["precision"] == "fp32" and rec["num_layers"] == 2 and rec["exporter"] == "torch"
    assert rec["nodes"] > 0 and rec["size_bytes"] > 0 and rec["external_data"] and "torch" in rec["versions"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"]
    genai = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert genai["num_hidden_layers"] == 2 and genai["inputs"]["past_key_names"] == "past_key_values.%d.key"


def test_single_token_prefill(exported):
    src, out, _ = exported("llama", 2)
    res = run_both(src, out, prompt_len=1, pad=0, steps=1)  # empty past, one token
    assert max_diff(res) < TOL


def test_fp16_export_runs(exported):
    src, out, summary = exported("llama", 1, precision="fp16")
    m = onnx.load(str(out / X.ONNX_FILE), load_external_data=False)
    types = {i.name: i.type.tensor_type.elem_type for i in [*m.graph.input, *m.graph.output]}
    assert types["past_key_values.0.key"] == onnx.TensorProto.FLOAT16
    assert types["logits"] == onnx.TensorProto.FLOAT
    weights = [t.data_type for t in m.graph.initializer if len(t.dims) == 2]
    assert weights and all(t == onnx.TensorProto.FLOAT16 for t in weights)
    res = run_both(src, out, kv_dtype=np.float16)
    scale = max(float(np.abs(a).max()) for a, _, _ in res)
    assert max_diff(res) < 2e-2 * scale  # fp16 compute against the fp32 model
    assert json.loads((out / "export.json").read_text())["precision"] == "fp16"


def test_optimize_generic_families_keep_padded_parity(exported):
    """Families without the fused decoder get onnxscript's fusions on the generic graph, checked on padded batches."""
    src, out, summary = exported("phi3", 1, optimize=True)
    info = summary["optimize"]
    assert info["graph"] == "generic" and "not LLaMA-like" in info["fused_graph_not_used"]
    assert info["nodes_after"] < info["nodes_before"] and info["fused"]
    assert info["padded_rel_diff"] <= 1e-3
    res = run_both(src, out)
    assert max_diff(res) < 1e-3 and same_greedy(res)


@pytest.mark.parametrize("family,keep", [("llama", 2), ("mistral", 1), ("qwen2", 1), ("qwen3", 1)])
def test_optimize_fused_decoder_matches_pytorch(exported, family, keep):
    """LLaMA-like families export as GroupQueryAttention graphs: a few nodes per layer, same logits as PyTorch on a
    left-padded batch through prefill and decode, and a multi-token step on top of a cache."""
    src, out, summary = exported(family, keep, optimize=True)
    info = summary["optimize"]
    assert info["graph"] == "fused" and info["fused"]["group_query_attention"] == keep
    assert info["padded_rel_diff_vs_torch"] < 1e-5
    m = onnx.load(str(out / X.ONNX_FILE), load_external_data=False)
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("GroupQueryAttention") == keep and "RotaryEmbedding" not in ops  # RoPE inside the kernel
    assert ops.count("MatMul") == 5 * keep + 1  # packed QKV, o_proj, gate, up, down; the head
    assert "Softmax" not in ops and summary["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    res = run_both(src, out)
    assert max_diff(res) < TOL and same_greedy(res)
    assert chunked_diff(src, out) < TOL


def padded_batch(length: int, row: int, pad: int, seed: int):
    """(ids, mask, position_ids) of a batch of 2 whose row `row` is left-padded by `pad` tokens."""
    ids = torch.randint(3, 250, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[row, :pad] = 0
    return ids, mask, torch.from_numpy(position_ids_from_mask(mask.numpy(), length))


def chunked_diff(model_dir, onnx_dir) -> float:
    """Largest logit difference between a full PyTorch forward and the graph fed in chunks (7 tokens, then 3 on top of
    the cache, then 1), on a left-padded batch of 2."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sess = session(onnx_dir)
    n_layers, _, kv, head_dim = X.cache_geometry(model.config)
    ids, mask, pos = padded_batch(11, row=1, pad=4, seed=1)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()
    past, worst = [np.zeros((2, kv, 0, head_dim), np.float32)] * (2 * n_layers), 0.0
    for a, b in ((0, 7), (7, 10), (10, 11)):
        feed = {"input_ids": ids[:, a:b].numpy(), "attention_mask": mask[:, :b].numpy(),
                "position_ids": pos[:, a:b].numpy(), **dict(zip(X.kv_names(n_layers)[0], past))}  # fmt: skip
        logits, *past = sess.run(None, feed)
        worst = max(worst, float(np.abs(logits - ref[:, a:b])[mask[:, a:b].bool().numpy()].max()))
    return worst


def test_optimize_fused_fp16(exported):
    src, out, summary = exported("llama", 1, precision="fp16", optimize=True)
    assert summary["optimize"]["graph"] == "fused" and summary["optimize"]["padded_rel_diff_vs_torch"] < 2e-2
    res = run_both(src, out, kv_dtype=np.float16)
    scale = max(float(np.abs(a).max()) for a, _, _ in res)
    assert max_diff(res) < 2e-2 * scale


def test_fused_decoder_eager_matches_hugging_face(tiny_models):
    """The fused decoder's PyTorch side (the ops' reference implementations) against the model itself, with a cache
    carried between calls: what the exporter traces is the model."""
    from transformers import AutoModelForCausalLM

    from shortened.exporters.fused import FusedCausalLM, unsupported_reason

    for family in ("llama", "mistral", "qwen2", "qwen3"):
        model = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32).eval()
        assert unsupported_reason(model) is None
        fused = FusedCausalLM(model)
        n_layers, _, kv, head_dim = X.cache_geometry(model.config)
        ids, mask, pos = padded_batch(8, row=0, pad=3, seed=0)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            past = [torch.zeros(2, kv, 0, head_dim)] * (2 * n_layers)
            first, *past = fused(ids[:, :5], mask[:, :5], pos[:, :5], *past)
            second, *_ = fused(ids[:, 5:], mask, pos[:, 5:], *past)
        got = torch.cat([first, second], 1)
        assert (got - ref)[mask.bool()].abs().max() < 1e-4, family
    for family in ("gemma2", "phi3", "gpt2"):
        model = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32)
        assert unsupported_reason(model)


def test_fused_decoder_refuses_sliding_windows(tiny_models):
    from transformers import AutoModelForCausalLM

    from shortened.exporters.fused import unsupported_reason

    model = AutoModelForCausalLM.from_pretrained(tiny_models["mistral"], dtype=torch.float32)
    model.config.sliding_window = 4
    assert "sliding-window" in unsupported_reason(model)


def test_padded_batch_check_catches_a_mask_ignoring_graph(exported, tmp_path):
    """The export-time check that guards --optimize must see a graph that ignores attention_mask."""
    import onnx_ir

    src, out, _ = exported("llama", 2)
    m = onnx_ir.load(out / X.ONNX_FILE)
    mask = m.graph.inputs[1]
    ones = onnx_ir.node("ConstantOfShape", [onnx_ir.node("Shape", [mask]).outputs[0]],
                        attributes={"value": onnx_ir.tensor(np.array([1], np.int64))})  # fmt: skip
    m.graph.append(ones.inputs[0].producer())
    m.graph.append(ones)
    for use in list(mask.uses()):
        if use.node is not ones.inputs[0].producer():
            use.node.replace_input_with(use.idx, ones.outputs[0])
    bad = tmp_path / "bad"
    bad.mkdir()
    onnx_ir.save(m, bad / X.ONNX_FILE, external_data=X.DATA_FILE)
    assert X.padded_batch_check(out / X.ONNX_FILE, out / X.ONNX_FILE, json_config(src)) == 0.0
    assert X.padded_batch_check(out / X.ONNX_FILE, bad / X.ONNX_FILE, json_config(src)) > 1e-2


def test_no_cache_cli_external_data_and_2gb_guard(pruned, tmp_path, capsys, monkeypatch):
    import onnx_ir

    src, out = pruned("llama", 1), tmp_path / "cli"
    assert main(["export", "onnx", str(src), "--out", str(out), "--no-cache", "--opset", "19"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["opset"] == 19 and not summary["cache"] and summary["external_data"]
    assert summary["inputs"] == ["input_ids", "attention_mask", "position_ids"] and summary["outputs"] == ["logits"]
    a, b, real = run_both(src, out, steps=0)[0]
    assert float(np.abs(a - b)[real].max()) < TOL
    assert main(["export", "onnx", str(src), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err

    m = onnx_ir.load(out / X.ONNX_FILE)
    weights = sum(v.const_value.nbytes for v in m.graph.initializers.values() if v.const_value.nbytes >= 1024)
    one = tmp_path / "inline" / X.ONNX_FILE
    one.parent.mkdir()
    import shortened.exporters.layout as layout

    assert not layout.save_graph(m, one, threshold=None)  # small: a single file
    monkeypatch.setattr(layout, "PROTOBUF_LIMIT", 1000)  # pretend the weights exceed what one protobuf holds
    forced = tmp_path / "forced" / X.ONNX_FILE
    forced.parent.mkdir()
    assert layout.save_graph(m, forced, threshold=None)
    assert (forced.parent / X.DATA_FILE).stat().st_size >= weights
    s1, s2 = session(one.parent), session(forced.parent)
    feed = {"input_ids": np.array([[5, 6, 7]]), "attention_mask": np.ones((1, 3), np.int64),
            "position_ids": np.array([[0, 1, 2]])}  # fmt: skip
    np.testing.assert_array_equal(s1.run(None, feed)[0], s2.run(None, feed)[0])


def test_bf16_export_writes_bf16_weights(exported):
    _, out, summary = exported("llama", 1, precision="bf16", cache=False)
    m = onnx.load(str(out / X.ONNX_FILE), load_external_data=False)
    assert {t.data_type for t in m.graph.initializer if len(t.dims) == 2} == {onnx.TensorProto.BFLOAT16}
    assert summary["precision"] == "bf16"


# ---------------------------------------------------------------------------------------------
# onnxruntime-genai runs the export (when installed)


@pytest.mark.parametrize("optimize", [False, True])
def test_genai_generates_pytorch_tokens(exported, optimize, genai_greedy):
    """onnxruntime-genai runs our exports: the generic graph with a growing cache, the fused one with its cache
    updated in place (past_present_share_buffer, as genai's own models)."""
    from transformers import AutoModelForCausalLM

    src, out, _ = exported("llama", 2, optimize=optimize)
    share = json.loads((out / "genai_config.json").read_text())["search"]["past_present_share_buffer"]
    assert share is optimize
    prompt = [5, 9, 17, 33, 65]
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert genai_greedy(out, prompt, 8) == ref[0].tolist()


# ---------------------------------------------------------------------------------------------
# CLI and bad input


@pytest.mark.parametrize(
    "args,message",
    [
        (["/nonexistent/model"], "not found"),
        (["{tiny}", "--precision", "int2"], "invalid choice"),
        (["{tiny}", "--opset", "11"], "opset"),
        (["{tiny}", "--precision", "bf16", "--optimize"], "bf16"),
        (["{unsupported}"], "unsupported architecture"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(tiny_models, tmp_path, capsys, args, message):
    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    args = [a.format(tiny=tiny_models["llama"], unsupported=bad) for a in args]
    try:
        code = main(["export", "onnx", *args, "--out", str(tmp_path / "o")])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_optimum_exporter_missing_says_how_to_get_it(tiny_models, tmp_path):
    try:
        import optimum.exporters.onnx  # noqa: F401

        pytest.skip("optimum-onnx is installed here; tests/optimum covers it")
    except ImportError:
        pass
    with pytest.raises(UsageError, match="pip install optimum-onnx"):
        X.export_onnx(str(tiny_models["llama"]), tmp_path / "o", exporter="optimum")


def test_export_options_make_the_flags_and_check_once(tiny_models, tmp_path, capsys):
    """ExportOptions / QuantOptions carry each flag's meaning and choices; one validate() refuses bad values and
    combinations with one line; keyword fields replace the options' (the caller's object is left alone)."""
    from shortened.cli import build_parser
    from shortened.cli.args import options_from_args
    from shortened.exporters.quantize import QuantOptions

    with pytest.raises(SystemExit):
        main(["export", "onnx", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--precision {fp32,fp16,bf16,int4,int8} weights, compute and cache" in text
    assert "--quant-method {rtn,hqq,gptq}" in text and "--head-bits {0,4,8}" in text and "--no-cache" in text
    flags = ["--precision", "int4", "--no-cache", "--asymmetric", "--no-quantize-head", "--block-size", "64",
             "--external-data-threshold", "-1"]  # fmt: skip
    args = build_parser().parse_args(["export", "onnx", "m", "--out", "o", *flags])
    quant = options_from_args(QuantOptions, args)
    opts = options_from_args(X.ExportOptions, args, quant=quant)
    assert (opts.cache, opts.external_data_threshold, quant.symmetric, quant.head, quant.block_size) == (
        False, None, False, False, 64,
    )  # fmt: skip
    resolved = X.ExportOptions(**{**vars(opts)}).validate()
    assert (resolved.quant.method, resolved.quant.head_bits) == ("hqq", 8) and opts.quant.method == ""
    for bad, message in [
        (dict(precision="fp8"), "unknown precision 'fp8'"),
        (dict(opset=11), "--opset must be an integer >= 18"),
        (dict(optimize="yes"), "export option optimize must be true or false"),
        (dict(quant={"method": "rtn"}), "apply to --precision int4/int8, not fp32"),
        (dict(precision="int8", quant={"bits": 3}), "unknown quantization option 'bits'"),
        (dict(precision="int4", quant=QuantOptions(symmetric="no")), "quantization option symmetric must be"),
    ]:
        with pytest.raises(UsageError, match=re.escape(message)):
            X.ExportOptions(**bad).validate()
    mine = X.ExportOptions(precision="fp16", optimize=True)
    with pytest.raises(UsageError, match="bf16"):  # the keyword replaces the options' precision: bf16 + optimize
        X.export_onnx(str(tiny_models["llama"]), tmp_path / "o", mine, precision="bf16", progress=False)
    assert mine.precision == "fp16" and not (tmp_path / "o").exists()
