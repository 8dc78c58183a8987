"""convert with a perplexity budget (--ratio auto), selection and recovery; quality notes when text is not held out."""

from __future__ import annotations

import json

from shortened.cli import main
from shortened.validators.quality import overlap_notes


def test_overlap_notes(tmp_path):
    calib = tmp_path / "calib.txt"
    lines = [f"line {i} of the calibration corpus, long enough to be compared as a line" for i in range(400)]
    calib.write_text("\n".join(lines))
    part = tmp_path / "part.txt"
    part.write_text("\n".join(lines[100:150]))
    other = tmp_path / "other.txt"
    other.write_text("\n".join(f"an unrelated sentence number {i} that is long enough to count" for i in range(50)))
    (tmp_path / "c").mkdir()
    train, test = tmp_path / "c" / "train.txt", tmp_path / "c" / "test.txt"
    train.write_text(other.read_text() + "\nx")
    test.write_text("\n".join(lines[:5]))
    assert "same file" in overlap_notes(str(calib), {"calibration": str(calib)})[0]
    assert "a slice of it" in overlap_notes(str(part), {"retraining": str(calib)})[0]
    assert "another split of the same corpus" in overlap_notes(str(test), {"retraining": str(train)})[0]
    assert "same corpus" in overlap_notes("wikitext2", {"retraining": "hf:wikitext:wikitext-2-raw-v1"})[0]
    assert overlap_notes(str(other), {"calibration": str(calib), "retraining": ""}) == []


def test_convert_ratio_auto_with_recovery(tmp_path, capsys, make_tiny, corpus, wikitext):
    model = make_tiny("llama", tmp_path / "llama8", layers=8)
    calib, evalt = tmp_path / "calib.txt", tmp_path / "eval.txt"
    calib.write_text(corpus.read_text()[:20000] if corpus.is_file() else "the quick brown fox. " * 1000)
    evalt.write_text(wikitext.read_text()[:20000] if wikitext.is_file() else "a lazy dog sleeps. " * 1000)
    out = tmp_path / "build"
    args = [
        "convert", "--model", str(model), "--out", str(out), "--calib", str(calib), "--seq-len", "32",
        "--num-samples", "4", "--protect", "0,-1", "--ratio", "auto", "--max-ppl-ratio", "1.5", "--eval-text",
        str(evalt), "--eval-max-windows", "6", "--eval-seq-len", "32", "--select", "best", "--recover", "linear",
        "--recover-samples", "8", "--sweep-max-remove", "2", "--no-speed", "--tensorrt", "off",
        "--parity-new-tokens", "2", "--parity-batch-sizes", "1", "--recover-calib", str(evalt), "--quiet",
    ]  # fmt: skip
    code = main(args)
    err = capsys.readouterr().err
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    sweep = json.loads((out / "sweep" / "sweep.json").read_text())
    k = sweep["picked_k"]
    assert k == max(r["k"] for r in sweep["rows"] if r["heldout_ratio"] <= 1.5)
    assert m["pruning"]["removed_blocks"] == sweep["rows"][k - 1]["blocks"]
    rec = json.loads((out / "pruned" / "pruning.json").read_text())
    if rec["recovery"]["method"] == "linear":  # folded only where it lowered the calibration perplexity
        assert rec["recovery"]["calibration"]["file"] == str(evalt)
    assert (out / "sweep" / "sweep.png").is_file() and "Quality against speed" in (out / "report.md").read_text()
    # the recovery was fitted on the evaluation text: the summary says the figure is not held out
    assert any("same file as the recovery calibration" in n for n in m["quality_notes"])
    assert "not held out" in err
