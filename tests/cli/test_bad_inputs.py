"""Every bad input, across every command: exit code 2 (or 1 for a gate), one line on stderr and no traceback,
every file under the test's directory byte-identical afterwards (sha256), and nothing new anywhere, so no output
and no temporary file at the target. Issue 10's cases plus those that already behaved.

Each case builds what it needs under a fresh `root` (a copy of a tiny model in root/zoo/llama, text files, ...);
the whole tree is hashed before and after the command. Commands run in-process (`shortened.cli.main`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from shortened.cli import main

CASES: dict = {}


def case(code: int = 2, msg: str = ""):
    """Register a case: fn(w) -> argv; `msg` must appear (case-insensitively) in the one stderr line."""

    def deco(fn):
        CASES[fn.__name__.removeprefix("c_")] = (fn, code, msg)
        return fn

    return deco


def tree_hashes(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class World:
    """What a case builds on: copies of the session's tiny models and texts, all under `root`."""

    def __init__(self, root: Path, tiny: dict, onnx_dir: Path, text: str):
        self.root, self.tiny, self.onnx_src, self.text_body = root, tiny, onnx_dir, text
        self.zoo = root / "zoo"
        self.zoo.mkdir()

    def model(self, family: str = "llama", name: str | None = None) -> Path:
        d = self.zoo / (name or family)
        if not d.exists():
            shutil.copytree(self.tiny[family], d)
        return d

    def onnx(self) -> Path:
        d = self.zoo / "llama-onnx"
        if not d.exists():
            shutil.copytree(self.onnx_src, d)
        return d

    def text(self, name: str = "calib.txt", body: str | bytes | None = None) -> Path:
        p = self.zoo / name
        body = self.text_body if body is None else body
        p.write_bytes(body if isinstance(body, bytes) else body.encode())
        return p

    def jsonl(self, name: str, records: list) -> Path:
        return self.text(name, "".join(json.dumps(r) + "\n" for r in records))

    def config(self, model: Path, **changes) -> Path:
        p = model / "config.json"
        cfg = json.loads(p.read_text())
        for k, v in changes.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        p.write_text(json.dumps(cfg))
        return model

    def out(self, name: str = "out") -> Path:
        return self.root / name


BLOCK = ["--blocks", "2", "--no-protect"]


# ------------------------------------------------------------------ outputs that overlap inputs (data loss)
@case(msg="contains the input")
def c_prune_out_is_models_parent_force(w):
    return ["prune", w.model(), "--out", w.zoo, *BLOCK, "--force"]


@case(msg="input")
def c_prune_out_is_model_force(w):
    return ["prune", w.model(), "--out", w.model(), *BLOCK, "--force"]


@case(msg="inside the input")
def c_prune_out_inside_model(w):
    return ["prune", w.model(), "--out", w.model() / "sub", *BLOCK]


@case(msg="contains the input")
def c_prune_out_symlink_to_parent_force(w):
    m = w.model()
    (w.root / "link").symlink_to(w.zoo, target_is_directory=True)
    return ["prune", m, "--out", w.root / "link", *BLOCK, "--force"]


@case(msg="contains the input")
def c_prune_model_via_symlink_out_parent_force(w):
    w.model()
    (w.root / "mlink").symlink_to(w.zoo / "llama", target_is_directory=True)
    return ["prune", w.root / "mlink", "--out", w.zoo, *BLOCK, "--force"]


@case(msg="contains the input")
def c_convert_out_is_models_parent_force(w):
    return ["convert", "--model", w.model(), "--out", w.zoo, "--blocks", "2", "--no-protect", "--force", "--quiet"]


@case(msg="contains the input")
def c_convert_out_is_models_parent(w):
    return ["convert", "--model", w.model(), "--out", w.zoo, "--blocks", "2", "--no-protect", "--quiet"]


@case(msg="input")
def c_convert_out_contains_calib_force(w):
    m = w.model()
    d = w.root / "data"
    d.mkdir()
    calib = d / "calib.txt"
    calib.write_text(w.text_body)
    return ["convert", "--model", m, "--calib", calib, "--out", d, "--force", "--quiet"]


