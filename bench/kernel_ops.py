"""Time megamoe's Triton kernels against PyTorch eager and torch.compile of the same reference.

    python bench/kernel_ops.py                 # CUDA when present, else CPU
    python bench/kernel_ops.py --no-compile    # skip torch.compile (its first build takes ~30 s)
    python bench/kernel_ops.py --ops rms_norm,route

For every op (rms_norm, apply_rope, route, and the MoE token permutation) it times the forward
and the forward+backward of:
  eager    kernels.reference.* in PyTorch eager
  compile  torch.compile(kernels.reference.*)
  triton   the Triton kernel (CUDA only)
and prints the milliseconds and the ratios eager/triton and compile/triton (>1: Triton faster).

On a machine without CUDA the Triton kernels can only run in the interpreter, whose speed says
nothing about a GPU: the script then says that GPU timings were not taken, and times only eager
vs torch.compile on the CPU (with CPU-sized shapes) so the harness itself stays exercised.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, Optional


import torch  # noqa: E402

from megamoe.kernels import reference  # noqa: E402


def timeit(fn: Callable[[], object], device: torch.device, min_time: float = 0.3,
           warmup: int = 3) -> float:
    """Median milliseconds per call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    start_all = time.perf_counter()
    while time.perf_counter() - start_all < min_time or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


# ---- problems: (reference fn, triton fn or None, inputs factory, grad inputs) ----------------
def problems(device: torch.device, gpu: bool):
    dt = torch.bfloat16 if gpu else torch.float32
    T = 16384 if gpu else 2048                      # tokens per micro-batch
    H = 7168 if gpu else 1024                       # DeepSeek-V3 hidden size on GPU
    B, S = (4, 4096) if gpu else (2, 256)
    NH = 128 if gpu else 16

    def rms_inputs():
        x = torch.randn(T, H, device=device, dtype=dt, requires_grad=True)
        w = torch.randn(H, device=device, dtype=dt, requires_grad=True)
        return (x, w, 1e-6), (x, w)

    def rope_inputs():
        x = torch.randn(B, S, NH, 64, device=device, dtype=dt, requires_grad=True)
        ang = torch.randn(1, S, 32, device=device)
        return (x, ang.cos(), ang.sin(), True), (x,)

    def route_inputs():
        logits = torch.randn(T, 256, device=device, requires_grad=True)
        bias = 0.01 * torch.randn(256, device=device)
        return (logits, bias, 8, "sigmoid", 8, 4, True, 2.5), (logits,)

    tri = {}
    if gpu:
        from megamoe.kernels import rmsnorm, rope, router
        tri = dict(rms_norm=rmsnorm.rms_norm, apply_rope=rope.apply_rope, route=router.route)
    return {
        "rms_norm": (reference.rms_norm, tri.get("rms_norm"), rms_inputs,
                     f"x [{T}, {H}] {dt}"),
        "apply_rope": (reference.apply_rope, tri.get("apply_rope"), rope_inputs,
                       f"x [{B}, {S}, {NH}, 64] {dt} interleaved"),
        "route": (reference.route, tri.get("route"), route_inputs,
                  f"logits [{T}, 256] E=256 k=8 groups 8/4 sigmoid"),
    }


def _fwd_bwd(fn, args, grads_of):
    out = fn(*args)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.is_floating_point()
            and o.requires_grad]
    loss = sum(o.float().sum() for o in outs)
    torch.autograd.grad(loss, grads_of)


def bench_op(name, ref_fn, tri_fn, make_inputs, device, use_compile) -> Dict[str, Dict[str, float]]:
    impls = {"eager": ref_fn}
    if use_compile:
        impls["compile"] = torch.compile(ref_fn, dynamic=False)
    if tri_fn is not None:
        impls["triton"] = tri_fn
    res = {}
    for label, fn in impls.items():
        args, grads_of = make_inputs()
        with torch.no_grad():
            fwd = timeit(lambda: fn(*args), device)
        fwdbwd = timeit(lambda: _fwd_bwd(fn, args, grads_of), device)
        res[label] = {"fwd": fwd, "fwd+bwd": fwdbwd}
    return res


