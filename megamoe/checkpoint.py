"""Checkpoints: DeepSpeed engine files + the trainer's state, an atomic `latest`, and a guard
against loading at an incompatible expert-parallel / world size.

Layout (the contract with tools/convert_to_hf.py and friends):

    SAVE_DIR/latest                              tag of the newest COMPLETE checkpoint
    SAVE_DIR/global_step{N}/                     engine.save_checkpoint(SAVE_DIR, tag=...) files
    SAVE_DIR/global_step{N}/megamoe_rng_rank{R}.pt   per-rank RNG states (python, numpy, torch)
    SAVE_DIR/global_step{N}/megamoe_state.json   trainer state, written by rank 0 last

Completeness: every rank writes its engine files and RNG file, a barrier, rank 0 writes
megamoe_state.json (temp + rename), a barrier, rank 0 replaces `latest` (temp + rename). A
process killed at any point leaves `latest` at the previous complete checkpoint; a directory
without megamoe_state.json is an incomplete one and is never loaded.

EP / world-size guard (`check_compatible`): DeepSpeed's plain load_checkpoint does not notice
that a ZeRO-2 AutoEP checkpoint saved at ep 2 is loaded at ep 1 and silently scrambles the
experts (measured with deepspeed 0.19.8). So a checkpoint loads as is only at the EP size, world
size and ZeRO stage it was saved with; otherwise the user converts it to DeepSpeed's universal
format with tools/convert_checkpoint.py, and a universal checkpoint loads at any layout with
`"checkpoint": {"load_universal": true}` set by the trainer.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from megamoe import faults

FORMAT = "megamoe-checkpoint-v1"
STATE_FILE = "megamoe_state.json"
LATEST = "latest"
CONVERT_TOOL = "tools/convert_checkpoint.py"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, damaged or cannot be loaded as requested; the message
    names the file and says what to do."""


def tag_for(step: int) -> str:
    return f"global_step{int(step)}"


def atomic_write_text(path: Path | str, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _barrier() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_initialized() else 0


# ----------------------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------------------
def rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def read_latest(load_dir: str | Path) -> Optional[str]:
    p = Path(load_dir) / LATEST
    return p.read_text().strip() if p.is_file() else None


def _tags(save_dir: Path) -> list[str]:
    return sorted(p.name for p in save_dir.glob("global_step*") if p.is_dir())


def resolve_tag_dir(save_dir: str | Path, tag: Optional[str] = None) -> Path:
    """SAVE_DIR/<tag>, the tag defaulting to the one `latest` names; errors say what exists."""
    save_dir = Path(save_dir)
    if tag is not None:
        tag_dir = save_dir / tag
        if not tag_dir.is_dir():
            raise CheckpointError(f"tag directory {tag_dir} does not exist; available: {_tags(save_dir)}")
        return tag_dir
    latest = save_dir / LATEST
    if not latest.is_file():
        tags = _tags(save_dir)
        raise CheckpointError(f"{save_dir} has no `{LATEST}` file" + (
            f" (no save completed there); pass a tag explicitly, one of {tags}" if tags else
            " and no global_step* directories: not a megamoe checkpoint directory"))
    tag = latest.read_text().strip()
    if not tag:
        raise CheckpointError(f"{latest} is empty; pass the tag (global_stepN) explicitly")
    tag_dir = save_dir / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"{latest} points to tag {tag!r} but {tag_dir} does not exist (the checkpoint was "
                              "deleted or never completed); pass an existing global_step* tag explicitly")
    return tag_dir


def read_state(ckpt_dir: str | Path) -> dict:
    """The trainer state of a tag directory; refuses incomplete or foreign checkpoints."""
    p = Path(ckpt_dir) / STATE_FILE
    if not p.is_file():
        raise CheckpointError(f"{p} is missing: {ckpt_dir} is an incomplete checkpoint ({STATE_FILE} is written "
                              "last, after every engine file, so an interrupted save leaves none) or not a "
                              "megamoe checkpoint. Use an earlier tag.")
    try:
        state = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: invalid JSON at line {e.lineno}: {e.msg}") from None
    found = state.get("format") if isinstance(state, dict) else None
    if found != FORMAT:
        raise CheckpointError(f"{p}: format {found!r}, expected {FORMAT!r}")
    return state


def find_checkpoint(load_dir: str | Path, tag: Optional[str] = None) -> Optional[tuple[str, dict]]:
    """(tag, trainer state) of the checkpoint to resume from, or None when `load_dir` holds none
    (a fresh start, as Megatron's --load on an empty directory)."""
    load_dir = Path(load_dir)
    if tag is None and read_latest(load_dir) is None and not _tags(load_dir):
        return None
    tag_dir = resolve_tag_dir(load_dir, tag)
    return tag_dir.name, read_state(tag_dir)


def check_model_config(state: dict, cfg, where: str = "") -> None:
    """The run's model must be the checkpoint's: every field but the training-side knobs
    (loss coefficients, bias rate, jitter, capacity, attention backend) must agree."""
    from megamoe.hf import TRAINING_FIELDS
    saved = state.get("model_config") or {}
    now = cfg.to_dict()
    diff = [f"{k}: {saved[k]!r} -> {now.get(k)!r}" for k in saved
            if k not in TRAINING_FIELDS and saved[k] != now.get(k)]
    if diff:
        raise CheckpointError(f"checkpoint {where} holds a different model than --model-config ({'; '.join(diff)}); "
                              "resume with the checkpoint's model config (only training-side fields such as "
                              f"{', '.join(TRAINING_FIELDS[:3])} may change)")


