"""Speed benchmark code on tiny models: FLOPs arithmetic by hand, pairwise ratios, the width baseline, bench."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shortened.cli import main
from shortened.converter.width import plan_width, width_prune, width_prune_model
from shortened.errors import UsageError
from shortened.model.cost import count_params, count_params_of_config, flops_per_token, ideal_speedup
from shortened.validators.speed import SpeedOptions
from shortened.validators.speed_report import build_rows
from shortened.validators.stats import pairwise_speedups, summarize


def smollm2_config(layers: int = 30):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                       num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True)  # fmt: skip


# --------------------------------------------------------------------------------------------- ideal speedup


def test_flops_hand_count_smollm2_shape():
    # by hand, multiply-adds per token: attention projections 576*64*(9+9+3+3) = 884,736; gated MLP
    # 3*576*1536 = 2,654,208; head 576*49,152 = 28,311,552; FLOPs are twice that.
    f30 = flops_per_token(smollm2_config(30))
    assert f30["attention_projections"] == 2 * 884_736
    assert f30["mlp"] == 2 * 2_654_208
    assert f30["head"] == 2 * 28_311_552
    assert f30["total"] == 2 * (30 * (884_736 + 2_654_208) + 28_311_552) == 268_959_744
    f24 = flops_per_token(smollm2_config(24))
    assert f24["total"] == 226_492_416
    assert ideal_speedup(smollm2_config(30), smollm2_config(24)) == pytest.approx(268_959_744 / 226_492_416)
    assert ideal_speedup(smollm2_config(30), smollm2_config(24)) == pytest.approx(1.1875)
    # at context 160 every block adds Q.K^T and P.V: 2 * 9 heads * 64 * 160 = 184,320 multiply-adds
    c30 = 2 * (30 * (884_736 + 2_654_208 + 184_320) + 28_311_552)
    c24 = 2 * (24 * (884_736 + 2_654_208 + 184_320) + 28_311_552)
    assert flops_per_token(smollm2_config(30), context=160)["total"] == c30
    assert ideal_speedup(smollm2_config(30), smollm2_config(24), context=160) == pytest.approx(c30 / c24)


def test_flops_hand_count_ungated_gpt2(tiny_models):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_models["gpt2"])  # n_embd 64, 4 heads, MLP 4*64, vocab 256, 6 blocks
    # per block: Q, K, V, O 4*64*64 = 16,384 and MLP 2*64*256 = 32,768 multiply-adds; head 64*256 = 16,384
    assert flops_per_token(cfg)["total"] == 2 * (6 * (16_384 + 32_768) + 16_384)


# --------------------------------------------------------------------------------------------- statistics


def test_speedups_are_computed_pair_by_pair():
    # the machine drifts (the original's time per repetition varies 3x); the candidate's per-pair speedup is
    # known exactly. The ratio of medians would mix repetitions; the pairwise median must be the known one.
    base = [1.0, 3.0, 1.1, 2.9, 1.05]
    true = [1.2, 1.4, 1.3, 1.1, 1.25]
    cand = [b / s for b, s in zip(base, true)]

    def reps(times):
        return [{"prefill_s": 2 * t, "decode_s": [t, t]} for t in times]

    rows = build_rows({1: {"original": reps(base), "candidate": reps(cand)}})
    row = next(r for r in rows if r["model"] == "candidate")
    assert row["decode_speedups"] == pytest.approx(true)
    assert row["prefill_speedups"] == pytest.approx(true)
    assert row["decode_speedup"]["median"] == pytest.approx(1.25)
    assert row["decode_speedup"]["p90"] == pytest.approx(np.percentile(true, 90))
    assert np.median(base) / np.median(cand) != pytest.approx(1.25, abs=1e-3)  # what a ratio of medians says
    assert row["tokens_per_s"]["median"] == pytest.approx(np.median([1 / c for c in cand]))
    orig = next(r for r in rows if r["model"] == "original")
    assert orig["decode_speedups"] == pytest.approx([1.0] * 5)
    with pytest.raises(ValueError):
        pairwise_speedups([1.0, 2.0], [1.0])
    assert summarize([]) == {"median": None, "p10": None, "p90": None, "n": 0}


# --------------------------------------------------------------------------------------------- width baseline


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_width_baseline_has_the_asked_param_count_and_generates(tiny_models, tmp_path, family):
    from transformers import AutoModelForCausalLM

    from shortened.converter.steps import prune

    src = tiny_models[family]
    cand = tmp_path / "cand"
    prune(str(src), cand, blocks=[2, 3], no_protect=True, progress=False)
    target = count_params_of_config(AutoModelForCausalLM.from_pretrained(cand).config)
    res = width_prune(str(src), str(cand), tmp_path / "width")  # the target read from the candidate dir
    assert res["target_params"] == target
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "width")  # plain transformers, no custom code
    orig = AutoModelForCausalLM.from_pretrained(src)
    per_channel = count_params_of_config(_with_inter(model.config, 2)) - count_params_of_config(
        _with_inter(model.config, 1)
    )
    assert count_params(model) == res["params"]
    assert abs(count_params(model) - target) <= per_channel / 2  # as close as whole MLP channels allow
    assert model.config.num_hidden_layers == orig.config.num_hidden_layers
    inter = "n_inner" if family == "gpt2" else "intermediate_size"
    assert getattr(model.config, inter) < (getattr(orig.config, inter) or 4 * orig.config.n_embd)
    out = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert out.shape == (1, 8)


def _with_inter(config, n):
    cfg = config.__class__.from_dict(config.to_dict())
    setattr(cfg, "n_inner" if cfg.model_type == "gpt2" else "intermediate_size", n)
    return cfg


def test_width_pruning_drops_exactly_the_least_magnitude_parts(tiny_models):
    """Zero one head group and 40 MLP channels in every block: they have the least magnitude, so width pruning
    must drop exactly them, and the narrow model must compute the same logits as the zeroed wide one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])  # 4 heads in 2 groups, head 16, MLP 128
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for layer in model.model.layers:
            g = int(rng.integers(2))
            q_rows, kv_rows = slice(g * 32, g * 32 + 32), slice(g * 16, g * 16 + 16)
            layer.self_attn.q_proj.weight[q_rows] = 0
            layer.self_attn.k_proj.weight[kv_rows] = 0
            layer.self_attn.v_proj.weight[kv_rows] = 0
            layer.self_attn.o_proj.weight[:, q_rows] = 0
            ch = torch.from_numpy(rng.choice(128, 40, replace=False))
            layer.mlp.gate_proj.weight[ch] = 0
            layer.mlp.up_proj.weight[ch] = 0
            layer.mlp.down_proj.weight[:, ch] = 0
    ids = torch.tensor([[5, 9, 30, 41, 7, 100, 3, 60]])
    with torch.no_grad():
        want = model(ids).logits
        width_prune_model(model, kv_groups=1, intermediate_size=88)
        got = model(ids).logits
    assert model.config.num_key_value_heads == 1 and model.config.num_attention_heads == 2
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (88, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_width_plan_rejects_impossible_targets(tiny_models):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_models["llama"])
    with pytest.raises(UsageError, match="not below"):
        plan_width(cfg, count_params_of_config(cfg) + 1)
    with pytest.raises(UsageError, match="cannot be reached"):
        plan_width(cfg, 1000)
    with pytest.raises(UsageError, match="kv_groups"):
        plan_width(cfg, count_params_of_config(cfg) - 10_000, kv_groups=5)


