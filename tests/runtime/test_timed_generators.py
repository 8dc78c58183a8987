"""The generate-style runners (Hugging Face `generate`, onnxruntime-genai) against the shared greedy loop: same
tokens, one timing per token, and close() on the way out of `with` (no timings are asserted)."""

from __future__ import annotations

import numpy as np
import pytest

from shortened.runtime.base import TimedGenerator, timed_generate
from shortened.runtime.hf_generate import load_hf_generate
from shortened.runtime.torch_runner import load_torch_runner

IDS = np.array([[5, 9, 30, 41, 7, 100]], dtype=np.int64)


def test_hf_generate_gives_the_greedy_tokens_of_the_shared_loop(tiny_models):
    src = str(tiny_models["llama"])
    with load_torch_runner(src) as runner:
        want = timed_generate(runner, IDS, 4)
    with load_hf_generate(src, threads=1) as gen:
        assert isinstance(gen, TimedGenerator) and gen.num_layers == 6
        got = timed_generate(gen, IDS, 4)
    assert got.tokens == want.tokens and len(got.tokens) == 4
    assert len(got.decode_s) == len(want.decode_s) == 3 and got.prefill_s > 0


def test_close_runs_when_generation_fails():
    closed = []

    class Broken(TimedGenerator):
        def generate(self, input_ids, new_tokens):
            raise RuntimeError("out of memory")

        def close(self):
            closed.append(True)

    with pytest.raises(RuntimeError), Broken() as g:
        g.generate(IDS, 2)
    assert closed == [True]


@pytest.mark.slow  # an ONNX export, then onnxruntime-genai's model load: over a minute on 2 shared cores
def test_genai_runs_our_export(tiny_models, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    from shortened.exporters.onnx import export_onnx
    from shortened.runtime.genai import load_genai
    from shortened.runtime.onnxruntime import load_ort_runner

    src = tiny_models["llama"]
    export_onnx(str(src), tmp_path / "onnx", progress=False)
    with load_ort_runner(tmp_path / "onnx", threads=1) as runner:
        want = timed_generate(runner, IDS, 4)
    with load_genai(tmp_path / "onnx", threads=1) as gen:
        got = timed_generate(gen, IDS, 4)
    assert got.tokens == want.tokens and len(got.decode_s) == 3
