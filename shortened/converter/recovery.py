"""Training-free recovery after block removal: a least-squares linear map folded into a kept weight (ReplaceMe).

For each run of consecutive removed blocks, take the kept block p just before it. On calibration tokens,
M = p's MLP output, Y = p's output minus M, H = the hidden state leaving the run's last block in the unpruned
model. T = argmin ||M T - (H - Y)||^2 + ridge ||T - I||^2 (M^T M and M^T (H - Y) summed in float64 over
micro-batches), so p's output becomes Y + M T ~ H; the ridge shrinks T toward the identity, i.e. toward leaving the
block as it is. Folding: W_down <- T^T W_down (nn.Linear; Conv1D: W T), the bias b <- b T. The checkpoint keeps
its architecture and parameter count.

Everything here works from a `HiddenCache` of the unpruned model: a block before a removal sees exactly the
input it saw in the full model, so every pruned variant (any removed set, any maps) starts from the cache.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from shortened.converter.forward import micro_batches, nll_sum, run_block, tail_logits
from shortened.errors import UsageError
from shortened.model.families import blocks_of, family_for, get_path

RECOVER = ("auto", "none", "linear")  # auto: linear where there is calibration text and the family allows it
# fitting windows (of --seq-len tokens). SmolLM2, span 12-17, WikiText-2 held out: 32 -> 110.2, 64 -> 109.4,
# 128 -> 109.2
# (10 windows over-fit: the prototype's 144 -> 168). Models with a wider hidden state need more tokens (>> hidden).
# 13-18 with the ridge toward I (0.1): 64 -> 103.85, 128 -> 102.47; the default prune (ppl scores, top-k and spans,
# recovery) on 2 idle cores: 104 s wall with 64, 128 s with 128.
RECOVER_SAMPLES = 128
ORDERS = ("sequential", "independent", "best")
# relative to mean(diag(M^T M)), toward T = I. SmolLM2, span 13-18, WikiText-2 held out (60 x 128), by fitting
# windows: 64: toward 0 (the old default, 1e-4) 105.06; toward I 1e-2 104.74, 0.1 103.86, 1.0 105.41, 10 113.23;
# 128: toward 0 102.57, toward I 0.03 102.42, 0.1 102.49, 0.3 103.07; 230 (of corpus_en's 252): 101.99, 101.93,
# 102.08, 102.75.
DEFAULT_RIDGE = 0.1


def runs_of(removed) -> list[list[int]]:
    """Consecutive runs of block indices: [3, 4, 7] -> [[3, 4], [7]]."""
    runs: list[list[int]] = []
    for i in sorted(removed):
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def check_recoverable(config, removed) -> None:
    """Refuse, naming the reason, where no kept weight can absorb the map."""
    fam = family_for(config)
    if fam.linear_recovery_refusal:
        raise UsageError(f"--recover linear is not supported for {config.model_type}: {fam.linear_recovery_refusal}")
    if removed and min(removed) == 0:
        raise UsageError(
            "--recover linear needs a kept block before every removed run, but block 0 is removed; "
            "keep block 0 (it is protected by default) or pass --recover none"
        )


# ---------------------------------------------------------------------------------------------
# The cache: hidden states of the unpruned model entering each block, per micro-batch.


class _Stop(Exception):
    pass


@dataclass
class HiddenCache:
    ids: list  # per micro-batch: input ids [b, T]
    masks: list  # per micro-batch: attention mask [b, T]
    hiddens: list  # per micro-batch: {depth: hidden entering block `depth`} (depth L = the last block's output)
    calls: list  # per micro-batch: per block (args, kwargs) it was called with
    num_blocks: int

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_tokens(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks))


@torch.no_grad()
def cache_hiddens(model, batch, micro_batch: int = 10, depths=None, progress: bool = False) -> HiddenCache:
    """Run the unpruned model's decoder (no head) over `batch`; keep the inputs of the blocks in `depths`
    (default all, plus the last block's output), and stop after the deepest one needed."""
    blocks = blocks_of(model)
    n = len(blocks)
    want = set(range(n + 1)) if depths is None else set(depths)
    deepest = max(want)
    base = get_path(model, family_for(model.config).blocks.rpartition(".")[0])  # the decoder without its head
    dev = next(model.parameters()).device
    out = HiddenCache([], [], [], [], n)
    chunks = list(micro_batches(batch, micro_batch))
    for ids, mask in tqdm(chunks, desc="recovery: caching hidden states", disable=not progress, leave=False):
        hid, calls = {}, [None] * n

        def pre_hook(module, args, kwargs, j, hid=hid, calls=calls):
            if args:
                h, call = args[0], (args[1:], kwargs)
            else:
                kw = dict(kwargs)
                h, call = kw.pop("hidden_states"), ((), kw)
            calls[j] = call
            if j in want:
                hid[j] = h
            if j > deepest:
                raise _Stop

        handles = [b.register_forward_pre_hook(_bind(pre_hook, j), with_kwargs=True) for j, b in enumerate(blocks)]
        if n in want:
            handles.append(blocks[-1].register_forward_hook(_last(hid, n), with_kwargs=True))
        try:
            base(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        out.ids.append(ids)
        out.masks.append(mask)
        out.hiddens.append(hid)
        out.calls.append(calls)
    return out


def _bind(fn, j):
    return lambda module, args, kwargs: fn(module, args, kwargs, j)


def _last(hid, n):
    def hook(module, args, kwargs, output):
        hid[n] = output[0] if isinstance(output, tuple) else output

    return hook


# ---------------------------------------------------------------------------------------------
# Applying maps: explicitly (a hook on the down projection, for scoring) or folded into the weight.


def down_proj(model, block_idx: int):
    fam = family_for(model.config)
    return get_path(blocks_of(model)[block_idx], fam.mlp_down)


@contextlib.contextmanager
def applied(model, maps: dict):
    """Within the block, the MLP output becomes (MLP output) @ T; weights are not touched."""
    handles = []
    for p, T in maps.items():
        mod = down_proj(model, p)
        handles.append(mod.register_forward_hook(lambda m, a, out, T=T: (out.double() @ T).to(out.dtype)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def fold(model, maps: dict) -> None:
    """W_down <- T^T W_down (nn.Linear, weight [out, in]) or W T (GPT-2's Conv1D, weight [in, out]); b <- b T.
    Indices are the model's current numbering: fold before removing blocks."""
    for p, T in maps.items():
        mod = down_proj(model, p)
        W = mod.weight
        if isinstance(mod, torch.nn.Linear):
            W.copy_((T.t() @ W.double()).to(W.dtype))
        elif type(mod).__name__ == "Conv1D":
            W.copy_((W.double() @ T).to(W.dtype))
        else:
            raise UsageError(f"cannot fold a linear map into {type(mod).__name__} (block {p}); pass --recover none")
        if getattr(mod, "bias", None) is not None:
            mod.bias.copy_((mod.bias.double() @ T).to(mod.bias.dtype))


# ---------------------------------------------------------------------------------------------
# Pruned variants from the cache.


@torch.no_grad()
def run_variant(model, cache: HiddenCache, mb: int, removed, maps: dict, start: int, stop: int | None = None):
    """The hidden state entering block `stop` (default: the decoder's output) of the model with `removed`
    blocks gone and `maps` applied, starting from the cached input of block `start` (which must be kept and
    come before any change)."""
    blocks = blocks_of(model)
    stop = len(blocks) if stop is None else stop
    h = cache.hiddens[mb][start]
    with applied(model, {p: T for p, T in maps.items() if start <= p < stop}):
        for j in range(start, stop):
            if j not in removed:
                h = run_block(blocks[j], h, cache.calls[mb][j])
    return h


def variant_start(removed, maps) -> int:
    """The first block whose input differs from the full model's is the first removed one (or the first block
    holding a map)."""
    return min([*removed, *maps]) if (removed or maps) else 0


@torch.no_grad()
def variant_ppl(model, cache: HiddenCache, removed, maps: dict | None = None) -> float:
    """Calibration perplexity of the pruned variant, computed from the cached prefix."""
    removed, maps = set(removed), maps or {}
    start = variant_start(removed, maps)
    total, count = 0.0, 0
    for mb in range(len(cache)):
        h = run_variant(model, cache, mb, removed, maps, start)
        s, c = nll_sum(tail_logits(model, h), cache.ids[mb], cache.masks[mb])
        total, count = total + s, count + c
    return math.exp(total / count)


# ---------------------------------------------------------------------------------------------
# Fitting.


@torch.no_grad()
def _mlp_parts(model, p: int, x, call):
    """(M, Y) of block p on input x: its MLP output and its output minus M."""
    got = {}
    handle = down_proj(model, p).register_forward_hook(lambda m, a, out: got.__setitem__("m", out))
    try:
        out = run_block(blocks_of(model)[p], x, call)
    finally:
        handle.remove()
    return got["m"], out - got["m"]


def solve(A, B, ridge: float = DEFAULT_RIDGE):
    """T = (A + lam I)^-1 (B + lam I), lam = ridge * mean(diag A), in float64: least squares shrunk toward T = I."""
    d = A.shape[0]
    lam = ridge * float(torch.diagonal(A).mean()) if ridge else 0.0
    eye = torch.eye(d, dtype=A.dtype, device=A.device)
    A, B = A + lam * eye, B + lam * eye
    try:
        return torch.linalg.solve(A, B)
    except torch.linalg.LinAlgError:  # a rank-deficient M (e.g. a block whose MLP output is zero): min-norm solution
        return torch.linalg.pinv(A, hermitian=True) @ B


@torch.no_grad()
def fit_maps(model, cache: HiddenCache, removed, ridge: float = DEFAULT_RIDGE, order: str = "sequential") -> dict:
    """{kept block p: T} for every run of `removed` (the model's current numbering; `model` is not modified).

    sequential: runs are fitted front to back on the model as it is being pruned, so each fit sees the input
    that the earlier runs' removal and maps produce; independent: each run on the unpruned model's input.
    """
    if order not in ("sequential", "independent"):
        raise UsageError(f"unknown recovery order {order!r}; choose sequential or independent")
    check_recoverable(model.config, removed)
    removed = set(removed)
    runs = runs_of(removed)
    first = runs[0][0] - 1 if runs else 0
    maps: dict = {}
    for run in runs:
        p, target = run[0] - 1, run[-1] + 1
        d = cache.hiddens[0][target].shape[-1]
        A = torch.zeros(d, d, dtype=torch.float64)
        B = torch.zeros(d, d, dtype=torch.float64)
        for mb in range(len(cache)):
            if order == "sequential":
                x = run_variant(model, cache, mb, removed, maps, first, stop=p)
            else:
                x = cache.hiddens[mb][p]
            M, Y = _mlp_parts(model, p, x, cache.calls[mb][p])
            valid = cache.masks[mb].to(M.device).bool()
            M = M[valid].double().cpu()
            D = (cache.hiddens[mb][target].to(Y.device) - Y)[valid].double().cpu()
            A += M.T @ M
            B += M.T @ D
        maps[p] = solve(A, B, ridge)
    return maps


def needed_depths(removed) -> set[int]:
    """The cached depths a fit of `removed` reads: each run's kept block before it, and the state after it."""
    out = set()
    for run in runs_of(removed):
        out |= {run[0] - 1, run[-1] + 1}
    return out


@dataclass
class Recovery:
    method: str
    maps: dict  # {kept block (original numbering): T}
    order: str
    ridge: float
    calib_ppl: dict  # {order: calibration perplexity of the pruned model with that order's maps}
    calibration: dict
    seconds: float = 0.0

    def record(self) -> dict:
        """What pruning.json keeps: everything but the maps (those live in the weights)."""
        return {
            "method": self.method,
            "fold": "W_down <- T^T W_down of the kept block before each removed run",
            "blocks_holding_maps": sorted(self.maps),
            "order": self.order,
            "ridge": self.ridge,
            "calibration_ppl_by_order": self.calib_ppl,
            "calibration": self.calibration,
            "seconds": round(self.seconds, 2),
        }


def fit_recovery(
    model, fit_cache: HiddenCache, removed, score_cache: HiddenCache | None = None, ridge: float = DEFAULT_RIDGE,
    order: str = "best", calibration: dict | None = None,
) -> Recovery:  # fmt: skip
    """Fit the maps for `removed`; with order "best" (and more than one run), fit both orders and keep the one
    with the lower perplexity on `score_cache` (default: the fitting cache)."""
    import time

    if order not in ORDERS:
        raise UsageError(f"unknown recovery order {order!r}; choose one of {', '.join(ORDERS)}")
    t0 = time.perf_counter()
    score_cache = score_cache or fit_cache
    tries = ("sequential", "independent") if order == "best" and len(runs_of(removed)) > 1 else (order,)
    if tries == ("best",):
        tries = ("sequential",)
    fits = {o: fit_maps(model, fit_cache, removed, ridge, o) for o in tries}
    ppl = {o: variant_ppl(model, score_cache, removed, m) for o, m in fits.items()}
    best = min(ppl, key=ppl.get)
    return Recovery("linear", fits[best], best, ridge, ppl, calibration or {}, time.perf_counter() - t0)
