"""One home for megamoe checkpoints.

    format.py       the on-disk contract: names, TrainerState (megamoe_state.json), reading,
                    atomic writes, which optimizer wrote a checkpoint
    engine.py       save / load of a training checkpoint (DeepSpeed engine files + RNG states)
    guard.py        what may be resumed where (model, data position, EP / world / ZeRO layout)
    consolidate.py  DeepSpeed shards -> one fp32 native state dict (export, generate, evaluate)
    universal.py    conversion to DeepSpeed's universal format (resume at another layout)

The Hugging Face conversion around it is megamoe/export.py; docs/checkpoints.md is the guide.
"""
from megamoe.checkpoint.consolidate import Checkpoint, check_state_dict, load_native_state_dict, locate_checkpoint
from megamoe.checkpoint.engine import load, rng_state, save, set_rng_state
from megamoe.checkpoint.format import (CONVERT_TOOL, FORMAT, LATEST, STATE_FILE, WEIGHTS_FILE, CheckpointError,
                                       TrainerState, atomic_write_text, find_checkpoint, optimizer_kind,
                                       read_latest, read_state, resolve_tag_dir, resume_point, tag_for,
                                       write_latest)
from megamoe.checkpoint.guard import check_compatible, check_data_position, check_locations, check_model_config

__all__ = ["CONVERT_TOOL", "FORMAT", "LATEST", "STATE_FILE", "WEIGHTS_FILE", "Checkpoint", "CheckpointError",
           "TrainerState", "atomic_write_text", "check_compatible", "check_data_position", "check_locations",
           "check_model_config",
           "check_state_dict", "find_checkpoint", "load", "load_native_state_dict", "locate_checkpoint",
           "optimizer_kind", "read_latest", "read_state", "resolve_tag_dir", "resume_point", "rng_state", "save", "set_rng_state",
           "tag_for", "write_latest"]
