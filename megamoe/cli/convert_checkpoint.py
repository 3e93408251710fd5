#!/usr/bin/env python
"""Convert a megamoe training checkpoint to DeepSpeed's universal format, so it can be resumed at
a different expert-parallel size, world size or ZeRO stage.

    python tools/convert_checkpoint.py --input runs/ckpt [--tag global_step1000] --output runs/ckpt_universal
    python -m megamoe.pretrain ... --load runs/ckpt_universal --expert-model-parallel-size 4

It wraps `python -m deepspeed.checkpoint.ds_to_universal` (which consolidates ZeRO partitions and
expert shards into per-parameter fp32 tensors plus optimizer moments), then copies the trainer
state with "universal": true and writes OUTPUT/latest last. pretrain.py's EP/world-size guard
accepts such a checkpoint at any layout and loads it with `"checkpoint": {"load_universal": true}`.
Per-rank RNG states are copied but only restored when the world size is unchanged.
Measured on CPU with deepspeed 0.19.8: AutoEP + ZeRO-2 universal resume matches the uninterrupted run
(tests/train/test_pretrain_distributed.py);
AutoEP + ZeRO-3 universal resume was NOT exact (experts off by ~7e-5 after a step).

Adam(W) checkpoints only. DeepSpeed 0.19.8's universal format carries Adam's moments
(exp_avg / exp_avg_sq) and nothing else, so a checkpoint trained with DeepSpeed's Muon
(ds_configs/muon.json, muonclip.json) is refused with a clear message: its momentum buffers
would be lost. Resume Muon runs at the same layout, or restart at another layout from the
weights with a fresh optimizer: tools/convert_to_hf.py (exports the exact fp32 masters of Muon
checkpoints too) then tools/convert_from_hf.py gives a weights-only checkpoint that
`--load` accepts at any EP / world size / ZeRO stage.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


from megamoe import checkpoint as ckpt


def _muon_refusal(where, what: str = "was trained with DeepSpeed's Muon optimizer") -> str:
    return (f"{where} {what}: DeepSpeed's universal checkpoint format "
            "(ds_to_universal) only carries Adam's optimizer state (exp_avg/exp_avg_sq), so Muon's momentum "
            "cannot be converted and this checkpoint cannot be resumed at another EP size / world size / ZeRO "
            "stage. Resume it with the same layout, or export the weights (tools/convert_to_hf.py, exact fp32 "
            "masters) and turn them into a weights-only checkpoint (tools/convert_from_hf.py) that --load starts "
            "at any layout with a fresh optimizer.")


def convert(input_dir: str, output_dir: str, tag: str | None = None, workers: int = 1) -> Path:
    """Library entry point (tests call it). Returns OUTPUT/tag."""
    found = ckpt.find_checkpoint(input_dir, tag)
    if found is None:
        raise ckpt.CheckpointError(f"{input_dir}: no `latest` file and no --tag: nothing to convert")
    tag, state = found
    if state.get("universal"):
        raise ckpt.CheckpointError(f"{Path(input_dir) / tag} is already universal")
    if state.get("weights_only"):
        raise ckpt.CheckpointError(f"{Path(input_dir) / tag} is a weights-only checkpoint (convert_from_hf): it "
                                   "already loads at any layout, no conversion needed")
    opt_type = str(((state.get("ds_config") or {}).get("optimizer") or {}).get("type") or "").lower()
    if opt_type == "muon":   # refused before the (slow) conversion, which would fail with KeyError 'exp_avg'
        raise ckpt.CheckpointError(_muon_refusal(Path(input_dir) / tag))
    out = Path(output_dir)
    dst = out / tag
    if dst.exists():
        raise ckpt.CheckpointError(f"{dst} exists; choose an empty --output")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{tag}.converting"
    shutil.rmtree(tmp, ignore_errors=True)
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
           str(Path(input_dir) / tag), "--output_folder", str(tmp), "--num_extract_workers", str(workers),
           "--num_merge_workers", str(workers)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        if "KeyError: 'exp_avg" in res.stderr + res.stdout:   # any other optimizer without Adam's moments
            raise ckpt.CheckpointError(_muon_refusal(Path(input_dir) / tag, "holds optimizer state without "
                                                     "Adam's exp_avg/exp_avg_sq (e.g. DeepSpeed's Muon)"))
        raise ckpt.CheckpointError(f"ds_to_universal failed ({' '.join(cmd)}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    for f in (Path(input_dir) / tag).glob("megamoe_rng_rank*.pt"):
        shutil.copy2(f, tmp / f.name)
    state = dict(state, universal=True, converted_from=str(Path(input_dir).resolve() / tag))
    ckpt.atomic_write_text(tmp / ckpt.STATE_FILE, json.dumps(state, indent=2, default=str) + "\n")
    os.replace(tmp, dst)
    # ds_to_universal also drops a `latest_universal` next to its output (naming our temp dir)
    ckpt.atomic_write_text(out / "latest_universal", tag + "\n")
    ckpt.atomic_write_text(out / ckpt.LATEST, tag + "\n")
    return dst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="the --save directory of the run")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the input's `latest`)")
    p.add_argument("--output", required=True, help="new directory; resume with --load OUTPUT")
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args(argv)
    try:
        dst = convert(a.input, a.output, a.tag, a.workers)
    except ckpt.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"universal checkpoint: {dst}\nresume with: --load {a.output} (any --expert-model-parallel-size / "
          f"world size / ZeRO stage)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
