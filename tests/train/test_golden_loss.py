"""A stored golden loss curve (torchtitan's tests/assets/losses): a fixed fp32 run of the `tiny`
MoE on 2 CPU ranks (EP 2, ZeRO-2, aux and z losses, bias updates, clipping, warm-up and cosine
decay) must reproduce tests/assets/losses/tiny_ep2_fp32.json iteration by iteration, to within
TOLERANCE: exactly on the machine that wrote it, and to a few float32 ulps on other x86 CPUs.

A change that is meant to move the curve regenerates it, and says why in its commit:

    .venv/bin/python tests/train/test_golden_loss.py --regenerate
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "assets" / "losses" / "tiny_ep2_fp32.json"
ITERS = 30
# fp32 sums round differently with 16-lane AVX-512 kernels than with 8-lane AVX2 ones, and torch,
# MKL and oneDNN each pick by the CPU they find: pin all three to AVX2, and MKL to its
# vendor-independent code path (CBWR=COMPATIBLE: with the AVX2 pin alone, an Intel Xeon and an AMD
# EPYC still differed by one ulp at 7 of 30 iterations).
SAME_ON_EVERY_X86 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                    "MKL_CBWR": "COMPATIBLE"}
# Losses near 6 have a float32 ulp of 4.8e-7; the Xeon/EPYC difference above was at most 2 ulps.
# 1e-5 is about 20 ulps. A reordering that is mathematically the same passes; a real change fails:
# 10% on the z-loss or the bias-rate coefficient moved the curve by 1e-3 from iteration 2 or 3.
TOLERANCE = 1e-5


def golden_run(data: Path, work: Path) -> dict[int, float]:
    import multirank
    from megamoe.monitor import read_scalars
    args = ["--model-config", "tiny", "--data-path", str(data), "--seq-length", "64", "--train-iters", str(ITERS),
            "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "3", "--lr-decay-style", "cosine",
            "--log-interval", "10", "--eval-interval", "1000", "--eval-iters", "0", "--seed", "7",
            "--deepspeed-config", str(ROOT / "tests" / "assets" / "ds_fp32_zero2.json"),
            "--expert-model-parallel-size", "2", "--tensorboard-dir", str(work / "tb")]
    rc, out = multirank.run(["-m", "megamoe.pretrain", *args], timeout=600, env=SAME_ON_EVERY_X86)
    assert rc == 0, out[-4000:]
    return read_scalars(work / "tb", "train/loss")


@pytest.mark.slow
def test_loss_curve_matches_the_golden_one(progression_corpus, tmp_path):
    expected = {int(k): v for k, v in json.loads(GOLDEN.read_text())["train/loss"].items()}
    losses = golden_run(progression_corpus, tmp_path)
    assert sorted(losses) == list(range(1, ITERS + 1))
    diff = {it: losses[it] - expected[it] for it in losses if abs(losses[it] - expected[it]) > TOLERANCE}
    assert not diff, (f"the loss curve moved at {len(diff)} iterations (first: {min(diff)}, "
                      f"{losses[min(diff)]!r} vs golden {expected[min(diff)]!r}). If the change is meant to "
                      f"move it: python tests/train/test_golden_loss.py --regenerate")


def regenerate() -> None:
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from conftest import write_progression_corpus
    with tempfile.TemporaryDirectory() as d:
        losses = golden_run(write_progression_corpus(Path(d) / "syn"), Path(d))
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps({"command": "python tests/train/test_golden_loss.py --regenerate",
                                  "train/loss": {str(k): losses[k] for k in sorted(losses)}}, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {len(losses)} iterations, loss {losses[1]:.4f} -> {losses[ITERS]:.4f}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit(__doc__)
    regenerate()
