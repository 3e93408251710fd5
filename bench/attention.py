"""MLA attention on CPUs through PyTorch SDPA: megamoe's sdpa backend (q/k and v padded to one head
dim, so SDPA runs its fused flash kernel) vs SDPA given MLA's unequal head dims as they are (its
math path: [B, H, Sq, Sk] fp32 scores and probabilities), causal, forward + backward.

    python bench/attention.py [--batch 2] [--seq 256 1024] [--heads 4] [--qk-dim 48] [--v-dim 32]

Defaults: small-moe's attention (48 = 32 nope + 16 rope, v 32) at its training length and at 4x.
Time: both contenders in one process, interleaved round-robin, default allocator, median of
--repeat rounds, bf16 and fp32. Memory: a separate, untimed pass of each, the peak of the tensors
it allocates (torch.profiler's allocator events, as bench/moe_layer.py reads them). Prints the ratios.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from megamoe import kernels
from moe_layer import tensor_peak_cpu  # noqa: E402  (bench/ is the script's directory)

IMPLS = ("unequal", "megamoe")


def inputs(a, seq: int, dtype):
    g = torch.Generator().manual_seed(0)
    mk = lambda d: torch.randn(a.batch, seq, a.heads, d, generator=g).to(dtype).requires_grad_()  # noqa: E731
    return mk(a.qk_dim), mk(a.qk_dim), mk(a.v_dim)


def step(impl: str, q, k, v, scale: float) -> None:
    if impl == "megamoe":
        out = kernels.attention(q, k, v, scale, backend="sdpa")
    else:
        with warnings.catch_warnings():   # CPU SDPA warns that no fused kernel takes these dims
            warnings.simplefilter("ignore")
            out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True,
                                                 scale=scale).transpose(1, 2)
    out.backward(torch.ones_like(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--qk-dim", type=int, default=48)
    p.add_argument("--v-dim", type=int, default=32)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--repeat", type=int, default=20)
    a = p.parse_args()
    print(f"MLA attention fwd+bwd on {torch.get_num_threads()} CPU thread(s): batch {a.batch}, {a.heads} heads, "
          f"q/k dim {a.qk_dim}, v dim {a.v_dim}, causal; SDPA with unequal dims vs megamoe's padded sdpa")
    print(f"{'seq':>5} {'dtype':9} {'unequal ms':>10} {'megamoe ms':>10} {'speed-up':>8} "
          f"{'unequal MiB':>11} {'megamoe MiB':>11} {'memory':>7}")
    for seq in a.seq:
        for dtype in a.dtypes:
            q, k, v = inputs(a, seq, getattr(torch, dtype))
            mem = {impl: tensor_peak_cpu(lambda: step(impl, q, k, v, a.qk_dim ** -0.5)) / 2 ** 20 for impl in IMPLS}
            times = {impl: [] for impl in IMPLS}
            for impl in IMPLS:
                step(impl, q, k, v, a.qk_dim ** -0.5)   # warm-up
            for _ in range(a.repeat):
                for impl in IMPLS:
                    t0 = time.perf_counter()
                    step(impl, q, k, v, a.qk_dim ** -0.5)
                    times[impl].append(time.perf_counter() - t0)
            ms = {impl: 1e3 * statistics.median(ts) for impl, ts in times.items()}
            print(f"{seq:5d} {dtype:9} {ms['unequal']:10.2f} {ms['megamoe']:10.2f} "
                  f"{ms['unequal'] / ms['megamoe']:7.2f}x {mem['unequal']:11.1f} {mem['megamoe']:11.1f} "
                  f"{mem['megamoe'] / mem['unequal']:6.2f}x")


if __name__ == "__main__":
    main()
