"""Running a model block by block: the inputs each block sees in the full model, one block, and the tail (final
norm, head) with the next-token NLL. Shared by the criteria, recovery, selection and offloaded scoring."""

from __future__ import annotations

import torch

from shortened.model.families import blocks_of, family_for, get_path


def device_of(model):
    return next(model.parameters()).device


def micro_batches(batch, size: int):
    n = batch.input_ids.shape[0]
    for s in range(0, n, size):
        yield batch.input_ids[s : s + size], batch.attention_mask[s : s + size]


@torch.no_grad()
def capture_block_inputs(model, input_ids, attention_mask):
    """Run the full model once; return the hidden states entering each block (plus the last block's
    output) and the exact positional/keyword arguments each block was called with."""
    blocks = blocks_of(model)
    hiddens, calls = [], []

    def pre_hook(module, args, kwargs):
        if args:
            hiddens.append(args[0])
            calls.append((args[1:], kwargs))
        else:
            kw = dict(kwargs)
            hiddens.append(kw.pop("hidden_states"))
            calls.append(((), kw))

    def last_hook(module, args, kwargs, output):
        hiddens.append(output[0] if isinstance(output, tuple) else output)

    handles = [b.register_forward_pre_hook(pre_hook, with_kwargs=True) for b in blocks]
    handles.append(blocks[-1].register_forward_hook(last_hook, with_kwargs=True))
    try:
        dev = device_of(model)
        model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return hiddens, calls


def run_block(block, hidden, call):
    args, kwargs = call
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def tail_logits(model, hidden):
    """Final norm, output head, and logit soft-capping where the config asks for it (Gemma 2)."""
    h = get_path(model, family_for(model.config).final_norm)(hidden)
    logits = model.lm_head(h)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def nll_sum(logits, input_ids, attention_mask) -> tuple[float, int]:
    """Sum of next-token NLL over real (unpadded) positions, and their count."""
    logits = logits[:, :-1].float()
    labels = input_ids[:, 1:].to(logits.device)
    valid = (attention_mask[:, :-1] * attention_mask[:, 1:]).to(logits.device).bool()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return float(nll[valid.reshape(-1)].double().sum()), int(valid.sum())