@case(msg="inside the input")
def c_score_out_inside_model(w):
    return ["score", w.model(), "--criterion", "magnitude", "--out", w.model() / "scores.json"]


@case(msg="input")
def c_score_out_is_calib_force(w):
    calib = w.text()
    return ["score", w.model(), "--calib", calib, "--seq-len", "16", "--num-samples", "2", "--out", calib, "--force"]


@case(msg="contains the input")
def c_export_onnx_out_is_models_parent_force(w):
    return ["export", "onnx", w.model(), "--out", w.zoo, "--force"]


@case(msg="input")
def c_export_tensorrt_out_is_onnx_dir_force(w):
    return ["export", "tensorrt", w.onnx(), "--out", w.onnx(), "--force"]


@case(msg="contains the input")
def c_retrain_out_contains_data_force(w):
    m = w.model()
    d = w.root / "data"
    d.mkdir()
    (d / "train.txt").write_text(w.text_body)
    return ["retrain", m, "--method", "full", "--data", d / "train.txt", "--seq-len", "16", "--max-steps", "1",
            "--out", d, "--force"]  # fmt: skip


@case(msg="contains the input")
def c_retrain_out_contains_teacher_force(w):
    m, t = w.model(), w.model(name="teacher")
    return ["retrain", m, "--method", "distill", "--teacher", t, "--data", w.text(), "--seq-len", "16",
            "--max-steps", "1", "--out", w.zoo, "--force"]  # fmt: skip


@case(msg="contains the input")
def c_width_prune_out_is_models_parent_force(w):
    return ["width-prune", w.model(), "--params", "100000", "--out", w.zoo, "--force"]


@case(msg="input")
def c_eval_json_onto_model_config(w):
    m = w.model()
    return ["eval", m, "--ppl", w.text(), "--seq-len", "16", "--max-windows", "2", "--json", m / "config.json"]


@case(msg="input")
def c_bench_report_onto_model_config(w):
    m = w.model()
    return ["bench", "--original", m, "--candidate", m, "--batch-sizes", "1", "--prompt-len", "4", "--new-tokens", "2",
            "--repeats", "1", "--report", m / "config.json"]  # fmt: skip


@case(msg="input")
def c_parity_report_onto_onnx_model(w):
    d = w.onnx()
    return ["validate", "parity", "--reference", w.model(), "--onnx", d, "--report", d / "model.onnx"]


# ------------------------------------------------------------------ --force only on outputs of this tool
@case(msg="not an output of shortened")
def c_prune_force_onto_foreign_dir(w):
    d = w.out()
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    return ["prune", w.model(), "--out", d, *BLOCK, "--force"]


@case(msg="not an output of shortened")
def c_convert_force_onto_foreign_dir(w):
    d = w.out()
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    return ["convert", "--model", w.model(), "--out", d, "--blocks", "2", "--no-protect", "--force", "--quiet"]


@case(msg="not an output of shortened")
def c_score_force_onto_foreign_file(w):
    p = w.root / "notes.json"
    p.write_text('{"mine": true}')
    return ["score", w.model(), "--criterion", "magnitude", "--out", p, "--force"]


@case(msg="is a directory")
def c_score_force_onto_directory(w):
    d = w.out("scores.json")
    d.mkdir()
    return ["score", w.model(), "--criterion", "magnitude", "--out", d, "--force"]


@case(msg="not an output of shortened")
def c_eval_json_onto_foreign_file(w):
    p = w.root / "notes.json"
    p.write_text('{"mine": true}')
    return ["eval", w.model(), "--ppl", w.text(), "--seq-len", "16", "--max-windows", "2", "--json", p]


@case(msg="already exists")
def c_prune_existing_output(w):
    d = w.out()
    d.mkdir()
    (d / "x").write_text("x")
    return ["prune", w.model(), "--out", d, *BLOCK]


# ------------------------------------------------------------------ inputs that already behaved
@case(msg="not found")
def c_missing_model_dir(w):
    return ["prune", w.root / "nope", "--out", w.out(), *BLOCK]


@case(msg="not found")
def c_missing_calib(w):
    return ["score", w.model(), "--calib", w.root / "nope.txt", "--out", w.out("s.json")]


