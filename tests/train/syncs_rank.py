"""One rank of the sync-budget check (tests/train/test_sync_budget.py), run as a plain process or
under torchrun: trains `tiny` in-process under megamoe.syncs.HostSyncCounter and prints the
host-syncing ops of every iteration to OUT_DIR/rank{r}.json (`--where`: also prints where each
came from)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from megamoe import trainer
from megamoe.syncs import HostSyncCounter, loop_syncs
from megamoe.train_config import parse_args


def main(data: str, ds_config: str, ep: str, iters: str, out_dir: str, where: bool) -> None:
    cfg = parse_args(["--model-config", "tiny", "--data-path", data, "--seq-length", "32", "--train-iters", iters,
                      "--lr", "1e-3", "--log-interval", "5", "--eval-interval", "1000", "--eval-iters", "0",
                      "--deepspeed-config", ds_config, "--expert-model-parallel-size", ep])
    t = trainer.Trainer(cfg)
    counter = HostSyncCounter(where=where, autoep_as_on_gpu=int(ep) > 1)
    rc, per_iteration = loop_syncs(t, counter)
    if where and t.rank == 0:
        for site, n in counter.sites.most_common():
            print(f"SITE {n:5d} {site}", file=sys.stderr)
    # a file per rank: the ranks' stdout lines interleave
    (Path(out_dir) / f"rank{t.rank}.json").write_text(json.dumps({"rc": rc, "per_iteration": per_iteration}))


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if a != "--where"], where="--where" in sys.argv)