# --------------------------------------------------------------------------------------------- bench


def test_bench_torch_end_to_end(tiny_models, tmp_path):
    from shortened.converter.steps import prune
    from shortened.pipeline.bench import bench

    src = tiny_models["llama"]
    prune(str(src), tmp_path / "cand", blocks=[1, 2, 3], no_protect=True, progress=False)
    options = SpeedOptions(batch_sizes=(2, 1, 10**8), prompt_len=8, new_tokens=3, repeats=2, warmup=1, threads=1,
                           ci_target=None)  # fmt: skip
    rep = bench(str(src), str(tmp_path / "cand"), options, backend="torch", width_baseline=True,
                report=tmp_path / "r.json", plot=tmp_path / "p.png", progress=False)  # fmt: skip
    assert [s["batch"] for s in rep.skipped] == [10**8] and "GiB" in rep.skipped[0]["reason"]
    assert {(r["batch"], r["model"]) for r in rep.rows} == {(b, m) for b in (1, 2) for m in rep.models}
    assert set(rep.models) == {"original", "candidate", "width"}
    for b in (1, 2):
        base = rep.row(b, "original")
        for name in ("candidate", "width"):
            row = rep.row(b, name)
            assert len(row["decode_s"]) == 2  # one mean step time per repetition
            assert row["decode_speedups"] == pytest.approx([a / c for a, c in zip(base["decode_s"], row["decode_s"])])
            assert rep.decode_speedup(b, name) == pytest.approx(np.median(row["decode_speedups"]))
    assert rep.models["candidate"]["blocks"] == 3 and rep.models["width"]["blocks"] == 6
    assert rep.models["candidate"]["ideal_speedup_weights_only"] == pytest.approx(
        ideal_speedup(str(src), str(tmp_path / "cand"))
    )
    assert (
        abs(rep.models["width"]["params"] - rep.models["candidate"]["params"])
        < 0.01 * rep.models["candidate"]["params"]
    )
    for m in rep.models.values():
        assert m["peak_rss_mb"] > m["baseline_rss_mb"] > 0  # measured in the model's own process
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["rows"][0]["decode_speedups"] == rep.rows[0]["decode_speedups"]
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert "| 1 | candidate | 3 |" in rep.table()


