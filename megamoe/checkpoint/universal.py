"""Convert a megamoe training checkpoint to DeepSpeed's universal format, so it can be resumed at
a different expert-parallel size, world size or ZeRO stage (tools/convert_checkpoint.py).

It runs `python -m deepspeed.checkpoint.ds_to_universal` (which consolidates ZeRO partitions and
expert shards into per-parameter fp32 tensors plus optimizer moments), then copies the trainer
state with `universal=True` and writes OUTPUT/latest last. The layout guard accepts such a
checkpoint at any layout and the trainer loads it with `"checkpoint": {"load_universal": true}`.
Per-rank RNG states are copied but only restored when the world size is unchanged.
Measured on CPU with deepspeed 0.19.8: AutoEP + ZeRO-2 universal resume matches the uninterrupted
run (tests/train/test_pretrain_distributed.py); AutoEP + ZeRO-3 universal resume was NOT exact
(experts off by ~7e-5 after a step).

Adam(W) checkpoints only. DeepSpeed 0.19.8's universal format carries Adam's moments
(exp_avg / exp_avg_sq) and nothing else, so a checkpoint trained with DeepSpeed's Muon
(ds_configs/muon.json, muonclip.json) is refused with a clear message: its momentum buffers
would be lost. Resume Muon runs at the same layout, or restart at another layout from the
weights with a fresh optimizer: tools/convert_to_hf.py (exports the exact fp32 masters of Muon
checkpoints too) then tools/convert_from_hf.py gives a weights-only checkpoint that
`--load` accepts at any EP / world size / ZeRO stage.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

from megamoe.checkpoint.format import CheckpointError, atomic_write_text, find_checkpoint, write_latest
from megamoe.checkpoint.pickles import vet_dir


def _muon_refusal(where, what: str = "was trained with DeepSpeed's Muon optimizer") -> str:
    return (f"{where} {what}: DeepSpeed's universal checkpoint format "
            "(ds_to_universal) only carries Adam's optimizer state (exp_avg/exp_avg_sq), so Muon's momentum "
            "cannot be converted and this checkpoint cannot be resumed at another EP size / world size / ZeRO "
            "stage. Resume it with the same layout, or export the weights (tools/convert_to_hf.py, exact fp32 "
            "masters) and turn them into a weights-only checkpoint (tools/convert_from_hf.py) that --load starts "
            "at any layout with a fresh optimizer.")


def _refuse_unconvertible(state, src: Path) -> None:
    if state.universal:
        raise CheckpointError(f"{src} is already universal")
    if state.weights_only:
        raise CheckpointError(f"{src} is a weights-only checkpoint (convert_from_hf): it "
                              "already loads at any layout, no conversion needed")
    if state.optimizer() == "muon":   # refused before the (slow) conversion, which would fail with KeyError 'exp_avg'
        raise CheckpointError(_muon_refusal(src))


def _ds_to_universal(src: Path, tmp: Path, workers: int) -> None:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
           "--output_folder", str(tmp), "--num_extract_workers", str(workers), "--num_merge_workers", str(workers)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode == 0:
        return
    shutil.rmtree(tmp, ignore_errors=True)
    if "KeyError: 'exp_avg" in res.stderr + res.stdout:   # any other optimizer without Adam's moments
        raise CheckpointError(_muon_refusal(src, "holds optimizer state without Adam's exp_avg/exp_avg_sq "
                                                 "(e.g. DeepSpeed's Muon)"))
    raise CheckpointError(f"ds_to_universal failed ({' '.join(cmd)}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")


def convert(input_dir: str, output_dir: str, tag: str | None = None, workers: int = 1, trust: bool = False) -> Path:
    """OUTPUT/tag, a universal copy of INPUT's checkpoint `tag` (default: its `latest`)."""
    found = find_checkpoint(input_dir, tag)
    if found is None:
        raise CheckpointError(f"{input_dir}: no `latest` file and no --tag: nothing to convert")
    tag, state = found
    src = Path(input_dir) / tag
    _refuse_unconvertible(state, src)
    vet_dir(src, trust)   # ds_to_universal unpickles with weights_only=False
    out = Path(output_dir)
    dst = out / tag
    if dst.exists():
        raise CheckpointError(f"{dst} exists; choose an empty --output")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{tag}.converting"
    shutil.rmtree(tmp, ignore_errors=True)
    _ds_to_universal(src, tmp, workers)
    for f in src.glob("megamoe_rng_rank*.pt"):
        shutil.copy2(f, tmp / f.name)
    dataclasses.replace(state, universal=True, converted_from=str(src.resolve())).write(tmp)
    os.replace(tmp, dst)
    # ds_to_universal also drops a `latest_universal` next to its output (naming our temp dir)
    atomic_write_text(out / "latest_universal", tag + "\n")
    write_latest(out, tag)
    return dst
