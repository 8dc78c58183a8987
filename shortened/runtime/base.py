"""The small interface every backend runner implements, and the greedy generation loop they all share.

A runner holds one loaded causal LM and runs one step of it: tokens in (with the mask covering past + new
positions), logits and an updated KV cache out. The cache is opaque to callers (each backend keeps it where it
computes: numpy arrays, ORT values or device buffers); `None` is the empty cache of the first step.
Arrays at the interface are numpy: input_ids / attention_mask / position_ids int64, logits float32.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np


class Held:
    """What every loaded model has, whatever runs it: a name, whether it keeps a KV cache, how many decoder blocks
    the artifact holds (None where it does not say), what executes it, and close() — run on error too when the
    model is used as a context manager (`with load_x(...) as r:`)."""

    name: str = "model"
    has_cache: bool = True
    num_layers: int | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def providers(self) -> list[str]:
        """What actually executes the model (e.g. session.get_providers()), not what was requested."""
        return [self.name]

    def close(self) -> None:  # noqa: B027 - optional: most hold nothing that needs releasing
        """Release sessions or device memory."""


class Runner(Held, ABC):
    """One loaded model run one step at a time by our loop (greedy_generate).

    has_cache: whether step() takes and returns a KV cache (an export without one recomputes the whole sequence)."""

    name: str = "runner"

    @abstractmethod
    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache=None):
        """Run the new tokens [B, S] given the full mask [B, past + S]; return (logits [B, S, V], cache)."""


def position_ids_from_mask(attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Positions of the last `new_tokens` entries, counting only real (unmasked) tokens, as HF does."""
    pos = np.cumsum(attention_mask, axis=1) - 1
    pos = np.where(attention_mask == 0, 1, pos)
    return pos[:, -new_tokens:].astype(np.int64)


@dataclass
class Generation:
    tokens: np.ndarray  # [B, new] generated token ids
    prefill_logits: np.ndarray  # [B, S, V] logits of the prompt step
    step_logits: list = field(default_factory=list)  # [B, V] next-token logits of each step (prefill's last first)
    prefill_s: float = 0.0
    decode_s: list = field(default_factory=list)  # seconds of each decode step


def greedy_generate(runner: Runner, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int,
                    timer=None) -> Generation:  # fmt: skip
    """Greedy decoding with the KV cache: one prefill step, then one token per step. Left padding works."""
    import time

    timer = timer or time.perf_counter
    input_ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.asarray(attention_mask, dtype=np.int64)
    t0 = timer()
    logits, cache = runner.step(input_ids, mask, position_ids_from_mask(mask, input_ids.shape[1]), None)
    gen = Generation(tokens=np.zeros((input_ids.shape[0], 0), np.int64), prefill_logits=logits)
    gen.prefill_s = timer() - t0
    last = logits[:, -1, :]
    out = []
    for i in range(max_new_tokens):
        gen.step_logits.append(last)
        nxt = last.argmax(-1).astype(np.int64)[:, None]
        out.append(nxt)
        if i == max_new_tokens - 1:
            break
        mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
        t0 = timer()
        logits, cache = runner.step(nxt, mask, position_ids_from_mask(mask, 1), cache)
        gen.decode_s.append(timer() - t0)
        last = logits[:, -1, :]
    gen.tokens = np.concatenate(out, axis=1) if out else gen.tokens
    return gen


# ---------------------------------------------------------------------------------------------
# The second interface: models that run their own generation loop


@dataclass
class Timing:
    prefill_s: float  # the prompt, up to the first token
    decode_s: list  # seconds of each further token
    tokens: list  # the greedy tokens of the first row


class TimedGenerator(Held, ABC):
    """A model behind a library's own generation loop (Hugging Face `generate`, onnxruntime-genai's Generator):
    generate n tokens greedily, timed at every token. Use it as a context manager, like a Runner.

    It has no step(): the library owns the loop and the KV cache (genai keeps its cache buffers inside the
    Generator and takes no mask or positions; `generate` keeps its Cache object between its own calls), and that
    loop is what is measured. A step() would put our loop around the model and time ours instead (TorchRunner and
    OrtRunner already do that)."""

    name: str = "generator"

    @abstractmethod
    def generate(self, input_ids: np.ndarray, new_tokens: int) -> Timing:
        """Greedy decoding of `new_tokens` after the prompt [B, S] (no padding), timed at every token."""


def timed_generate(model: Runner | TimedGenerator, input_ids: np.ndarray, new_tokens: int) -> Timing:
    """Greedy tokens, timed: a Runner in the shared loop (`greedy_generate`), a TimedGenerator in its own."""
    if isinstance(model, TimedGenerator):
        return model.generate(input_ids, new_tokens)
    gen = greedy_generate(model, input_ids, np.ones_like(input_ids), new_tokens)
    return Timing(gen.prefill_s, list(gen.decode_s), gen.tokens[0].tolist())
