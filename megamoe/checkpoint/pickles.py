"""Checkpoints must not run code: every torch.save file of a checkpoint is vetted before anything
unpickles it, megamoe's own code or DeepSpeed's.

A `.pt` file is a pickle; unpickling it may import and call whatever it names (a crafted
`mp_rank_00_model_states.pt` can run `os.system`). DeepSpeed's loaders (engine.load_checkpoint,
zero_to_fp32, ds_to_universal) unpickle with `weights_only=False`, so the check happens first, on
the whole tag directory: `torch.serialization.get_unsafe_globals_in_checkpoint` lists the globals
a file would import without executing it, and anything outside torch's weights-only allow-list and
the few DeepSpeed classes its checkpoints hold (`DEEPSPEED_GLOBALS`, measured on ZeRO-1/2/3, AutoEP,
AdamW and Muon checkpoints of deepspeed 0.19.8) is refused. megamoe's own reads then use
`weights_only=True` with exactly those classes allowed.

A checkpoint you made yourself with another DeepSpeed version may name other classes: pass
`--trust-checkpoint` (or set MEGAMOE_TRUST_CHECKPOINT=1) to load it anyway.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import Path
from typing import Iterable

from megamoe.checkpoint.format import CheckpointError

DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address")
TRUST_ENV = "MEGAMOE_TRUST_CHECKPOINT"


def trusted(trust: bool = False) -> bool:
    return trust or os.environ.get(TRUST_ENV, "0") == "1"


def unsafe_globals(f: Path) -> list[str]:
    """What unpickling `f` would import beyond torch's weights-only set and DEEPSPEED_GLOBALS."""
    import torch
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
    except Exception as e:   # not a zip / truncated: the readers report it with its own message
        raise CheckpointError(f"{f} is truncated or not a torch.save file ({type(e).__name__}); use another "
                              "checkpoint tag") from None
    return [g for g in found if g not in DEEPSPEED_GLOBALS]


def vet(files: Iterable[Path], trust: bool = False) -> None:
    """Refuse any file that would import more than tensors and DeepSpeed's checkpoint classes."""
    if trusted(trust):
        return
    for f in sorted(files):
        bad = unsafe_globals(f)
        if bad:
            raise CheckpointError(
                f"{f} would import {', '.join(bad)} when loaded; unpickling it could run arbitrary code, so it "
                f"was not loaded. A megamoe checkpoint names only tensors and DeepSpeed's "
                f"{', '.join(g.rsplit('.', 1)[1] for g in DEEPSPEED_GLOBALS)}. "
                f"If you wrote this checkpoint yourself (e.g. with another DeepSpeed version) and trust it, pass "
                f"--trust-checkpoint or set {TRUST_ENV}=1.")


def vet_dir(tag_dir: Path, trust: bool = False) -> None:
    vet((p for p in Path(tag_dir).rglob("*.pt") if p.stat().st_size > 0), trust)


@contextlib.contextmanager
def deepspeed_classes_allowed():
    """torch.load(weights_only=True) that also accepts DEEPSPEED_GLOBALS."""
    import torch
    classes = []
    for name in DEEPSPEED_GLOBALS:
        module, attr = name.rsplit(".", 1)
        try:
            classes.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass   # another DeepSpeed version: files naming it were vetted (or trusted) already
    with torch.serialization.safe_globals(classes):
        yield
