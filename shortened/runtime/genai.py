"""onnxruntime-genai's own runtime on a model-builder directory (genai_config.json): its generator loop and its
KV-cache buffers, timed at every token."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from shortened.errors import UsageError
from shortened.runtime.base import TimedGenerator, Timing


def import_genai():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise UsageError("onnxruntime-genai is not installed; pip install onnxruntime-genai") from None
    return og


class GenaiGenerator(TimedGenerator):
    name = "onnxruntime-genai (cpu)"

    def __init__(self, og, model):
        self.og, self.model = og, model

    def generate(self, input_ids: np.ndarray, new_tokens: int) -> Timing:
        og = self.og
        b, p = input_ids.shape
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=p + new_tokens, min_length=p + new_tokens, batch_size=b)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(input_ids.astype(np.int32))  # runs the prompt
        gen.generate_next_token()  # picks the first token from the prompt's logits (no model run)
        stamps = [time.perf_counter()]
        for _ in range(new_tokens - 1):
            gen.generate_next_token()  # runs the model on the last token, then picks the next
            stamps.append(time.perf_counter())
        return Timing(stamps[0] - t0, list(np.diff(stamps)), list(gen.get_sequence(0))[p : p + new_tokens])


def load_genai(path: str, threads: int | None = None) -> GenaiGenerator:
    """A model-builder directory (or one of our exports with a genai_config.json), `threads` intra-op threads."""
    og = import_genai()
    cfg = og.Config(str(path))
    threads = threads or os.cpu_count()
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return GenaiGenerator(og, og.Model(cfg))
