"""Saving and loading a training checkpoint: the DeepSpeed engine files, every rank's RNG states
and the TrainerState, completed by an atomic `latest`.

Completeness: every rank writes its engine files and RNG file, a barrier, rank 0 writes
megamoe_state.json (temp + rename), a barrier, rank 0 replaces `latest` (temp + rename). A
process killed at any point leaves `latest` at the previous complete checkpoint.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from megamoe import faults
from megamoe.checkpoint.format import CheckpointError, TrainerState, tag_for, write_latest
from megamoe.checkpoint.pickles import vet_dir


def _barrier() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_initialized() else 1


# ----------------------------------------------------------------------------------------------
# RNG states, as tensors and numbers only: the file loads with torch.load(weights_only=True)
# ----------------------------------------------------------------------------------------------
def rng_state() -> dict:
    py_version, py_words, py_gauss = random.getstate()
    np_kind, np_words, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    s = {"python": {"version": py_version, "words": torch.tensor(py_words, dtype=torch.int64),
                    "gauss": py_gauss},
         "numpy": {"kind": np_kind, "words": torch.from_numpy(np_words.astype(np.int64)), "pos": int(np_pos),
                   "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
         "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict) -> None:
    py, npy = s["python"], s["numpy"]
    random.setstate((py["version"], tuple(int(w) for w in py["words"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["words"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def rng_file(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"megamoe_rng_rank{rank}.pt"


# ----------------------------------------------------------------------------------------------
# Saving / loading
# ----------------------------------------------------------------------------------------------
def save(engine, save_dir: str | Path, state: TrainerState) -> str:
    """Collective: every rank must call it. Returns the tag (from `state.step`)."""
    save_dir = Path(save_dir)
    tag = tag_for(state.step)
    engine.save_checkpoint(str(save_dir), tag=tag, client_state={"megamoe_step": int(state.step)},
                           save_latest=False)
    rank = _rank()
    rng_path = rng_file(save_dir / tag, rank)
    tmp = rng_path.with_name(f".{rng_path.name}.tmp")
    torch.save(rng_state(), tmp)
    os.replace(tmp, rng_path)
    faults.crash_in_save(state.step, rank)  # tests: die after the engine files, before the checkpoint is complete
    _barrier()  # every rank's engine + RNG files are on disk
    if rank == 0:
        state.write(save_dir / tag)
        write_latest(save_dir, tag)
    _barrier()
    return tag


def load(engine, load_dir: str | Path, tag: str, state: TrainerState, trust: bool = False) -> None:
    """Load engine (module, optimizer, lr scheduler) + this rank's RNG states, after vetting every
    file of the tag directory (DeepSpeed unpickles with weights_only=False; see pickles.py)."""
    vet_dir(Path(load_dir) / tag, trust)
    load_path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {Path(load_dir) / tag}")
    path = rng_file(Path(load_dir) / tag, _rank())
    if path.is_file() and state.world_size == _world_size():
        try:
            set_rng_state(torch.load(path, weights_only=True))
        except Exception as e:   # an older (pickled) RNG file, or a damaged one: say so, keep going
            raise CheckpointError(f"cannot read the RNG states in {path} ({type(e).__name__}: {e}); delete "
                                  "the megamoe_rng_rank*.pt files of that tag to resume with fresh RNG "
                                  "streams") from None
