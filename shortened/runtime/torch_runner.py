"""A Hugging Face causal LM behind the Runner interface, using the model's own KV cache (the parity reference)."""

from __future__ import annotations

import inspect

import numpy as np
import torch

from shortened.model.loading import load_model
from shortened.runtime.base import Runner


class TorchRunner(Runner):
    """One forward step of a transformers model; the cache is the model's own Cache object, kept on its device."""

    name = "torch"

    def __init__(self, model):
        self.model = model.eval()
        self.num_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
        self.device = next(model.parameters()).device
        # transformers 5.x names the cache argument and output `cache`; 4.57 names them `past_key_values`
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache=None):
        def t(a):
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(self.device)

        with torch.inference_mode():
            out = self.model(
                input_ids=t(input_ids),
                attention_mask=t(attention_mask),
                position_ids=t(position_ids),
                use_cache=True,
                **{self.cache_arg: cache},
            )
        return out.logits.float().cpu().numpy(), out[self.cache_arg]

    def providers(self) -> list[str]:
        return [f"torch:{self.device}:{next(self.model.parameters()).dtype}".replace("torch.", "")]


def load_torch_runner(source, options=None) -> TorchRunner:
    """A TorchRunner for a model directory / hub id / GGUF file (see converter.loading.load_model)."""

    return TorchRunner(load_model(source, options, tokenizer=False).model)
