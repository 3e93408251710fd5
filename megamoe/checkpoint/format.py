"""The on-disk contract of a megamoe checkpoint: names, the trainer state, reading and the atomic
writes every writer (trainer, universal conversion, HF import) goes through.

    SAVE_DIR/latest                                  tag of the newest COMPLETE checkpoint
    SAVE_DIR/global_step{N}/                         DeepSpeed engine files (engine.save_checkpoint)
    SAVE_DIR/global_step{N}/megamoe_rng_rank{R}.pt   per-rank RNG states (python, numpy, torch)
    SAVE_DIR/global_step{N}/megamoe_state.json       TrainerState, written by rank 0 last
    SAVE_DIR/global_step0/model.safetensors          weights-only checkpoints (HF import) instead
                                                     of engine files

A directory without megamoe_state.json is an incomplete checkpoint and is never loaded.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megamoe.fileio import atomic_write_text

FORMAT = "megamoe-checkpoint-v1"
STATE_FILE = "megamoe_state.json"
LATEST = "latest"
WEIGHTS_FILE = "model.safetensors"
CONVERT_TOOL = "tools/convert_checkpoint.py"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, damaged or cannot be loaded as requested; the message
    names the file and says what to do."""


@dataclass
class TrainerState:
    """megamoe_state.json: everything besides the engine files that a resume, a conversion or an
    export needs. One schema for the three writers (trainer save, universal conversion, HF import)."""
    step: int
    model_config: dict
    consumed_samples: int = 0
    consumed_samples_per_dataset: list = field(default_factory=list)
    tokenizer: Optional[str] = None
    # the layout the engine files were written with (None: weights-only, loads at any layout)
    ep_size: Optional[int] = None
    world_size: Optional[int] = None
    zero_stage: Optional[int] = None
    autoep: bool = False
    ds_config: Optional[dict] = None      # the reconciled DeepSpeed config the engine ran with
    config: dict = field(default_factory=dict)   # the TrainConfig (megamoe.config_train), as a dict
    train_iters: Optional[int] = None
    skipped_iters: int = 0
    loss_guard: dict = field(default_factory=dict)
    train_loss: Optional[float] = None    # the last optimizer step's loss, and the last validation loss
    val_loss: Optional[float] = None
    command: list = field(default_factory=list)   # the command line that wrote it (sys.argv)
    megamoe_version: Optional[str] = None
    reason: str = ""
    weights_only: bool = False            # model.safetensors instead of engine files (HF import)
    universal: bool = False               # DeepSpeed universal format (tools/convert_checkpoint.py)
    converted_from: Optional[str] = None
    extra: dict = field(default_factory=dict)    # keys this version does not know, kept on rewrite
    format: str = FORMAT

    @classmethod
    def from_dict(cls, d: dict, source: str = STATE_FILE) -> "TrainerState":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = [k for k in ("step", "model_config") if k not in d]
        if missing:
            raise CheckpointError(f"{source}: missing {', '.join(missing)}")
        known = {k: v for k, v in d.items() if k in names}
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {**d.pop("extra"), **d}

    def optimizer(self) -> str:
        """The DeepSpeed optimizer type that wrote the checkpoint, lower case ("" if unrecorded)."""
        return optimizer_kind(self.ds_config)

    def write(self, tag_dir: Path | str) -> None:
        atomic_write_text(Path(tag_dir) / STATE_FILE, json.dumps(self.to_dict(), indent=2, default=str) + "\n")


def optimizer_kind(ds_config: Optional[dict]) -> str:
    """The one answer to "which optimizer wrote this": the DeepSpeed config's optimizer type,
    lower case; "" when the config records none (a client optimizer or a weights-only state)."""
    opt = (ds_config or {}).get("optimizer") or {}
    return str(opt.get("type") or "").lower()


def tag_for(step: int) -> str:
    return f"global_step{int(step)}"


def write_latest(save_dir: Path | str, tag: str) -> None:
    atomic_write_text(Path(save_dir) / LATEST, tag + "\n")


def read_latest(load_dir: str | Path) -> Optional[str]:
    p = Path(load_dir) / LATEST
    return p.read_text().strip() if p.is_file() else None


def tags(save_dir: Path) -> list[str]:
    """The global_stepN directories, by step."""
    found = [p.name for p in Path(save_dir).glob("global_step*") if p.is_dir()]
    return sorted(found, key=lambda t: (int(t[len("global_step"):]) if t[len("global_step"):].isdigit() else -1, t))


