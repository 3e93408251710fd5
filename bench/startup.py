"""Start-up: time and host memory to build the model on one rank, before and after "build where it
lives", for DeepSeek-V2-Lite shapes on the CPU (fp32, as DeepSpeed receives the module).

    python bench/startup.py [--model deepseek-v2-lite] [--world 8] [--ep 8] [--layers 4]

Contenders, each in its own process (time = wall clock of the build; memory = peak RSS above the
process after its imports, from ru_maxrss):
  whole       what every rank did before: the whole model constructed on the host (torch's default
              init of every Linear), then filled parameter by parameter from one CPU generator
  rank share  what rank 0 of --world builds now (megamoe.parallel.build): layout on the meta
              device, dense weights materialised with their per-parameter values, and only its
              EP slice of the routed experts (--ep), built by the same ExpertSlices AutoEP asks
              for inside deepspeed.initialize (DeepSpeed itself is not run here). On a GPU the
              values are drawn on the device, so the host holds none of this.
The whole model of V2-Lite is 15.7B parameters, 63 GB in fp32: more than this machine has. So
both contenders are measured at --layers (default 4) for the ratio, and the rank share is also
measured at the model's full depth; nothing is extrapolated.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time


def config(name: str, layers: int | None):
    from megamoe.config import ModelConfig
    overrides = {"num_hidden_layers": layers} if layers else {}
    return ModelConfig.load(name, **overrides)


def build_whole_as_before(cfg, seed: int = 0):
    """The pre-meta path, kept here as the baseline: construct on the host, then one generator
    walks every parameter in order."""
    import torch

    from megamoe.model.transformer import Transformer
    model = Transformer(cfg)
    gen = torch.Generator().manual_seed(seed)
    std, out_std = cfg.initializer_range, cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            s = out_std if name.endswith(("wo.weight", "down_proj.weight", "down_proj")) else std
            p.copy_(torch.normal(0.0, s, p.shape, generator=gen))
    return model


def build_rank_share(cfg, ep: int, seed: int = 0):
    from megamoe.parallel.expert import MOE_LAYER_PATTERN
    model = cfg.build(seed=seed, device="cpu", defer_experts_of=MOE_LAYER_PATTERN)
    n = cfg.n_routed_experts // ep
    local = [m.expert_slices.build(0, n) for m in model.modules() if hasattr(m, "expert_slices")]
    return model, local


def held(model, local=()) -> int:
    return sum(p.numel() for p in model.parameters() if not p.is_meta) + sum(t.numel() for pair in local for t in pair)


def measure(a) -> None:
    import torch

    import megamoe.model.transformer  # noqa: F401  (imports outside what is measured)
    import megamoe.parallel.expert  # noqa: F401
    torch.set_num_threads(1)
    cfg = config(a.model, a.layers)
    cfg.build(device="meta")   # first-call costs (meta kernels, generator set-up) outside too
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if a.measure == "whole":
        model, local = build_whole_as_before(cfg), ()
    else:
        model, local = build_rank_share(cfg, a.ep)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_gib": (peak - base) / 2 ** 20, "params": held(model, local)}))


def run(contender: str, a, layers: int | None) -> dict:
    args = [sys.executable, __file__, "--measure", contender, "--model", a.model, "--ep", str(a.ep),
            "--layers", str(layers or 0)]   # 0: the model's own depth
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{contender} at {layers or 'full'} layers failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="deepseek-v2-lite")
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--ep", type=int, default=8)
    p.add_argument("--layers", type=int, default=4, help="depth at which the whole model is also built (0: the model's)")
    p.add_argument("--measure", choices=["whole", "rank share"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:
        return measure(a)
    full = config(a.model, None)
    print(f"{a.model}: {full.num_params()['total'] / 1e9:.2f}B parameters, {full.num_hidden_layers} layers; "
          f"rank 0 of {a.world} GPUs at EP {a.ep} (ZeRO-1/2: dense weights on every rank); fp32, 1 thread, "
          f"each build in its own process")
    rows = []
    for contender, layers in (("whole", a.layers), ("rank share", a.layers), ("rank share", None)):
        r = run(contender, a, layers)
        rows.append((contender, layers or full.num_hidden_layers, r))
        print(f"  {contender:<10} {layers or full.num_hidden_layers:>3} layers: {r['seconds']:7.1f} s, "
              f"peak host memory {r['peak_gib']:6.2f} GiB, {r['params'] / 1e9:6.2f}B parameters held")
    whole, share = rows[0][2], rows[1][2]
    print(f"rank share / whole at {a.layers} layers: time x{share['seconds'] / whole['seconds']:.2f}, "
          f"peak host memory x{share['peak_gib'] / whole['peak_gib']:.2f}")
    whole_gib = full.num_params()["total"] * 4 / 2 ** 30
    print(f"at full depth the whole model would hold {whole_gib:.1f} GiB of fp32 weights per rank "
          f"({a.world * whole_gib:.0f} GiB per {a.world}-GPU node); the rank share measured {rows[2][2]['peak_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
