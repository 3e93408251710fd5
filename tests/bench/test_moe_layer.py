"""bench/moe_layer.py's "matmuls only" row: the layer's FLOPs exactly, at the round's routing."""
import argparse
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_matmuls_only_does_the_layers_flops_at_each_rounds_routing():
    sys.path.insert(0, str(BENCH))   # moe_layer is a script that imports its neighbours by name
    try:
        import moe_layer
    finally:
        sys.path.remove(str(BENCH))
    a = argparse.Namespace(tokens=256, seq=128, hidden=64, inter=32, experts=8, top_k=2)
    rounds = [torch.randn(2, 128, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    step = moe_layer.make_matmul_step(a, "cpu", rounds)
    grouped, rows = [], []

    class Grouped(TorchDispatchMode):   # FlopCounterMode has no formula for torch._grouped_mm
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._grouped_mm.default:
                x, offs = args[0], (kwargs or {}).get("offs", args[2] if len(args) > 2 else None)
                rows.append(offs.tolist())
                # [N, K] x [E, K, M] -> [N, M]; weight gradients [M, N] x [N, K] -> [E, M, K]
                inner = x.shape[1] if out.dim() == 2 else int(offs[-1])
                grouped.append(2 * out.shape[-2] * out.shape[-1] * inner)
            return out

    for x in rounds:
        grouped.clear(), rows.clear()
        with FlopCounterMode(display=False) as plain, Grouped():
            step(x)
        counts = moe_layer.build("megamoe", a, "cpu")[0].router.route(x.view(256, 64)).counts_E
        assert rows == [counts.cumsum(0).tolist()] * 6         # this round's routing, every grouped matmul
        assert len(grouped) == 6
        assert plain.get_total_flops() + sum(grouped) == moe_layer.layer_flops(a)
