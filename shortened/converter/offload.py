"""Scoring a model whose blocks accelerate offloaded to CPU RAM or disk (`--device auto --max-memory ...`).

ppl and bi only run forward passes, which accelerate's hooks serve as they are (each offloaded module's weights
are loaded for its forward and dropped after). Gradients are another matter: the hook materializes fresh
parameters at each forward and throws them away after, so `p.grad` of an offloaded block stays empty and the
plain Taylor score would read 0 (measured). Here Taylor runs block by block from the top, as gradient
checkpointing does: the inputs of every block are captured in one forward pass, then for the last block down
to the first its weights are loaded for real (`materialized`), its forward recomputed on every micro-batch and
the gradient arriving from above pushed through it, so one block's weights and gradients are in memory at a time.
"""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from shortened.converter.forward import capture_block_inputs, micro_batches, run_block, tail_logits
from shortened.model.families import blocks_of


def is_offloaded(model) -> bool:
    """True when some weights are not in memory (accelerate keeps them on the meta device between forwards)."""
    return any(p.device.type == "meta" for p in model.parameters())


@contextlib.contextmanager
def materialized(module):
    """Within the block, the module's offloaded weights are ordinary parameters (gradients accumulate on them)."""
    from accelerate.utils import has_offloaded_params

    hooked = [m for m in module.modules() if has_offloaded_params(m)]
    for m in hooked:
        m._hf_hook.pre_forward(m)  # loads the weights from the offload (disk or CPU) map
        m._hf_hook.offload = False  # and keeps them for the forwards that follow
    try:
        yield
    finally:
        for m in hooked:
            m._hf_hook.offload = True
            m._hf_hook.post_forward(m, None)  # back to the meta device


def taylor_scores_offloaded(model, batch, micro_batch: int = 2, progress: bool = True) -> list[float]:
    """The same scores as criteria.taylor_scores (sum |w * dL/dw| per block, L = mean token NLL over the set)."""
    blocks = blocks_of(model)
    total_tokens = int((batch.attention_mask[:, :-1] * batch.attention_mask[:, 1:]).sum())
    saved, grads = [], []
    for ids, mask in micro_batches(batch, micro_batch):
        hiddens, calls = capture_block_inputs(model, ids, mask)
        h = hiddens[-1].detach().requires_grad_()
        with torch.enable_grad():
            logits = tail_logits(model, h)[:, :-1].float()
            labels = ids[:, 1:].to(logits.device)
            valid = (mask[:, :-1] * mask[:, 1:]).to(logits.device).bool()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
            (grad,) = torch.autograd.grad(nll[valid].sum() / total_tokens, h)
        saved.append((hiddens, calls))
        grads.append(grad)
    scores = [0.0] * len(blocks)
    for i in tqdm(reversed(range(len(blocks))), total=len(blocks), desc="taylor: blocks", disable=not progress,
                  leave=False):  # fmt: skip
        with materialized(blocks[i]):
            params = list(blocks[i].parameters())
            before = [p.requires_grad for p in params]
            for p in params:
                p.requires_grad_(True)
                p.grad = None
            for k, (hiddens, calls) in enumerate(saved):
                x = hiddens[i].detach().requires_grad_(i > 0)
                with torch.enable_grad():
                    run_block(blocks[i], x, calls[i]).backward(grads[k])
                grads[k] = x.grad if i > 0 else None
            with torch.no_grad():
                scores[i] = float(sum((p * p.grad).abs().sum().double() for p in params if p.grad is not None))
            for p, rg in zip(params, before):
                p.grad = None
                p.requires_grad_(rg)
    return scores


@torch.no_grad()
def magnitude_scores_offloaded(model) -> list[float]:
    out = []
    for b in blocks_of(model):
        with materialized(b):
            out.append(float(sum(p.detach().abs().sum().double() for p in b.parameters())))
    return out
