"""bench/gpu_check.py --cpu: the GPU acceptance script, run end to end at tiny shapes on the CPU
(Triton interpreted), so it cannot rot between the runs on a GPU machine."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_passes_on_the_cpu_at_tiny_shapes(tmp_path):
    out = tmp_path / "report.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    report = json.loads(out.read_text())
    from megamoe.monitor import cpu_name
    assert report["device"] == cpu_name()          # the CPU's model, as the benches name it
    assert report["ok"] and {r["part"] for r in report["rows"]} == {"kernels", "attention", "syncs", "end_to_end"}
    names = " | ".join(r["name"] for r in report["rows"])
    for expected in ("rms_norm strided", "rope", "router E=256 top-8 sigmoid groups 8/4", "NaN row", "fused LM head",
                     "sdpa qk192/v128",
                     "MoE layer fwd+bwd", "training loop", "loss falls", "resume at 12", "throughput"):
        assert expected in names, names
    assert "gpu-check: PASSED" in p.stdout


def test_gpu_check_without_a_gpu_says_so_and_exits_0():
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and "no CUDA GPU here" in p.stdout, p.stdout + p.stderr


def test_the_padded_sdpa_row_agrees_with_the_oracle():
    """The CUDA-only row (SDPA on v padded to 192, timed next to the sdpa backend), run here on CPU
    tensors so that its first run on a GPU is not its first run."""
    import importlib
    import importlib.util

    import torch

    from megamoe.kernels import reference
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    attn = importlib.import_module("megamoe.kernels.attention")
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 16, 2, 192, generator=g) for _ in range(2))
    v = torch.randn(1, 16, 2, 128, generator=g)
    r = gpu_check.sdpa_padded_row(attn, reference, q, k, v, 192 ** -0.5, 16, 2, torch.device("cpu"))
    assert r["ok"] and r["fwd_bwd_ms"] > 0 and "v padded to 192" in r["name"], r
