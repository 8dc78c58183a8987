"""Benchmark: the fast `ppl` criterion (prefix reuse, batched) against the naive leave-one-out.

Goal (issue 2): on SmolLM2-135M with 10 x 128 calibration tokens, fast <= 0.7x the naive time, scores equal to
1e-5 relative. Both run in this one process, alternating (fast, naive, fast, naive ...), and the ratio is taken
pair by pair, because this machine is noisy.

    python benchmarks/bench_ppl_scoring.py --model ~/.cache/shortened/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from shortened.converter.criteria import ppl_scores, ppl_scores_naive, protected_blocks
from shortened.data import CalibSpec, load_calibration
from shortened.model.cost import flops_per_token
from shortened.model.families import num_blocks
from shortened.model.loading import load_model

DEFAULT_CALIB = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "corpus_en.txt"


def ideal_ratio(config, candidates) -> float:
    """Per-token FLOPs: naive runs every block + head per candidate; fast runs one full pass, then for each
    candidate i the blocks after i + head. Attention scores are ignored (short sequences)."""
    f = flops_per_token(config)
    L, block, head, full = f["layers"], f["block"], f["head"], f["total"]
    naive = len(candidates) * full
    fast = full + sum((L - i - 1) * block + head for i in candidates)
    return fast / naive


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", default=str(DEFAULT_CALIB))
    ap.add_argument("--repeats", type=int, default=1, help="fast/naive pairs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    m = load_model(args.model)
    batch = load_calibration(CalibSpec(args.calib, 10, 128, seed=0), m.tokenizer)
    n = num_blocks(m.model.config)
    cands = [i for i in range(n) if i not in protected_blocks(n)]
    print(f"model {args.model}: {n} blocks, {len(cands)} candidates, calibration {tuple(batch.input_ids.shape)}")
    ratios, fast_t, naive_t = [], [], []
    for r in range(args.repeats):
        t = time.perf_counter()
        fast, _ = ppl_scores(m.model, batch, cands, progress=False)
        fast_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        naive = ppl_scores_naive(m.model, batch, cands, progress=False)
        naive_t.append(time.perf_counter() - t)
        ratios.append(fast_t[-1] / naive_t[-1])
        print(f"  pair {r + 1}: fast {fast_t[-1]:.1f}s  naive {naive_t[-1]:.1f}s  ratio {ratios[-1]:.3f}")
    rel = max(abs(fast[i] - naive[i]) / naive[i] for i in cands)
    ratio = statistics.median(ratios)
    ideal = ideal_ratio(m.model.config, cands)
    print(f"fast/naive time ratio (median of {len(ratios)} pairs): {ratio:.3f}   ideal from FLOPs: {ideal:.3f}")
    print(f"max relative score difference: {rel:.2e}")
    ok = ratio <= 0.7 and rel <= 1e-5
    print(f"goal (ratio <= 0.70, scores within 1e-5 relative): {'MET' if ok else 'NOT MET'}")


if __name__ == "__main__":
    main()