@case(msg="unsupported architecture")
def c_unsupported_architecture(w):
    from transformers import AutoConfig

    d = w.zoo / "bert"
    AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2).save_pretrained(d)
    return ["prune", d, "--out", w.out(), "--blocks", "1", "--no-protect"]


@case(msg="between 0 and 1")
def c_bad_ratio(w):
    return ["prune", w.model(), "--out", w.out(), "--ratio", "1.5", "--criterion", "magnitude"]


@case(msg="out of range")
def c_bad_block_index(w):
    return ["prune", w.model(), "--out", w.out(), "--blocks", "1,9", "--no-protect"]


@case(msg="protected")
def c_protected_block(w):
    return ["prune", w.model(), "--out", w.out(), "--blocks", "0,2"]


@case(msg="--allow-pickle")
def c_pickle_only_weights(w):
    import torch
    from safetensors.torch import load_file

    m = w.model()
    sd = load_file(m / "model.safetensors")
    (m / "model.safetensors").unlink()
    torch.save(sd, m / "pytorch_model.bin")
    return ["prune", m, "--out", w.out(), *BLOCK]


@case(msg="--trust-remote-code")
def c_remote_code_model(w):
    m = w.model()
    w.config(m, model_type="my_llama", auto_map={"AutoConfig": "configuration_my.MyConfig",
                                                 "AutoModelForCausalLM": "modeling_my.MyModel"})  # fmt: skip
    (m / "configuration_my.py").write_text("raise SystemExit('remote code ran')\n")
    return ["prune", m, "--out", w.out(), *BLOCK]


# ------------------------------------------------------------------ silent wrong model, corrupt inputs
@case(msg="missing")
def c_config_claims_more_layers(w):
    return ["prune", w.config(w.model(), num_hidden_layers=8), "--out", w.out(), *BLOCK]


@case(msg="unexpected")
def c_config_claims_fewer_layers(w):
    return ["prune", w.config(w.model(), num_hidden_layers=4), "--out", w.out(), *BLOCK]


@case(msg="shape")
def c_config_weight_shape_mismatch(w):
    return ["prune", w.config(w.model(), intermediate_size=96), "--out", w.out(), *BLOCK]


@case(msg="safetensors")
def c_truncated_safetensors(w):
    m = w.model()
    p = m / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return ["prune", m, "--out", w.out(), *BLOCK]


@case(msg="safetensors")
def c_random_bytes_safetensors(w):
    m = w.model()
    (m / "model.safetensors").write_bytes(os.urandom(4096))
    return ["prune", m, "--out", w.out(), *BLOCK]


@case(msg="num_hidden_layers")
def c_config_value_wrong_type(w):
    return ["prune", w.config(w.model(), num_hidden_layers="eight"), "--out", w.out(), *BLOCK]


