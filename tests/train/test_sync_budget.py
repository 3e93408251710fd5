"""The training loop's host-sync budget, proven on CPU (issue: GPU path, item 2).

Real iterations of the loop (tiny preset: 3 layers, 2 MoE; ds_configs/zero2.json, bf16, as the
mission's command; log interval 5) run under megamoe.syncs.HostSyncCounter, which counts the ops
that make the host wait for a GPU: scalar reads (`_local_scalar_dense`), data-dependent shapes
(`nonzero`, boolean-mask indexing, `bincount`, ...) and device-to-host copies (the loop's
`to_host`; AutoEP's split plan, counted as on CUDA). The budget per iteration, per rank:
  EP 1: 1 (DeepSpeed's gradient-overflow check), 2 on a log step (+ the window's metrics read);
  EP 2: + 1 split plan per MoE layer (the all-to-all sizes): 3, and 4 on a log step.
Before this budget, the same loop made 23-24 at EP 1 and 41+ at EP 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import multirank

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
ITERS, LOG_INTERVAL, MOE_LAYERS = 11, 5, 2


def per_iteration(out_dir: Path, nproc: int) -> list[list[int]]:
    """Per rank, the syncs of iterations 2..ITERS (the first builds buffers and optimizer state)."""
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(nproc)]
    assert all(r["rc"] == 0 for r in ranks), ranks
    return [[sum(d.values()) for d in r["per_iteration"][1:]] for r in ranks]


@pytest.mark.slow
@pytest.mark.parametrize("ep, steady", [(1, 1), (2, 1 + MOE_LAYERS)])
def test_the_loop_syncs_the_host_only_where_documented(progression_corpus, tmp_path, ep, steady):
    rc, out = multirank.run([HERE / "syncs_rank.py", progression_corpus, ROOT / "ds_configs" / "zero2.json",
                             ep, ITERS, tmp_path], nproc=ep, timeout=600)
    assert rc == 0, out[-4000:]
    for counts in per_iteration(tmp_path, ep):
        iterations = range(2, ITERS + 1)
        expected = [steady + (it % LOG_INTERVAL == 0 or it == ITERS) for it in iterations]
        assert counts == expected, (counts, out[-3000:])
        assert max(counts) <= (2 if ep == 1 else 6)   # the budget


def test_the_counter_sees_what_stalls_a_gpu():
    """Each kind of op the budget counts is seen, and ordinary device work is not."""
    import torch

    from megamoe.syncs import HostSyncCounter, cpu_only, to_host
    x = torch.randn(8)
    with HostSyncCounter() as c:
        y = (x * 2).exp().sum()          # device work: no sync
    assert c.total == 0
    with HostSyncCounter() as c:
        float(y)
        x[x > 0]
        torch.nonzero(x)
        torch.bincount(torch.tensor([1, 2]))
        to_host(x)
    assert c.seen == {"aten::_local_scalar_dense": 1, "boolean-mask index": 1, "aten::nonzero": 1,
                      "aten::bincount": 1, "device-to-host copy": 1}, dict(c.seen)
    with HostSyncCounter() as c, c.paused():
        float(y)
    assert c.total == 0
    with HostSyncCounter() as c:            # code that only CPU runs have (dispatch.PaddedRows)
        with cpu_only():
            float(y)
        float(y)
    assert c.total == 1