def test_bench_cli_bad_input_exits_2(tiny_models, capsys):
    src = str(tiny_models["llama"])
    assert main(["bench", "--original", src, "--candidate", "/no/such/dir"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["bench", "--original", src, "--candidate", src, "--batch-sizes", "0"]) == 2
    assert main(["bench", "--original", src, "--candidate", src, "--new-tokens", "1"]) == 2


def test_bench_tensorrt_unavailable_is_a_clear_usage_error(tiny_models, capsys):
    from shortened.runtime.tensorrt import tensorrt_unavailable_reason

    if tensorrt_unavailable_reason(runtime=True) is None:
        pytest.skip("TensorRT and a GPU are here; the error path cannot be exercised")
    src = str(tiny_models["llama"])
    assert main(["bench", "--original", src, "--candidate", src, "--backend", "tensorrt"]) == 2
    assert "tensorrt backend cannot run here" in capsys.readouterr().err


@pytest.mark.integration
def test_width_baseline_of_smollm2_matches_24_block_count(smollm2, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(smollm2)
    target = count_params_of_config(_with_layers(cfg, 24))
    res = width_prune(str(smollm2), target, tmp_path / "w")
    assert abs(res["params"] - target) <= 30 * 3 * 576 / 2  # half an MLP channel over 30 blocks
    assert (res["kv_groups"], res["intermediate_size"]) == (2, 1297)  # round(3 * 0.8) groups; MLP takes the rest
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "w")
    assert count_params(model) == res["params"]
    out = model.generate(torch.tensor([[1, 504, 3458, 314]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)
    assert ideal_speedup(cfg, _with_layers(cfg, 24)) == pytest.approx(1.1875)


def _with_layers(config, n):
    cfg = config.__class__.from_dict(config.to_dict())
    cfg.num_hidden_layers = n
    cfg.layer_types = cfg.layer_types[:n] if getattr(cfg, "layer_types", None) else None
    return cfg


def test_bench_onnxruntime_runs_given_exports(tiny_models, tmp_path):
    """The onnxruntime path end to end with one export (exports cost most of this test): the model against itself."""
    from shortened.exporters.onnx import export_onnx
    from shortened.pipeline.bench import bench

    src = tiny_models["llama"]
    export_onnx(str(src), tmp_path / "onnx", progress=False)
    onnx = {"original": tmp_path / "onnx", "candidate": tmp_path / "onnx"}
    options = SpeedOptions(batch_sizes=(1, 2), prompt_len=6, new_tokens=3, repeats=2, warmup=1, threads=1,
                           ci_target=None)  # fmt: skip
    rep = bench(str(src), str(src), options, backend="onnxruntime", onnx_dirs=onnx, work_dir=tmp_path / "work",
                progress=False)  # fmt: skip
    assert not (tmp_path / "work" / "candidate-onnx").exists()  # the given export was used
    for m in rep.models.values():
        assert m["providers"] == ["CPUExecutionProvider"] and m["kind"] == "onnxruntime"
    for b in (1, 2):
        row = rep.row(b, "candidate")
        assert len(row["decode_speedups"]) == 2 and row["tokens_per_s"]["median"] > 0
    assert rep.models["candidate"]["ideal_decode_speedup"] == 1.0
    with pytest.raises(UsageError, match="blocks"):  # an export that does not belong to the checkpoint
        pruned = tmp_path / "cand"
        from shortened.converter.steps import prune

        prune(str(src), pruned, blocks=[1], no_protect=True, progress=False)
        bench(str(src), str(pruned), SpeedOptions(), backend="onnxruntime", onnx_dirs=onnx, progress=False)


def test_speed_options_are_checked_once_when_made():
    assert SpeedOptions(batch_sizes=(8, 1, 8)).batch_sizes == [1, 8]  # sorted, distinct, a list
    bad_settings = [
        ({"batch_sizes": [0, 1]}, "positive"),
        ({"new_tokens": 1}, "new_tokens must be at least 2"),
        ({"precision": "fp8"}, "unknown precision 'fp8'; choose one of"),
        ({"repeats": 1.5}, "repeats must be an integer"),
    ]
    for bad, msg in bad_settings:
        with pytest.raises(UsageError, match=msg):
            SpeedOptions(**bad)


def test_bench_measures_given_artifacts_and_needs_the_original(tiny_models):
    from shortened.validators.speed import Artifact, bench

    src = str(tiny_models["llama"])
    with pytest.raises(UsageError, match="original"):
        bench({"candidate": Artifact(src, src)}, "torch", SpeedOptions())
    with pytest.raises(UsageError, match="unknown backend"):
        bench({"original": Artifact(src, src)}, "tpu", SpeedOptions())