# ---- token permutation (sort by expert, gather, weighted scatter-add back) -------------------
def bench_permute_share(device, gpu: bool):
    """How much of an eager MoE expert layer is the permutation (argsort + gather + weighted
    index_add) rather than the expert matmuls: the most a fused permute kernel could save."""
    dt = torch.bfloat16 if gpu else torch.float32
    T, H, I, E, K = (16384, 7168, 2048, 32, 8) if gpu else (1024, 512, 256, 16, 4)
    x = torch.randn(T, H, device=device, dtype=dt)
    w1 = torch.randn(E, 2 * I, H, device=device, dtype=dt) * H ** -0.5
    w2 = torch.randn(E, H, I, device=device, dtype=dt) * I ** -0.5
    idx = torch.randint(0, E, (T, K), device=device)
    wts = torch.rand(T, K, device=device)

    def permute():
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        token_of = order // K
        counts = torch.bincount(flat, minlength=E)
        return order, token_of, counts, x[token_of]

    def experts(x_sorted, counts):
        outs = []
        for e, chunk in enumerate(x_sorted.split(counts.tolist())):
            g, u = (chunk @ w1[e].T).chunk(2, -1)
            outs.append((torch.nn.functional.silu(g) * u) @ w2[e].T)
        return torch.cat(outs)

    order, token_of, counts, x_sorted = permute()
    y_sorted = experts(x_sorted, counts)

    def combine():
        y = y_sorted * wts.reshape(-1)[order].unsqueeze(-1).to(dt)
        return torch.zeros(T, H, device=device, dtype=dt).index_add_(0, token_of, y)

    t_perm = timeit(permute, device)
    t_comb = timeit(combine, device)
    t_exp = timeit(lambda: experts(x_sorted, counts), device)
    return dict(shape=f"T={T} H={H} I={I} E={E} k={K} {dt}", permute=t_perm, combine=t_comb,
                experts=t_exp, share=(t_perm + t_comb) / (t_perm + t_comb + t_exp))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile timings")
    p.add_argument("--ops", default="rms_norm,apply_rope,route,permute")
    args = p.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("TRITON_INTERPRET=1 is set: unset it, interpreter timings are meaningless")
        return 2
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    if gpu:
        print(f"device: {torch.cuda.get_device_name(device)} (CUDA); shapes are DeepSeek-V3 sized")
    else:
        print("device: CPU, no CUDA device. GPU TIMINGS WERE NOT TAKEN: the Triton kernels run "
              "only under the interpreter here, which says nothing about GPU speed. Timing "
              f"PyTorch eager vs torch.compile on CPU ({torch.get_num_threads()} threads, "
              "CPU-sized shapes) instead.")
    ops = args.ops.split(",")
    for name, (ref_fn, tri_fn, make_inputs, desc) in problems(device, gpu).items():
        if name not in ops:
            continue
        res = bench_op(name, ref_fn, tri_fn, make_inputs, device, not args.no_compile)
        print(f"\n{name}: {desc}")
        for phase in ("fwd", "fwd+bwd"):
            cells = "  ".join(f"{k} {v[phase]:8.3f} ms" for k, v in res.items())
            ratios = ""
            if "triton" in res:
                ratios = "  " + "  ".join(f"{k}/triton {res[k][phase] / res['triton'][phase]:5.2f}x"
                                          for k in res if k != "triton")
            elif "compile" in res:
                ratios = f"  eager/compile {res['eager'][phase] / res['compile'][phase]:5.2f}x"
            print(f"  {phase:8s} {cells}{ratios}")
    if "permute" in ops:
        r = bench_permute_share(device, gpu)
        print(f"\nMoE token permutation, eager ({r['shape']}):\n"
              f"  sort+gather {r['permute']:.3f} ms, weighted scatter-add {r['combine']:.3f} ms, "
              f"expert matmuls {r['experts']:.3f} ms -> permutation is {100 * r['share']:.1f}% "
              "of the expert layer (the ceiling on what a fused permute kernel could save)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
