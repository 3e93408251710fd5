"""MoE layer forward+backward: megamoe vs transformers' DeepseekV3MoE vs DeepSpeed's classic MoE.

Same sizes for all three (hidden H, E routed experts of intermediate I, top-k, one shared expert),
no token dropping (DeepSpeed: drop_tokens=False). Each implementation runs in its own subprocess
so peak memory is its own: torch.cuda.max_memory_allocated on CUDA; on CPU the RSS growth during
the first step, sampled every ms, with glibc's mmap threshold fixed so freed tensors leave RSS.
Prints median time per step and peak memory, and both as ratios to megamoe, measured in this run.

    python bench/moe_layer.py [--tokens 4096] [--hidden 512] [--experts 16] [--top-k 4] [--steps 10]
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


def run_one(impl: str, a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer, fwd = build(impl, a, device)
    x = torch.randn(a.tokens // a.seq, a.seq, a.hidden, device=device, requires_grad=True)
    grad = torch.randn_like(x)

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        fwd(x).backward(grad)
        if device == "cuda":
            torch.cuda.synchronize()

    # Memory: the first (cold) step, so no allocator cache hides what the layer needs.
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS() as mem:
        step()
    peak = (torch.cuda.max_memory_allocated() - base) if device == "cuda" else (mem.peak - mem.base)
    step()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"impl": impl, "device": device, "ms": 1000 * statistics.median(times), "peak_mb": peak / 2**20}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--inter", type=int, default=256)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--only", choices=IMPLS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.only:
        print(json.dumps(run_one(a.only, a)))
        return
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "TRANSFORMERS_VERBOSITY": "error",
           # glibc returns blocks above this size to the OS on free, so sampled RSS tracks live tensors
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    results = {}
    for impl in IMPLS:
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", impl], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{impl}: failed\n{proc.stderr[-2000:]}")
            continue
        results[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"MoE layer fwd+bwd: {a.tokens} tokens, H={a.hidden}, E={a.experts} x I={a.inter}, top-{a.top_k}, "
          f"1 shared expert, no token dropping, {a.steps} steps, device={next(iter(results.values()))['device']}")
    ours = results.get("megamoe")
    print(f"{'impl':14s} {'ms/step':>9s} {'peak MB':>9s} {'time vs megamoe':>16s} {'mem vs megamoe':>15s}")
    for impl, r in results.items():
        tr = r["ms"] / ours["ms"] if ours else float("nan")
        mr = r["peak_mb"] / ours["peak_mb"] if ours and ours["peak_mb"] > 0 else float("nan")
        print(f"{impl:14s} {r['ms']:9.1f} {r['peak_mb']:9.1f} {tr:15.2f}x {mr:14.2f}x")


if __name__ == "__main__":
    main()
