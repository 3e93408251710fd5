"""Rank script for tests/train/test_plan.py: the measured peak memory of a few training steps.

usage: plan_rank.py SPEC.json OUT.json
SPEC: {"model": preset, "overrides": {...}, "ds_config": {...}, "ep": int, "micro": int, "seq": int,
       "recompute": bool, "steps": int}
Measures host memory as the planner counts it: resident memory after the imports and process
groups (the base), then, after one step has allocated the optimizer states, the kernel's peak
(VmHWM, reset through /proc/self/clear_refs) over the next steps. Run with
MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave the resident set (glibc would keep them).
Rank 0 writes {"peak_bytes": max over ranks, "base_bytes": ...}.
"""
import json
import re
import sys

import torch


def status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def main():
    import torch.distributed as dist

    from megamoe.config import ModelConfig
    from megamoe.distributed import end_process, init_distributed, rank
    from megamoe.optim import GroupSpec, param_groups
    from megamoe.parallel import expert
    from megamoe.parallel.build import build_model

    spec = json.load(open(sys.argv[1]))
    init_distributed()
    torch.manual_seed(0)
    cfg = ModelConfig.load(spec["model"], **spec.get("overrides", {}))
    ds = spec["ds_config"]
    use_autoep = spec["ep"] > 1
    gen = torch.Generator().manual_seed(rank())
    ids = torch.randint(0, cfg.vocab_size, (spec["micro"], spec["seq"]), generator=gen)
    import deepspeed  # noqa: F401  (everything imported before the base is read)

    import megamoe.kernels  # noqa: F401
    import megamoe.model.transformer  # noqa: F401
    cfg.build(device="meta")
    base = status_kib("VmRSS")
    model = build_model(cfg, 0, ds, use_autoep, "cpu")
    model.set_gradient_checkpointing(spec["recompute"])
    groups = param_groups(model, GroupSpec(weight_decay=0.1), 1e-4, ds["optimizer"]["params"])
    engine, _, _, _ = expert.initialize(model, cfg, ds, spec["ep"], use_autoep=use_autoep, model_parameters=groups)
    peak = 0
    for step in range(spec["steps"]):
        if step == 1:   # the optimizer states exist now; the start-up transients are over
            open("/proc/self/clear_refs", "w").write("5")
        loss = engine(ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    peak = status_kib("VmHWM")
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, (peak * 1024, base * 1024))
    if rank() == 0:
        with open(sys.argv[2], "w") as f:
            json.dump({"peak_bytes": max(p - b for p, b in peaks), "per_rank": peaks}, f)
    end_process(0)


if __name__ == "__main__":
    main()
