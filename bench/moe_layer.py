"""MoE layer forward+backward: megamoe vs transformers' DeepseekV3MoE vs DeepSpeed's classic MoE.

Same sizes for all three (hidden H, E routed experts of intermediate I, top-k, one shared expert),
fp32, no token dropping (DeepSpeed: drop_tokens=False).
Time: the three layers built in one process with the default allocator and timed round-robin,
one step of each per round (the machine is shared and noisy: interleaving spreads the noise),
each round on a new input (the same for all three: routing changes from step to step as in
training), median per layer; each layer's FLOP/s (the same analytic count for all: router, routed and shared
experts, forward and backward = 3x forward) as a fraction of the fp32 matmul peak measured in
this process. A fourth row, "matmuls only", times megamoe's matmuls alone at each round's
routing (the same FLOPs, nothing else): the fraction of peak any layer built on these matmul
kernels stays under. Memory: a separate pass, each layer in its own subprocess so the peak is its own.
"peak MB" is the tensor peak of a warm step, gradients included: torch.cuda.max_memory_allocated
on CUDA, the same count from torch.profiler's allocator events on CPU. "RSS MB" (CPU) is the
process's resident-set growth during the first, cold step, sampled every ms with glibc's mmap
threshold lowered in that subprocess only so freed tensors leave RSS: it adds what a first call
builds once and keeps (oneDNN's JIT kernels per matmul shape, allocator arenas, lazy imports).

    python bench/moe_layer.py [--tokens 2048] [--hidden 256] [--inter 128] [--experts 64] [--top-k 6]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time


IMPLS = ("megamoe", "transformers", "deepspeed")
MATMULS = "matmuls only"   # megamoe's matmuls alone: not a layer, the ceiling its kernels set


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples RSS every millisecond in a thread: CPU tensors are not seen by any allocator hook."""

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()


def build(impl: str, a, device):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(0)
    if impl == "megamoe":
        from megamoe.config import ModelConfig
        from megamoe.model.moe import MoE
        cfg = ModelConfig(hidden_size=a.hidden, n_routed_experts=a.experts, num_experts_per_tok=a.top_k,
                          moe_intermediate_size=a.inter, n_shared_experts=1, scoring_func="softmax",
                          norm_topk_prob=False, vocab_size=128).validate()
        layer = MoE(cfg)
        for p in layer.parameters():
            nn.init.normal_(p, std=0.02)
        return layer.to(device), lambda x: layer(x)
    if impl == "transformers":
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
        cfg = DeepseekV3Config(hidden_size=a.hidden, n_routed_experts=a.experts, num_experts_per_tok=a.top_k,
                               moe_intermediate_size=a.inter, n_shared_experts=1, n_group=1, topk_group=1,
                               norm_topk_prob=False)
        layer = DeepseekV3MoE(cfg)
        for p in layer.parameters():
            nn.init.normal_(p, std=0.02)
        return layer.to(device), lambda x: layer(x)
    if impl == "deepspeed":
        from megamoe.distributed import init_distributed
        init_distributed()
        from deepspeed.moe.layer import MoE as DSMoE

        class SwiGLU(nn.Module):
            def __init__(self, h, i):
                super().__init__()
                self.w1, self.w3, self.w2 = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False), nn.Linear(i, h, bias=False)

            def forward(self, x):
                return self.w2(F.silu(self.w1(x)) * self.w3(x))

        class Layer(nn.Module):
            def __init__(self):
                super().__init__()
                self.moe = DSMoE(a.hidden, SwiGLU(a.hidden, a.inter), num_experts=a.experts, ep_size=1, k=a.top_k,
                                 drop_tokens=False, use_rts=False)
                self.shared = SwiGLU(a.hidden, a.inter)

            def forward(self, x):
                return self.moe(x)[0] + self.shared(x)

        layer = Layer()
        for p in layer.parameters():
            nn.init.normal_(p, std=0.02)
        return layer.to(device), lambda x: layer(x)
    raise ValueError(impl)