def resolve_tag_dir(save_dir: str | Path, tag: Optional[str] = None) -> Path:
    """SAVE_DIR/<tag>, the tag defaulting to the one `latest` names; errors say what exists."""
    save_dir = Path(save_dir)
    if tag is not None:
        tag_dir = save_dir / tag
        if not tag_dir.is_dir():
            raise CheckpointError(f"tag directory {tag_dir} does not exist; available: {tags(save_dir)}")
        return tag_dir
    latest = save_dir / LATEST
    if not latest.is_file():
        found = tags(save_dir)
        raise CheckpointError(f"{save_dir} has no `{LATEST}` file" + (
            f" (no save completed there); pass a tag explicitly, one of {found}" if found else
            " and no global_step* directories: not a megamoe checkpoint directory"))
    tag = latest.read_text().strip()
    if not tag:
        raise CheckpointError(f"{latest} is empty; pass the tag (global_stepN) explicitly")
    tag_dir = save_dir / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"{latest} points to tag {tag!r} but {tag_dir} does not exist (the checkpoint was "
                              "deleted or never completed); pass an existing global_step* tag explicitly")
    return tag_dir


def read_state(ckpt_dir: str | Path) -> TrainerState:
    """The trainer state of a tag directory; refuses incomplete or foreign checkpoints."""
    p = Path(ckpt_dir) / STATE_FILE
    if not p.is_file():
        raise CheckpointError(f"{p} is missing: {ckpt_dir} is an incomplete checkpoint ({STATE_FILE} is written "
                              "last, after every engine file, so an interrupted save leaves none) or not a "
                              "megamoe checkpoint. Use an earlier tag.")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: invalid JSON at line {e.lineno}: {e.msg}") from None
    found = raw.get("format") if isinstance(raw, dict) else None
    if found != FORMAT:
        raise CheckpointError(f"{p}: format {found!r}, expected {FORMAT!r}")
    return TrainerState.from_dict(raw, source=str(p))


def find_checkpoint(load_dir: str | Path, tag: Optional[str] = None) -> Optional[tuple[str, TrainerState]]:
    """(tag, trainer state) of the checkpoint to resume from, or None when `load_dir` holds none
    (a fresh start, as Megatron's --load on an empty directory)."""
    load_dir = Path(load_dir)
    if tag is None and read_latest(load_dir) is None and not tags(load_dir):
        return None
    tag_dir = resolve_tag_dir(load_dir, tag)
    return tag_dir.name, read_state(tag_dir)


def refuse_nonempty(output: Path | str) -> None:
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output} exists and is not empty; choose a new --output directory")


def resume_point(load_dir: str | Path) -> tuple[Optional[tuple[str, TrainerState]], Optional[str]]:
    """What `--load DIR` resumes from, and a note when it is not simply `latest`: without `latest`
    (a run killed inside its first save, or `latest` deleted) the newest complete tag, or a fresh
    start when no tag is complete. An explicit `latest` that is broken stays an error."""
    load_dir = Path(load_dir)
    if read_latest(load_dir) is not None:
        return find_checkpoint(load_dir), None
    all_tags = tags(load_dir)
    complete = [t for t in all_tags if (load_dir / t / STATE_FILE).is_file()]
    incomplete = [t for t in all_tags if t not in complete]
    if not complete:
        note = (f"{load_dir} holds only incomplete checkpoints ({', '.join(incomplete)}: no {STATE_FILE}, the save "
                "was interrupted): starting from scratch") if incomplete else None
        return None, note
    tag = complete[-1]
    note = (f"{load_dir} has no `{LATEST}` file; resuming from its newest complete checkpoint {tag}"
            + (f" (incomplete, ignored: {', '.join(incomplete)})" if incomplete else ""))
    return (tag, read_state(load_dir / tag)), note


def stage_dir(output: Path) -> tuple[Path, Path]:
    """(temporary sibling directory, the path to build the output in) for writers that must leave
    nothing at `output` unless they finish; `publish` moves it into place."""
    import tempfile
    output = Path(output)
    refuse_nonempty(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    return tmp, tmp / "out"


def publish(stage: Path, output: Path) -> None:
    output = Path(output)
    if output.exists():
        output.rmdir()   # empty (stage_dir refused anything else)
    os.replace(stage, output)
