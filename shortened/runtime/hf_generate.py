"""Eager PyTorch through Hugging Face `model.generate` (greedy): the everyday baseline users compare against,
timed at every token by a logits processor (called once per generated token, after that token's forward)."""

from __future__ import annotations

import os
import time

import numpy as np

from shortened.runtime.base import TimedGenerator, Timing


class HFGenerate(TimedGenerator):
    name = "hf-generate"

    def __init__(self, model, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.device = device
        self.num_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)

    def generate(self, input_ids: np.ndarray, new_tokens: int) -> Timing:
        import torch

        stamps = []

        def stamp(ids, scores):
            if self.device != "cpu":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return scores

        ids = torch.from_numpy(input_ids).to(self.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                logits_processor=[stamp],
                pad_token_id=0,
            )
        return Timing(stamps[0] - t0, list(np.diff(stamps)), out[0, input_ids.shape[1] :].tolist())

    def providers(self) -> list[str]:
        return [f"torch eager ({self.device})"]


def load_hf_generate(path: str, device: str = "cpu", threads: int | None = None) -> HFGenerate:
    """A checkpoint directory in fp32 eager PyTorch, with `threads` intra-op threads (None: all cores)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads or os.cpu_count())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    return HFGenerate(model, device)