def check_data_position(state: dict, consumed_per_dataset: list[int], where: str = "") -> None:
    """The data this run reads must resume where the checkpoint's left off, dataset by dataset.

    `consumed_per_dataset` is what this run's blend says the first `consumed_samples` global
    samples took from each dataset; it equals the saved counts only if the blend (paths, weights,
    order) is the checkpoint's. Anything else would re-serve or skip samples silently."""
    saved = state.get("consumed_samples_per_dataset")
    if saved is None or list(saved) == list(consumed_per_dataset):
        return
    run_args = state.get("args") or {}
    raise CheckpointError(
        f"checkpoint {where} consumed {list(saved)} samples per dataset, but this run's --data-path gives "
        f"{list(consumed_per_dataset)} at the same position ({state.get('consumed_samples')} samples): the data "
        f"blend changed. Resume with the checkpoint's data (--data-path {' '.join(map(str, run_args.get('data_path') or []))}).")


def check_compatible(state: dict, ep_size: int, world_size: int, zero_stage: int, where: str = "") -> dict:
    """Raise CheckpointError unless the checkpoint can be loaded into this layout. Returns the
    DeepSpeed config additions needed (the universal-load switch for converted checkpoints).
    Weights-only checkpoints (tools/convert_from_hf.py) hold no partitions and load anywhere."""
    if state.get("weights_only"):
        return {}
    if state.get("universal"):
        return {"checkpoint": {"load_universal": True}}
    saved = {"ep_size": state.get("ep_size"), "world_size": state.get("world_size"),
             "zero_stage": state.get("zero_stage")}
    now = {"ep_size": ep_size, "world_size": world_size, "zero_stage": zero_stage}
    diff = [f"{k} {saved[k]} -> {now[k]}" for k in saved if saved[k] != now[k]]
    if diff:
        raise CheckpointError(
            f"checkpoint {where} was saved with ep_size={saved['ep_size']}, world_size={saved['world_size']}, "
            f"zero_stage={saved['zero_stage']} but this run has ep_size={ep_size}, world_size={world_size}, "
            f"zero_stage={zero_stage} ({', '.join(diff)}). DeepSpeed would load the expert and optimizer "
            f"partitions into the wrong places (a ZeRO-2 expert-parallel checkpoint loads silently scrambled), "
            f"so this is refused. {_conversion_hint(state, where or 'SAVE_DIR')}")
    return {}


def _conversion_hint(state: dict, where: str) -> str:
    optimizer = str(((state.get("ds_config") or {}).get("optimizer") or {}).get("type", "")).lower()
    if optimizer in ("", "adam", "adamw"):
        return (f"Convert it first:  python {CONVERT_TOOL} --input {where} --output NEW_DIR  "
                "and resume with --load NEW_DIR.")
    # DeepSpeed's universal format only carries Adam's moments
    return (f"Its optimizer ({optimizer}) has no universal-checkpoint form, so only the weights can move: "
            f"python tools/convert_to_hf.py --checkpoint {where} --output HF_DIR, then "
            f"python tools/convert_from_hf.py --input HF_DIR --output NEW_DIR, and --load NEW_DIR "
            "(fresh optimizer state).")


# ----------------------------------------------------------------------------------------------
# Saving / loading
# ----------------------------------------------------------------------------------------------
def save(engine, save_dir: str | Path, step: int, trainer_state: dict[str, Any]) -> str:
    """Collective: every rank must call it. Returns the tag. `trainer_state` is written as the
    state file (with "format" and "step" added)."""
    save_dir = Path(save_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(save_dir), tag=tag, client_state={"megamoe_step": int(step)}, save_latest=False)
    ckpt = save_dir / tag
    rank = _rank()
    rng_path = ckpt / f"megamoe_rng_rank{rank}.pt"
    tmp = rng_path.with_name(f".{rng_path.name}.tmp")
    torch.save(rng_state(), tmp)
    os.replace(tmp, rng_path)
    faults.crash_in_save(step, rank)  # tests: die after the engine files, before the checkpoint is complete
    _barrier()  # every rank's engine + RNG files are on disk
    if rank == 0:
        state = {"format": FORMAT, "step": int(step), **trainer_state}
        atomic_write_text(ckpt / STATE_FILE, json.dumps(state, indent=2, default=str) + "\n")
        atomic_write_text(save_dir / LATEST, tag + "\n")
    _barrier()
    return tag


def load(engine, load_dir: str | Path, tag: str, state: dict) -> dict:
    """Load engine (module, optimizer, lr scheduler) + this rank's RNG states. Returns `state`."""
    load_path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {Path(load_dir) / tag}")
    rng_path = Path(load_dir) / tag / f"megamoe_rng_rank{_rank()}.pt"
    if rng_path.is_file() and state.get("world_size") == _world_size():
        set_rng_state(torch.load(rng_path, weights_only=False))
    return state


def _world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_initialized() else 1
