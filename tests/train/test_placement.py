"""Device placement of the training loop, proven on CPU (the GPU failures it stands for: a CPU
batch reaching a CUDA embedding; a CPU tensor entering an NCCL collective, which takes device
tensors only).

Every tensor megamoe's loop creates on the host (stop flag, timers, the loss guard's flags, eval
sums, dropped-token shares, QK-clip maxima) must be reduced on the host (gloo) group, and every
batch must go through distributed.to_device before the engine sees it. A separate gloo group
stands in for the host group, so a collective that would have gone to NCCL is told apart."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import multirank

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


@pytest.mark.slow
def test_host_tensors_use_the_host_group_and_batches_go_to_the_device(progression_corpus):
    rc, out = multirank.run([HERE / "placement_rank.py", progression_corpus, ROOT / "tests" / "assets" /
                             "ds_fp32_zero2.json"], nproc=1, timeout=300)
    assert rc == 0, out[-4000:]
    assert "attention backend: sdpa (auto: fa3: " in out and "flash: " in out, out[-3000:]   # chosen once, said why
    seen = json.loads(next(ln for ln in out.splitlines() if ln.startswith("PLACEMENT "))[len("PLACEMENT "):])
    assert seen["rc"] == 0
    ours = [c for c in seen["calls"] if c["caller"].startswith("megamoe")]
    # the routers' counts (balance) and the loss guard's sums are device tensors: the default group is right
    on_device = {"megamoe.parallel.balance", "megamoe.guard"}
    host_side = [c for c in ours if c["caller"] not in on_device]
    assert host_side and all(c["host_group"] for c in host_side), host_side
    assert {c["caller"] for c in host_side} == {"megamoe.distributed"}   # all through all_reduce_host
    assert all(not c["host_group"] for c in ours if c["caller"] in on_device)
    # 3 training iterations x GAS 1 and the one read ahead (Prefetcher), and eval after iterations 2
    # and 3 (one batch each)
    assert len(seen["moved"]) == 3 + 1 + 2 and all(m == ["input_ids", "labels"] for m in seen["moved"])


def test_to_device_moves_a_batch_to_the_accelerator_device(monkeypatch):
    import torch

    from megamoe import distributed
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.ones(2, 4, dtype=torch.long)}
    assert distributed.to_device(batch) is batch                     # CPU accelerator: nothing to do
    monkeypatch.setattr(distributed, "device", lambda: torch.device("meta"))
    moved = distributed.to_device(batch)
    assert {v.device.type for v in moved.values()} == {"meta"}
    with pytest.raises(ValueError, match="CPU tensors"):
        distributed.all_reduce_host(torch.zeros(1, device="meta"))
