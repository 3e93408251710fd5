#!/usr/bin/env python
"""The experts of an expert-parallel layer: DeepSpeed AutoEP's GroupedExperts vs the subclass
megamoe has AutoEP build (megamoe.parallel.expert.recomputing_experts, backward through
megamoe.model.dispatch.SortedExperts).

Both get the same weights and the same rows in expert order, as AutoEP hands them over after its
all-to-all (here: --tokens x --top-k rows routed at random to the --experts this rank owns), and
run --layers such layers in a chain (each one's output the next one's input), so the peak is what
a model's is: every layer's saved activations plus one layer's backward temporaries. (megamoe's
backward holds the saved [gate | up] and its gradient at once, so a single layer's peak is higher
than DeepSpeed's: `--layers 1` shows it; from two layers on, the smaller saved set wins.)
Time: forward + backward, the two timed round-robin in one process with the default allocator,
median per contender, and each one's FLOP/s (3 grouped matmuls forward, twice that backward) as
a fraction of the matmul peak at that dtype measured in this process. Memory, in a separate pass:
the activation bytes each keeps for backward (torch's saved-tensor hooks; weights excluded) and
the tensor peak of one forward + backward (torch.profiler's allocator events on CPU,
max_memory_allocated on CUDA).

    python bench/ep_experts.py [--tokens 2048] [--top-k 6] [--experts 32] [--hidden 256] [--inter 128]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from moe_layer import tensor_peak_cpu  # noqa: E402  (bench/ is the script's directory)

IMPLS = ("deepspeed", "megamoe")


def build(impl: str, a, dtype, device):
    from deepspeed.moe.ep_experts import GroupedExperts

    from megamoe.parallel.expert import recomputing_experts
    cls = GroupedExperts if impl == "deepspeed" else recomputing_experts(GroupedExperts)
    torch.manual_seed(0)
    experts = cls(dim=a.hidden, hidden_dim=a.inter, num_experts=a.experts)
    for w in experts.parameters():
        torch.nn.init.normal_(w, std=0.02)
    return experts.to(device=device, dtype=dtype)


def make_step(impl: str, a, dtype, device):
    layers = [build(impl, a, dtype, device) for _ in range(a.layers)]
    g = torch.Generator().manual_seed(1)
    rows = a.tokens * a.top_k
    counts = torch.bincount(torch.randint(0, a.experts, (rows,), generator=g), minlength=a.experts).to(torch.int32)
    x = torch.randn(rows, a.hidden, generator=g).to(device=device, dtype=dtype).requires_grad_()
    grad = torch.randn(rows, a.hidden, generator=g).to(device=device, dtype=dtype)
    counts = counts.to(device)

    def forward():
        y = x
        for experts in layers:
            y = experts(y, counts)
        return y

    def step():
        for experts in layers:
            experts.zero_grad(set_to_none=True)
        x.grad = None
        forward().backward(grad)
        if device == "cuda":
            torch.cuda.synchronize()
    step.forward = forward
    step.params = [w for experts in layers for w in experts.parameters()]
    return step


def flops(a) -> float:
    return 3 * 3 * 2 * a.tokens * a.top_k * a.hidden * a.inter * a.layers


def saved_bytes(step) -> int:
    """Bytes of the distinct non-weight storages one forward keeps for backward."""
    weights = {p.untyped_storage().data_ptr() for p in step.params}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights and t.dtype.is_floating_point:
            seen[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step.forward()
    return sum(seen.values())


def tensor_peak(step, device) -> int:
    if device != "cuda":
        return tensor_peak_cpu(step)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    return torch.cuda.max_memory_allocated() - base


def run(a, dtype, device) -> None:
    from megamoe.monitor import measure_cpu_matmul_peak
    steps = {impl: make_step(impl, a, dtype, device) for impl in IMPLS}
    for step in steps.values():   # warm-up
        step()
    times = {impl: [] for impl in IMPLS}
    for _ in range(a.steps):
        for impl, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[impl].append(time.perf_counter() - t0)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    peak = measure_cpu_matmul_peak(dtype) if device == "cpu" else None
    mem = {impl: (saved_bytes(step), tensor_peak(step, device)) for impl, step in steps.items()}
    name = str(dtype).replace("torch.", "")
    print(f"{name}, {a.layers} layers of {a.tokens} tokens x top-{a.top_k} = {a.tokens * a.top_k} rows, "
          f"{a.experts} local experts, H {a.hidden}, I {a.inter}" + (f"; {name} matmul peak {peak / 1e9:.1f} GFLOP/s" if peak else ""))
    for impl in IMPLS:
        frac = f", {flops(a) / (ms[impl] / 1e3) / peak:.1%} of peak" if peak else ""
        print(f"  {impl:10s} {ms[impl]:7.1f} ms{frac}; saved for backward {mem[impl][0] / 2**20:6.1f} MB, "
              f"tensor peak {mem[impl][1] / 2**20:6.1f} MB")
    print(f"  megamoe / deepspeed: time x{ms['megamoe'] / ms['deepspeed']:.2f}, saved "
          f"x{mem['megamoe'][0] / mem['deepspeed'][0]:.2f}, peak x{mem['megamoe'][1] / mem['deepspeed'][1]:.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--experts", type=int, default=32, help="experts on this rank (64 at EP 2)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--inter", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for d in a.dtypes:
        run(a, {"fp32": torch.float32, "bf16": torch.bfloat16}[d], device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