@case(msg="model-00002-of-00002.safetensors")
def c_missing_shard_in_index(w):
    from safetensors.torch import load_file, save_file

    m = w.model()
    sd = load_file(m / "model.safetensors")
    (m / "model.safetensors").unlink()
    names = sorted(sd)
    half = len(names) // 2
    save_file({k: sd[k] for k in names[:half]}, m / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {k: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors")
                  for i, k in enumerate(names)}  # fmt: skip
    (m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return ["prune", m, "--out", w.out(), *BLOCK]


@case(msg="tokenizer")
def c_no_tokenizer_files_score_ppl(w):
    m = w.model()
    for p in m.glob("*token*"):
        p.unlink()
    return ["score", m, "--calib", w.text(), "--seq-len", "16", "--num-samples", "2", "--out", w.out("s.json")]


# ------------------------------------------------------------------ lengths beyond the model
@case(msg="512")
def c_score_seq_len_beyond_model(w):
    return ["score", w.model(), "--calib", w.text(), "--seq-len", "600", "--num-samples", "1", "--out", w.out("s.json")]


@case(msg="512")
def c_prune_seq_len_beyond_gpt2(w):
    return ["prune", w.model("gpt2"), "--criterion", "ppl", "--calib", w.text(), "--seq-len", "600",
            "--num-samples", "1", "--remove", "1", "--out", w.out()]  # fmt: skip


@case(msg="512")
def c_eval_seq_len_beyond_gpt2(w):
    return ["eval", w.model("gpt2"), "--ppl", w.text(), "--seq-len", "600"]


@case(msg="512")
def c_parity_seq_lens_beyond_model(w):
    return ["validate", "parity", "--reference", w.model(), "--onnx", w.onnx(), "--seq-lens", "1,600"]


@case(msg="512")
def c_retrain_seq_len_beyond_model(w):
    return ["retrain", w.model(), "--method", "full", "--data", w.text(), "--seq-len", "600", "--max-steps", "1",
            "--out", w.out()]  # fmt: skip


@case(msg="512")
def c_bench_prompt_beyond_model(w):
    m = w.model()
    return ["bench", "--original", m, "--candidate", m, "--batch-sizes", "1", "--prompt-len", "600",
            "--new-tokens", "2", "--repeats", "1"]  # fmt: skip


@case(msg="512")
def c_convert_eval_seq_len_beyond_model(w):
    return ["convert", "--model", w.model(), "--out", w.out(), "--blocks", "2", "--no-protect", "--eval-text",
            w.text(), "--eval-seq-len", "600", "--quiet"]  # fmt: skip


@case(msg="512")
def c_convert_seq_len_beyond_model(w):
    return ["convert", "--model", w.model(), "--out", w.out(), "--calib", w.text(), "--seq-len", "600", "--quiet"]


# ------------------------------------------------------------------ values that slipped through
@case(msg="--blocks")
def c_empty_blocks(w):
    return ["prune", w.model(), "--out", w.out(), "--blocks", "", "--no-protect"]


@case(msg="--micro-batch")
def c_micro_batch_zero(w):
    return ["score", w.model(), "--calib", w.text(), "--seq-len", "16", "--num-samples", "2", "--micro-batch", "0",
            "--out", w.out("s.json")]  # fmt: skip


@case(msg="--max-steps")
def c_retrain_max_steps_zero(w):
    return ["retrain", w.model(), "--method", "full", "--data", w.text(), "--seq-len", "16", "--max-steps", "0",
            "--out", w.out()]  # fmt: skip


@case(msg="not a string")
def c_jsonl_text_is_number(w):
    calib = w.jsonl("calib.jsonl", [{"text": "hello there"}, {"text": 42}])
    return ["score", w.model(), "--calib", calib, "--seq-len", "8", "--num-samples", "2", "--out", w.out("s.json")]


@case(msg="not a string")
def c_jsonl_text_is_null(w):
    calib = w.jsonl("calib.jsonl", [{"text": None}, {"text": "hello there"}])
    return ["score", w.model(), "--calib", calib, "--seq-len", "8", "--num-samples", "2", "--out", w.out("s.json")]


@case(msg="not a string")
def c_retrain_jsonl_text_not_string(w):
    data = w.jsonl("train.jsonl", [{"text": "hello there " * 20}, {"text": 7}])
    return ["retrain", w.model(), "--method", "full", "--data", data, "--seq-len", "16", "--max-steps", "1",
            "--out", w.out()]  # fmt: skip


@case(msg="not text")
def c_binary_calib(w):
    calib = w.text("calib.txt", bytes(range(256)) * 64)
    return ["score", w.model(), "--calib", calib, "--seq-len", "16", "--num-samples", "2", "--out", w.out("s.json")]


@case(msg="utf-8")
def c_latin1_calib(w):
    calib = w.text("calib.txt", ("caf\u00e9 na\u00efve " * 400).encode("latin-1"))
    return ["score", w.model(), "--calib", calib, "--seq-len", "16", "--num-samples", "2", "--out", w.out("s.json")]


@case(msg="not text")
def c_eval_binary_text(w):
    return ["eval", w.model(), "--ppl", w.text("eval.txt", os.urandom(8192)), "--seq-len", "16"]


@case(msg="batch_sizes")
def c_convert_toml_list_as_string(w):
    toml = w.text("convert.toml", '[speed]\nbatch_sizes = "1,8"\n')
    return ["convert", "--config", toml, "--model", w.model(), "--out", w.out(), "--blocks", "2", "--no-protect"]


@case(msg="protect")
def c_convert_protect_not_integers(w):
    return ["convert", "--model", w.model(), "--out", w.out(), "--criterion", "magnitude", "--protect", "a,b"]


@case(msg="retrain_options")
def c_convert_toml_dict_as_string(w):
    toml = w.text("convert.toml", 'retrain_options = "lr=1"\n')
    return ["convert", "--config", toml, "--model", w.model(), "--out", w.out(), "--blocks", "2", "--no-protect"]


@case(msg="expected a JSON object")
def c_convert_parity_tolerances_not_json(w):
    return ["convert", "--model", w.model(), "--out", w.out(), "--blocks", "2", "--no-protect",
            "--parity-tolerances", "not json"]  # fmt: skip


@case(msg="1024")
def c_external_data_threshold_below_minimum(w):
    return ["export", "onnx", w.model(), "--out", w.out(), "--external-data-threshold", "5"]


@case(msg="model.onnx.data")
def c_truncated_onnx_data(w):
    d = w.onnx()
    p = d / "model.onnx.data"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return ["validate", "parity", "--reference", w.model(), "--onnx", d]


# ------------------------------------------------------------------ unwritable outputs
@case(msg="not a directory")
def c_out_parent_is_a_file(w):
    f = w.text("afile.txt", "x")
    return ["prune", w.model(), "--out", f / "out", *BLOCK]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
@case(msg="not writable")
def c_out_parent_read_only(w):
    d = w.root / "ro"
    d.mkdir()
    d.chmod(0o555)
    return ["prune", w.model(), "--out", d / "out", *BLOCK]


# ------------------------------------------------------------------ names that are neither paths nor reachable
@case(msg="no such directory or file: nope (and the Hugging Face hub is unreachable)")
def c_mistyped_model_path(w):
    return ["prune", "nope", "--out", w.out(), *BLOCK]


@case(msg="unreachable")
def c_hf_dataset_unreachable(w):
    return ["score", w.model(), "--calib", "hf:nope/nope", "--seq-len", "16", "--num-samples", "2",
            "--out", w.out("s.json")]  # fmt: skip


@case(msg="unreachable")
def c_eval_default_wikitext2_unreachable(w):
    return ["eval", w.model(), "--seq-len", "16"]


@pytest.fixture(scope="module")
def tiny_onnx(tiny_models, tmp_path_factory):
    """A small stand-in for an export directory: one MatMul whose 16 KB weight lives in model.onnx.data, beside
    the tiny llama's config. Enough for every case here, which must fail before a session runs it."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d = tmp_path_factory.mktemp("bad-onnx") / "onnx"
    d.mkdir()
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input_ids", "w"], ["logits"])], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 64])], [w],
    )  # fmt: skip
    onnx.save_model(helper.make_model(graph), d / "model.onnx", save_as_external_data=True,
                    location="model.onnx.data", size_threshold=1024)  # fmt: skip
    shutil.copy(tiny_models["llama"] / "config.json", d / "config.json")
    return d


@pytest.fixture
def offline_hub(monkeypatch):
    """A hub that cannot be reached, whatever this machine's network: connections to port 9 are refused."""
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tiny_models, tiny_onnx, tmp_path, capsys, offline_hub, corpus):
    fn, code, msg = CASES[name]
    for mark in getattr(fn, "pytestmark", []):
        if mark.name == "skipif" and mark.args[0]:
            pytest.skip(mark.kwargs.get("reason", ""))
    text = corpus.read_text()[:4000] if corpus.is_file() else "the quick brown fox jumps over the lazy dog. " * 90
    w = World(tmp_path, tiny_models, tiny_onnx, text)
    argv = [str(a) for a in fn(w)]
    before = tree_hashes(tmp_path)
    capsys.readouterr()
    try:
        got = main(argv)
    except SystemExit as e:  # argparse's own errors (also one line, exit 2)
        got = e.code
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert got == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert msg.lower() in lines[0].lower(), err
    after = tree_hashes(tmp_path)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}  # fmt: skip


