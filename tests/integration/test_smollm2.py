"""The pruning core on the real SmolLM2-135M: score with ppl and taylor (10 x 128 tokens), remove 6 of 30 blocks,
and report WikiText-2 perplexity of the original and the pruned model in the test log."""

from __future__ import annotations

import json

import pytest

from shortened.converter.steps import prune, score
from shortened.data import CalibSpec
from shortened.model.loading import load_model
from shortened.validators.quality import perplexity

pytestmark = pytest.mark.integration
WINDOWS = 60  # 60 x 128 tokens of WikiText-2 test keeps the test short; the full-text figures are in the README


@pytest.fixture(scope="module")
def calib(corpus):
    if not corpus.is_file():
        pytest.skip("../shared/data is not present")
    return CalibSpec(str(corpus), num_samples=10, seq_len=128, seed=0)


def test_smollm2_ppl_and_taylor_prune_6_of_30(smollm2, calib, tmp_path, capsys, wikitext):
    loaded = load_model(str(smollm2))
    assert loaded.model.config.num_hidden_layers == 30
    base = perplexity(loaded.model, loaded.tokenizer, str(wikitext), 128, max_windows=WINDOWS, progress=False)
    assert 5 < base.ppl < 200  # a real pretrained model (random weights give tens of thousands)

    lines = [f"SmolLM2-135M original: WikiText-2 PPL {base.ppl:.2f} ({base.windows} x 128-token windows)"]
    for criterion in ("ppl", "taylor"):
        s = score(loaded, calib, criterion=criterion, out=tmp_path / f"{criterion}.json", progress=False)
        assert s.candidates == list(range(4, 28))
        assert len(s.removal_order) == 24 and not set(s.removal_order) & {0, 1, 2, 3, 28, 29}
        out = tmp_path / f"pruned-{criterion}"
        res = prune(str(smollm2), out, scores=tmp_path / f"{criterion}.json", remove=6, progress=False)
        assert res["kept"] == 24 and res["removed"] == sorted(s.removal_order[:6])
        pruned = load_model(str(out))
        assert pruned.model.config.num_hidden_layers == 24
        p = perplexity(pruned.model, pruned.tokenizer, str(wikitext), 128, max_windows=WINDOWS, progress=False)
        assert base.ppl < p.ppl < 20 * base.ppl
        if criterion == "ppl":
            assert s.base_ppl and all(s.scores[i] > s.base_ppl * 0.9 for i in s.candidates)
        lines.append(
            f"  {criterion:6s} order {s.removal_order[:8]}... removed {res['removed']}: PPL {p.ppl:.2f} "
            f"(scoring {s.seconds:.1f}s)"
        )
        assert json.loads((out / "pruning.json").read_text())["criterion"] == criterion
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_smollm2_convert_end_to_end(smollm2, tmp_path, capsys, corpus, wikitext):
    """`shortened convert` on the real model, scaled down to minutes: Taylor on 4 x 64 tokens, 6 of 30 blocks (the
    paper's top-k path; selection and recovery have tests of their own), the onnxruntime-optimized export, parity,
    perplexity, speed. Then a re-run reuses every step and a gate that cannot pass gives exit code 1 with the
    artifacts kept; an invalid setting gives 2 before any work."""
    from shortened.cli import main
    from shortened.io import sha256_file

    if not corpus.is_file():
        pytest.skip("../shared/data is not present")
    out = tmp_path / "build"
    args = [
        "convert", "--model", str(smollm2), "--out", str(out), "--calib", str(corpus), "--criterion", "taylor",
        "--select", "topk", "--recover", "none", "--num-samples", "4", "--seq-len", "64", "--ratio", "0.2",
        "--optimize", "--eval-text", str(wikitext),
        "--eval-max-windows", "4", "--parity-new-tokens", "4", "--speed-backend", "torch", "--batch-sizes", "1",
        "--prompt-len", "16", "--new-tokens", "4", "--repeats", "1", "--no-width-baseline", "--quiet",
    ]  # fmt: skip
    assert main([*args, "--ratio", "1.5"]) == 2 and not out.exists()
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["passed"] and m["gates"]["parity"]["passed"] and m["pruning"]["kept"] == 24
    assert m["onnx"]["optimize"]["graph"] == "fused" and m["onnx"]["optimize"]["fused"]["group_query_attention"] == 24
    for rel, info in m["artifacts"].items():
        assert sha256_file(out / rel) == info["sha256"], rel
    for f in ("pruned/model.safetensors", "onnx/model.onnx", "report.md", "scores.png", "parity.json", "speed.json"):
        assert (out / f).is_file(), f
    q = m["quality"]
    print(f"\nSmolLM2 convert (taylor, 4 x 64): removed {m['pruning']['removed_blocks']}; WikiText-2 4 windows "
          f"PPL {q['original']['ppl']:.2f} -> {q['pruned']['ppl']:.2f}")  # fmt: skip

    code = main([*args, "--force", "--max-ppl-ratio", "1.01"])
    err = capsys.readouterr().err
    assert code == 1 and "max_ppl_ratio" in err
    m2 = json.loads((out / "manifest.json").read_text())
    assert all(s["reused"] for s in m2["steps"].values()), m2["steps"]
    assert not m2["gates"]["max_ppl_ratio"]["passed"] and (out / "onnx/model.onnx").is_file()
