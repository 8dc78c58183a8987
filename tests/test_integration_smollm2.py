"""The pruning core on the real SmolLM2-135M: score with ppl and taylor (10 x 128 tokens), remove 6 of 30 blocks,
and report WikiText-2 perplexity of the original and the pruned model in the test log."""

from __future__ import annotations

import json

import pytest
from conftest import CORPUS, WIKITEXT

from shortened.converter.calibration import CalibSpec
from shortened.converter.loading import load_model
from shortened.converter.steps import prune, score
from shortened.validators.quality import perplexity

pytestmark = pytest.mark.integration
WINDOWS = 60  # 60 x 128 tokens of WikiText-2 test keeps the test short; the full-text figures are in the README


@pytest.fixture(scope="module")
def calib():
    if not CORPUS.is_file():
        pytest.skip("../shared/data is not present")
    return CalibSpec(str(CORPUS), num_samples=10, seq_len=128, seed=0)


def test_smollm2_ppl_and_taylor_prune_6_of_30(smollm2, calib, tmp_path, capsys):
    loaded = load_model(str(smollm2))
    assert loaded.model.config.num_hidden_layers == 30
    base = perplexity(loaded.model, loaded.tokenizer, str(WIKITEXT), 128, max_windows=WINDOWS, progress=False)
    assert 5 < base.ppl < 200  # a real pretrained model (random weights give tens of thousands)

    lines = [f"SmolLM2-135M original: WikiText-2 PPL {base.ppl:.2f} ({base.windows} x 128-token windows)"]
    for criterion in ("ppl", "taylor"):
        s = score(loaded, criterion, calib, out=tmp_path / f"{criterion}.json", progress=False)
        assert s.candidates == list(range(4, 28))
        assert len(s.removal_order) == 24 and not set(s.removal_order) & {0, 1, 2, 3, 28, 29}
        out = tmp_path / f"pruned-{criterion}"
        res = prune(str(smollm2), out, scores=tmp_path / f"{criterion}.json", remove=6, progress=False)
        assert res["kept"] == 24 and res["removed"] == sorted(s.removal_order[:6])
        pruned = load_model(str(out))
        assert pruned.model.config.num_hidden_layers == 24
        p = perplexity(pruned.model, pruned.tokenizer, str(WIKITEXT), 128, max_windows=WINDOWS, progress=False)
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