# ------------------------------------------------------------------ good inputs next to the bad ones
def test_prune_without_tokenizer_files_needs_none(tiny_models, tmp_path, capsys):
    src = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], src)
    for p in src.glob("*token*"):
        p.unlink()
    code = main(["prune", str(src), "--out", str(tmp_path / "o"), *BLOCK])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_force_replaces_own_outputs_and_empty_dirs(tiny_models, tmp_path, capsys):
    src, out = tiny_models["llama"], tmp_path / "o"
    out.mkdir()  # an empty directory holds nothing to lose
    assert main(["prune", str(src), "--out", str(out), *BLOCK, "--force"]) == 0
    assert main(["prune", str(src), "--out", str(out), "--blocks", "3", "--no-protect", "--force"]) == 0
    assert json.loads((out / "pruning.json").read_text())["removed_blocks"] == [3]
    scores = tmp_path / "s.json"
    assert main(["score", str(src), "--criterion", "magnitude", "--no-protect", "--out", str(scores)]) == 0
    assert main(["score", str(src), "--criterion", "magnitude", "--no-protect", "--out", str(scores), "--force"]) == 0
    (tmp_path / "s.png").write_bytes(b"edited by hand")  # no longer what this tool wrote: refused
    assert main(["score", str(src), "--criterion", "magnitude", "--no-protect", "--out", str(scores), "--force"]) == 2
    assert (tmp_path / "s.png").read_bytes() == b"edited by hand"
    report = tmp_path / "e.json"
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    for _ in range(2):  # a report this tool wrote is simply rewritten
        assert main(["eval", str(src), "--ppl", str(text), "--seq-len", "16", "--max-windows", "2",
                     "--json", str(report)]) == 0  # fmt: skip
    capsys.readouterr()


