#!/usr/bin/env python
"""AutoEP's token movement on CPU: DeepSpeed's fallback vs the row gathers megamoe installs
(megamoe.parallel.deepspeed_compat.autoep_gathers_on_cpu).

What one rank of an expert-parallel MoE layer does with its tokens around the experts, called
through DeepSpeed's own functions (deepspeed.module_inject.auto_ep_layer): the rows the all-to-all
delivered, grouped by local expert and source rank (`permute_by_local_expert`, with AutoEP's
alignment padding), back again (`unpermute_by_local_expert`), and, after the return all-to-all,
the weighted sum over each token's K slots (`combine_from_routed`, weighted_sum). The experts in
between are an identity, so only the token movement is timed: forward + backward, the two
variants timed round-robin in one process with the default allocator, median per variant. Both
variants' outputs and gradients are compared with torch.equal first. Default shape: the demo's
(micro batch 4 x 256 tokens per rank, top-10, hidden 256, 64 experts over EP 2).

    python bench/ep_tokens.py [--tokens 1024] [--top-k 10] [--hidden 256] [--experts 64] [--ep 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402


def variants():
    """{"deepspeed": {...}, "megamoe": {...}}: the module attributes each variant runs with."""
    from megamoe.parallel import deepspeed_compat
    deepspeed_compat.autoep_gathers_on_cpu()
    stock = dict(deepspeed_compat.AUTOEP_STOCK)
    return {"deepspeed": stock, "megamoe": {(m, n): getattr(m, n) for m, n in stock}}


def make_case(a, dtype):
    g = torch.Generator().manual_seed(0)
    T, K, E_local = a.tokens, a.top_k, a.experts // a.ep
    expert_TK = torch.rand(T, a.experts, generator=g).topk(K, dim=-1).indices
    order = torch.argsort(expert_TK.view(-1), stable=True)                    # AutoEP's token_indices_sorted
    # what arrives here after the all-to-all: every source rank's rows for this rank's experts
    counts = torch.bincount(torch.randint(0, E_local, (a.ep * T * K // a.ep,), generator=g),
                            minlength=E_local * a.ep).view(a.ep, E_local)
    received = torch.randn(int(counts.sum()), a.hidden, generator=g).to(dtype)
    returned = torch.randn(T * K, a.hidden, generator=g).to(dtype)            # after the return all-to-all
    scores = torch.rand(T, K, generator=g)
    grad = torch.randn(T, a.hidden, generator=g).to(dtype)
    return counts, order, received, returned, scores, grad


def step(case, a):
    import deepspeed.module_inject.auto_ep_layer as layer
    counts, order, received, returned, scores, grad = case
    rows, y, w = (t.detach().clone().requires_grad_() for t in (received, returned, scores))
    permuted, idx, _, n = layer.permute_by_local_expert(rows, counts)
    back = layer.unpermute_by_local_expert(permuted * 1, idx, n)     # the experts: an identity
    out = layer.combine_from_routed(y, w, order, a.top_k, "post", "weighted_sum", (1, a.tokens, a.hidden))
    torch.autograd.backward([back, out.view(a.tokens, a.hidden)], [torch.ones_like(back), grad])
    return back.detach(), out.detach(), rows.grad, y.grad, w.grad


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--steps", type=int, default=15)
    a = p.parse_args()
    impls = variants()

    def use(name):
        for (module, attr), fn in impls[name].items():
            setattr(module, attr, fn)

    print(f"AutoEP token movement, one rank: {a.tokens} tokens x top-{a.top_k}, hidden {a.hidden}, "
          f"{a.experts // a.ep} local experts x {a.ep} sources, {torch.get_num_threads()} thread(s); "
          f"forward + backward, median of {a.steps}, round-robin")
    for dtype in (torch.bfloat16, torch.float32):
        case = make_case(a, dtype)
        results = {}
        for name in impls:
            use(name)
            results[name] = step(case, a)
        same = all(torch.equal(x, y) for x, y in zip(results["deepspeed"], results["megamoe"]))
        times = {name: [] for name in impls}
        for _ in range(a.steps):
            for name in impls:
                use(name)
                t0 = time.perf_counter()
                step(case, a)
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        print(f"{str(dtype).split('.')[-1]:9s} deepspeed's fallback {med['deepspeed'] * 1e3:7.2f} ms   "
              f"megamoe's gathers {med['megamoe'] * 1e3:7.2f} ms   x{med['deepspeed'] / med['megamoe']:.2f} faster   "
              f"outputs and gradients bit-identical: {same}")
    use("megamoe")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
