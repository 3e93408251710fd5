"""What may be resumed where: the model must be the checkpoint's, the data must continue where it
stopped, and the engine files must be loaded at the layout they were written with.

Layout guard (`check_compatible`): DeepSpeed's plain load_checkpoint does not notice that a ZeRO-2
AutoEP checkpoint saved at ep 2 is loaded at ep 1 and silently scrambles the experts (measured
with deepspeed 0.19.8). So a checkpoint loads as is only at the EP size, world size and ZeRO stage
it was saved with; otherwise it is converted to DeepSpeed's universal format
(megamoe.checkpoint.universal, tools/convert_checkpoint.py), which loads at any layout with
`"checkpoint": {"load_universal": true}` set by the trainer.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from megamoe.checkpoint.format import CONVERT_TOOL, CheckpointError, TrainerState


def check_locations(load: Optional[str], save: Optional[str]) -> None:
    """Before any work: --load must exist unless it is also --save (the auto-resume idiom, where an
    empty or missing directory means a fresh start), and --save must be a directory this process
    can write (created here), so a long run never fails at its first save."""
    if load and not Path(load).exists() and not (save and Path(load).resolve() == Path(save).resolve()):
        raise CheckpointError(f"--load {load} does not exist (misspelled?). To start fresh and resume there later, "
                              f"pass --save {load} --load {load}; to start fresh, drop --load")
    if not save:
        return
    try:
        Path(save).mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CheckpointError(f"--save {save}: a file is in the way ({save} or one of its parents is a regular "
                              "file); choose a directory") from None
    except OSError as e:
        raise CheckpointError(f"--save {save}: cannot create it ({e.strerror})") from None
    if not os.access(save, os.W_OK | os.X_OK):
        raise CheckpointError(f"--save {save} is not writable by this user; choose another directory")


def check_model_config(state: TrainerState, cfg, where: str = "") -> None:
    """The run's model must be the checkpoint's: every field but the training-side knobs
    (loss coefficients, bias rate, jitter, capacity, attention backend) must agree."""
    from megamoe.hf import TRAINING_FIELDS
    saved = state.model_config or {}
    now = cfg.to_dict()
    diff = [f"{k}: {saved[k]!r} -> {now.get(k)!r}" for k in saved
            if k not in TRAINING_FIELDS and saved[k] != now.get(k)]
    if diff:
        raise CheckpointError(f"checkpoint {where} holds a different model than --model-config ({'; '.join(diff)}); "
                              "resume with the checkpoint's model config (only training-side fields such as "
                              f"{', '.join(TRAINING_FIELDS[:3])} may change)")


def check_data_position(state: TrainerState, consumed_per_dataset: list[int], where: str = "") -> None:
    """The data this run reads must resume where the checkpoint's left off, dataset by dataset.

    `consumed_per_dataset` is what this run's blend says the first `consumed_samples` global
    samples took from each dataset; it equals the saved counts only if the blend (paths, weights,
    order) is the checkpoint's. Anything else would re-serve or skip samples silently."""
    saved = state.consumed_samples_per_dataset
    if not saved or list(saved) == list(consumed_per_dataset):
        return
    paths = (state.config.get("data") or {}).get("data_path") or []
    raise CheckpointError(
        f"checkpoint {where} consumed {list(saved)} samples per dataset, but this run's --data-path gives "
        f"{list(consumed_per_dataset)} at the same position ({state.consumed_samples} samples): the data "
        f"blend changed. Resume with the checkpoint's data (--data-path {' '.join(map(str, paths))}).")


def check_compatible(state: TrainerState, ep_size: int, world_size: int, zero_stage: int, where: str = "") -> dict:
    """Raise CheckpointError unless the checkpoint can be loaded into this layout. Returns the
    DeepSpeed config additions needed (the universal-load switch for converted checkpoints).
    Weights-only checkpoints (HF import) hold no partitions and load anywhere."""
    if state.weights_only:
        return {}
    if state.universal:
        return {"checkpoint": {"load_universal": True}}
    saved = {"ep_size": state.ep_size, "world_size": state.world_size, "zero_stage": state.zero_stage}
    now = {"ep_size": ep_size, "world_size": world_size, "zero_stage": zero_stage}
    diff = [f"{k} {saved[k]} -> {now[k]}" for k in saved if saved[k] != now[k]]
    if diff:
        raise CheckpointError(
            f"checkpoint {where} was saved with ep_size={saved['ep_size']}, world_size={saved['world_size']}, "
            f"zero_stage={saved['zero_stage']} but this run has ep_size={ep_size}, world_size={world_size}, "
            f"zero_stage={zero_stage} ({', '.join(diff)}). DeepSpeed would load the expert and optimizer "
            f"partitions into the wrong places (a ZeRO-2 expert-parallel checkpoint loads silently scrambled), "
            f"so this is refused. {conversion_hint(state, where or 'SAVE_DIR')}")
    return {}


def conversion_hint(state: TrainerState, where: str) -> str:
    if state.optimizer() in ("", "adam", "adamw"):
        return (f"Convert it first:  python {CONVERT_TOOL} --input {where} --output NEW_DIR  "
                "and resume with --load NEW_DIR.")
    # DeepSpeed's universal format only carries Adam's moments
    return (f"Its optimizer ({state.optimizer()}) has no universal-checkpoint form, so only the weights can move: "
            f"python tools/convert_to_hf.py --checkpoint {where} --output HF_DIR, then "
            f"python tools/convert_from_hf.py --input HF_DIR --output NEW_DIR, and --load NEW_DIR "
            "(fresh optimizer state).")