def test_disk_full_while_writing_is_one_line_and_leaves_nothing(tiny_models, tmp_path, capsys, monkeypatch):
    import shortened.converter.steps as steps

    def full(model, tokenizer, out_dir):
        (Path(out_dir) / "model.safetensors").write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(steps, "save_checkpoint", full)
    # prune by tensor surgery (safetensors in, blocks known) writes through surgery.cut_checkpoint instead
    monkeypatch.setattr(steps.surgery, "cut_checkpoint", lambda src, out_dir, *a, **k: full(None, None, out_dir))
    code = main(["prune", str(tiny_models["llama"]), "--out", str(tmp_path / "o"), *BLOCK])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "free" in err and str(tmp_path) in err
    assert list(tmp_path.iterdir()) == []


def test_stale_temp_dirs_of_dead_processes_are_removed(tiny_models, tmp_path, capsys):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".o.tmp-{pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    mine = tmp_path / f".o.tmp-{os.getpid()}x"  # not a dead process's: left alone
    mine.mkdir()
    code = main(["prune", str(tiny_models["llama"]), "--out", str(tmp_path / "o"), *BLOCK])
    err = capsys.readouterr().err
    assert code == 0, err
    assert not stale.exists() and mine.exists() and "removed" in err and str(stale) in err


def test_force_recognises_outputs_of_earlier_versions_by_their_record(tiny_models, tmp_path, capsys):
    out = tmp_path / "old"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old")
    (out / "pruning.json").write_text(json.dumps({"tool": "shortened 0.1.0", "removed_blocks": [1]}))
    assert main(["prune", str(tiny_models["llama"]), "--out", str(out), *BLOCK, "--force"]) == 0
    assert json.loads((out / "pruning.json").read_text())["removed_blocks"] == [2]
    (out / "pruning.json").write_text(json.dumps({"tool": "someone else"}))
    (out / ".shortened-output.json").unlink()
    assert main(["prune", str(tiny_models["llama"]), "--out", str(out), *BLOCK, "--force"]) == 2
    assert "not an output of shortened" in capsys.readouterr().err
    old_scores = tmp_path / "scores.json"  # a scores file of an earlier version: no record beside it
    old_scores.write_text(json.dumps({"criterion": "bi", "scores": [1, 2], "removal_order": [0], "candidates": [0]}))
    assert main(["score", str(tiny_models["llama"]), "--criterion", "magnitude", "--no-protect", "--out",
                 str(old_scores), "--force"]) == 0  # fmt: skip
    assert json.loads(old_scores.read_text())["criterion"] == "magnitude"
