"""The LM head + cross-entropy: megamoe's chunked fused loss vs the full-logits path, forward and
backward, at DeepSeek-V3's vocabulary (129,280) over 4,096 tokens.

    python bench/loss.py [--tokens 4096] [--vocab 129280] [--hidden 256] [--dtype float32]

Time: both contenders in this process, interleaved round-robin, default allocator, median of
--repeat rounds. Memory: each contender once in its own subprocess (a separate pass), peak RSS
above the set-up's (inputs and weight allocated first), read by ru_maxrss. The hidden size is
small by default so a CPU run takes seconds: the logits, which is what the fused loss saves, do
not depend on it. Prints the ratios (goal: at most 1/4 of the peak memory, no slower).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def inputs(a):
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, a.dtype)
    h = torch.randn(a.tokens, a.hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(a.vocab, a.hidden, generator=g) * 0.02).to(dtype).requires_grad_()
    y = torch.randint(0, a.vocab, (a.tokens,), generator=g)
    return h, w, y


def step(impl: str, h, w, y):
    from megamoe import kernels
    h.grad = w.grad = None
    if impl == "fused":
        loss = kernels.linear_cross_entropy(h, w, y)
    else:
        loss = F.cross_entropy((h @ w.T).float(), y)
    loss.backward()
    return float(loss.detach())


def peak_memory(impl: str, a) -> float:
    """GiB above the set-up, in a fresh process."""
    args = [sys.executable, __file__, "--measure", impl] + [f"--{k}={v}" for k, v in
                                                            (("tokens", a.tokens), ("vocab", a.vocab),
                                                             ("hidden", a.hidden), ("dtype", a.dtype))]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_gib"]


def measure(impl: str, a) -> None:
    h, w, y = inputs(a)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(impl, h, w, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_gib": (peak - base) / 2 ** 20}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=129280)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--measure", choices=["fused", "full"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:
        return measure(a.measure, a)
    # memory first: a child's ru_maxrss starts at its parent's peak at fork (kept across execve),
    # so the parent must still be small
    mem = {impl: peak_memory(impl, a) for impl in ("full", "fused")}
    h, w, y = inputs(a)
    losses = {impl: step(impl, h, w, y) for impl in ("full", "fused")}   # warm-up, and the same loss
    times = {"full": [], "fused": []}
    for _ in range(a.repeat):
        for impl in times:
            t0 = time.perf_counter()
            step(impl, h, w, y)
            times[impl].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"LM head + cross-entropy, {a.tokens} tokens x vocab {a.vocab}, hidden {a.hidden}, {a.dtype}, "
          f"{torch.get_num_threads()} thread(s); loss full {losses['full']:.6f} fused {losses['fused']:.6f}")
    for impl in ("full", "fused"):
        print(f"  {impl:<6} fwd+bwd {1000 * med[impl]:8.1f} ms (median of {a.repeat}, interleaved)   "
              f"peak memory above inputs {mem[impl]:.2f} GiB (own process)")
    print(f"fused / full: time x{med['fused'] / med['full']:.2f}, peak memory x{mem['fused'] / max(mem['full'], 1e-9):.2f} "
          f"(goal: memory <= x0.25, time <= x1.00)")


if __name__ == "__main__":
    main()