def make_step(impl: str, a, device):
    import torch
    layer, fwd = build(impl, a, device)
    x = torch.randn(a.tokens // a.seq, a.seq, a.hidden, device=device, requires_grad=True)
    grad = torch.randn_like(x)

    def release():
        layer.zero_grad(set_to_none=True)
        x.grad = None

    def step(x_in=None):
        release()
        if x_in is not None:    # a round's own input (time_interleaved): new routing, new row counts
            x.data = x_in
        fwd(x).backward(grad)
        if device == "cuda":
            torch.cuda.synchronize()
    step.release = release
    return step


def tensor_peak_cpu(step) -> int:
    """Peak bytes of CPU tensors allocated and still live during step(): the running sum of the
    allocator's events that torch.profiler records (its memory timeline reads the same), i.e.
    what torch.cuda.max_memory_allocated counts on a GPU."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_memory(impl: str, a) -> dict:
    """The memory pass, in this (sub)process: the RSS growth of the first (cold) step, then the
    tensor peak of a warm one, each step's gradients (weights and input) allocated inside it."""
    import torch
    torch.set_num_threads(a.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    step = make_step(impl, a, device)
    with PeakRSS() as mem:
        step()
    step.release()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        tensors = torch.cuda.max_memory_allocated() - base
    else:
        tensors = tensor_peak_cpu(step)
    return {"impl": impl, "peak_mb": tensors / 2**20, "rss_mb": (mem.peak - mem.base) / 2**20}


def layer_flops(a) -> float:
    """Forward + backward FLOPs of one step: router [T, H] x [H, E], top-k routed and one shared
    SwiGLU expert per token (3 matmuls of H x I each); backward = 2x forward."""
    T = a.tokens
    fwd = 2 * T * a.hidden * a.experts + (a.top_k + 1) * 3 * 2 * T * a.hidden * a.inter
    return 3 * fwd


def make_matmul_step(a, device, rounds):
    """The layer's matmuls alone, at each round's routing: megamoe's router (the same weights)
    gives the per-expert row counts, then the six grouped matmuls of the routed experts (forward
    gate/up and down, their input and weight gradients) and the shared expert's and router's
    matmuls run on operands allocated once (the token count after routing is fixed: dropless,
    T x K rows). The same FLOPs as layer_flops: the ceiling for a layer built on these kernels."""
    import torch

    from megamoe import kernels
    layer, _ = build("megamoe", a, device)
    T, H, I, E, K = a.tokens, a.hidden, a.inter, a.experts, a.top_k
    with torch.no_grad():
        counts = {id(x): layer.router.route(x.view(T, H)).counts_E for x in rounds}
    offs = {k: c.cumsum(0).to(torch.int32) for k, c in counts.items()}
    g = torch.Generator(device=device).manual_seed(2)
    rnd = lambda *shape: torch.randn(*shape, device=device, generator=g)  # noqa: E731
    x_NH, dy_NH, a_NI, dh_N2I = rnd(T * K, H), rnd(T * K, H), rnd(T * K, I), rnd(T * K, 2 * I)
    w_gu, w_d = rnd(E, 2 * I, H), rnd(E, H, I)
    x_TH, dy_TH, w_r = rnd(T, H), rnd(T, H), rnd(E, H)
    s_gu, s_d, s_a, s_dh = rnd(2 * I, H), rnd(H, I), rnd(T, I), rnd(T, 2 * I)

    def step(x_in=None):
        key = id(x_in) if x_in is not None else next(iter(counts))
        c, o = counts[key], offs[key]
        kernels.grouped_mm(x_NH, w_gu, c, o)                       # forward: gate/up
        kernels.grouped_mm(a_NI, w_d, c, o)                        #          down
        kernels.grouped_mm(dy_NH, w_d.transpose(1, 2), c, o)       # input gradients
        kernels.grouped_mm(dh_N2I, w_gu.transpose(1, 2), c, o)
        kernels.grouped_mm_wgrad(dy_NH, a_NI, c, o)                # weight gradients
        kernels.grouped_mm_wgrad(dh_N2I, x_NH, c, o)
        x_TH @ w_r.t(), dy_TH[:, :E] @ w_r, dy_TH[:, :E].t() @ x_TH              # router
        x_TH @ s_gu.t(), s_a @ s_d.t(), dy_TH @ s_d, s_dh @ s_gu                 # shared expert
        dy_TH.t() @ s_a, s_dh.t() @ x_TH
    step.release = lambda: None
    return step


def time_interleaved(a, impls) -> tuple[dict, float, str]:
    import torch

    from megamoe.monitor import measure_cpu_matmul_peak
    torch.set_num_threads(a.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # every round a new input, the same for every layer: as in training, the routing and with it
    # each expert's row count change from step to step (on CPUs a matmul of a new shape is
    # compiled first: with one input throughout, that cost would never be seen)
    gen = torch.Generator(device=device).manual_seed(1)
    rounds = [torch.randn(a.tokens // a.seq, a.seq, a.hidden, device=device, generator=gen) for _ in range(a.steps)]
    steps = {impl: make_step(impl, a, device) for impl in impls}
    steps[MATMULS] = make_matmul_step(a, device, rounds)
    for step in steps.values():   # warm-up
        step()
    times = {impl: [] for impl in steps}
    for x in rounds:
        for impl, step in steps.items():
            t0 = time.perf_counter()
            step(x)
            times[impl].append(time.perf_counter() - t0)
    peak = measure_cpu_matmul_peak(torch.float32) if device == "cpu" else None
    return {k: 1000 * statistics.median(v) for k, v in times.items()}, peak, device


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--inter", type=int, default=128)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--steps", type=int, default=20, help="timed rounds (one step of every layer each)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory-of", choices=IMPLS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.memory_of:
        print(json.dumps(peak_memory(a.memory_of, a)))
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # memory first, each layer in its own process (the mmap threshold there only)
    mem_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    mem = {}
    for impl in IMPLS:
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--memory-of", impl], env=mem_env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{impl}: memory pass failed\n{proc.stderr[-2000:]}")
            continue
        mem[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
    ms, peak, device = time_interleaved(a, [i for i in IMPLS if i in mem])
    flops = layer_flops(a)
    from megamoe.monitor import device_name
    print(f"MoE layer fwd+bwd: {a.tokens} tokens, H={a.hidden}, E={a.experts} x I={a.inter}, top-{a.top_k}, "
          f"1 shared expert, fp32, no token dropping, {a.threads} thread(s), device={device} ({device_name()}); "
          f"{a.steps} rounds "
          f"interleaved; {flops / 1e9:.2f} GFLOP/step" + (f"; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s "
                                                         "measured in this run" if peak else ""))
    print(f"{'impl':14s} {'ms/step':>9s} {'of peak':>8s} {'peak MB':>9s} {'RSS MB':>8s} {'time vs megamoe':>16s} "
          f"{'mem vs megamoe':>15s}")
    for impl in ms:
        tr = ms[impl] / ms["megamoe"]
        frac = f"{100 * flops / (ms[impl] / 1000) / peak:7.1f}%" if peak else "     n/a"
        if impl == MATMULS:
            print(f"{impl:14s} {ms[impl]:9.1f} {frac} {'-':>9s} {'-':>8s} {tr:15.2f}x {'-':>15s}")
            continue
        mr = mem[impl]["peak_mb"] / mem["megamoe"]["peak_mb"] if mem["megamoe"]["peak_mb"] > 0 else float("nan")
        rss = f"{mem[impl]['rss_mb']:8.1f}" if device == "cpu" else "     n/a"
        print(f"{impl:14s} {ms[impl]:9.1f} {frac} {mem[impl]['peak_mb']:9.1f} {rss} {tr:15.2f}x {mr:14.2f}x")


if __name__ == "__main__":
    main()
