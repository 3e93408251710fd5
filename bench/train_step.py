#!/usr/bin/env python
"""Training-step throughput and CPU MFU of megamoe's small-moe vs transformers' DeepseekV3ForCausalLM.

Same weights (HF model built from megamoe's config, its state dict converted into megamoe's
layout with megamoe.hf), same optimizer (torch's fused AdamW, lr 1e-4), the same batches (a new
one at each step, as in training, so routing and every expert's row count change from step to
step), same precision, one process. The precision is the one this CPU runs fast (BENCH_PRECISION=auto: bf16
autocast over fp32 master weights where bf16 matmuls outrun fp32 ones, i.e. AMX; fp32 otherwise)
and is printed. MFU = achieved model FLOP/s (megamoe.monitor's FLOPs per token: 6 x active
non-embedding params + causal MLA attention) over the matmul peak at that precision measured in
this run. Ten steps each (BENCH_STEPS) alternate between the two models and the median step time
is used, so load from other processes hits both alike (with 4 the ratio swung by +-0.06 from run
to run on a shared machine). Prints a ratio megamoe / transformers.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from megamoe import hf  # noqa: E402
from megamoe.config import ModelConfig  # noqa: E402
from megamoe.monitor import (device_name, faster_cpu_precision, flops_per_token,  # noqa: E402
                             measure_cpu_matmul_peak, mfu)

BATCH, SEQ, WARMUP, STEPS = int(os.environ.get("BENCH_BATCH", 2)), 256, 1, int(os.environ.get("BENCH_STEPS", 10))


def main() -> int:
    from transformers import DeepseekV3ForCausalLM

    precision = os.environ.get("BENCH_PRECISION", "auto")
    precision = faster_cpu_precision() if precision == "auto" else precision
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    torch.manual_seed(0)
    cfg = ModelConfig.load("small-moe")
    hf_model = DeepseekV3ForCausalLM(hf.to_hf_config(cfg)).train()
    ours = cfg.build(seed=0).train()
    ours.load_state_dict(hf.from_hf_state_dict(hf_model.state_dict(), cfg), strict=True)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
    opt_hf = torch.optim.AdamW(hf_model.parameters(), lr=1e-4, fused=True)
    # a new batch at every step, the same sequence for both models: as in training, the routing,
    # and with it every expert's row count, changes from step to step
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=gen) for _ in range(WARMUP + STEPS)]

    def step_ours(tokens):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = ours(tokens[:, :-1], labels=tokens[:, 1:]).loss
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss.item()

    def step_hf(tokens):
        # HF shifts labels itself: give it the unshifted sequence (SEQ+1 tokens -> SEQ predictions)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = hf_model(input_ids=tokens[:, :SEQ], labels=tokens[:, :SEQ]).loss
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)
        return loss.item()

    first = (step_ours(batches[0]), step_hf(batches[0]))
    for i in range(1, WARMUP):
        step_ours(batches[i]), step_hf(batches[i])
    times = {"megamoe": [], "transformers": []}
    for i in range(WARMUP, WARMUP + STEPS):
        for name, fn in (("megamoe", step_ours), ("transformers", step_hf)):
            t0 = time.perf_counter()
            fn(batches[i])
            times[name].append(time.perf_counter() - t0)
    peak = measure_cpu_matmul_peak(dtype)
    fpt = flops_per_token(cfg, SEQ)["total"]
    print(f"small-moe training step, batch {BATCH} x seq {SEQ}, "
          f"{'bf16 autocast' if precision == 'bf16' else 'fp32'}, fused AdamW, {torch.get_num_threads()} "
          f"thread(s) of an {device_name()}; first-step loss megamoe {first[0]:.4f} / transformers "
          f"{first[1]:.4f} (same weights)")
    print(f"model FLOPs/token {fpt / 1e6:.2f} M; measured {precision} matmul peak {peak / 1e9:.1f} GFLOP/s")
    res = {}
    for name, ts in times.items():
        dt = statistics.median(ts)
        tok_s = BATCH * SEQ / dt
        util = mfu(tok_s * fpt, peak)
        res[name] = (tok_s, util)
        print(f"{name:13s} {dt * 1000:8.1f} ms/step  {tok_s:8.1f} tokens/s  {tok_s * fpt / 1e9:7.2f} GFLOP/s  "
              + (f"MFU {100 * util:.2f}%" if util is not None else
                 f"MFU n/a (above the measured {precision} peak: it does not stand for this step's kernels)"))
    print(f"ratio megamoe/transformers: tokens/s x{res['megamoe'][0] / res['transformers'][0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
