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
                     "fused LM head + loss time",
                     "sdpa qk192/v128",
                     "MoE layer fwd+bwd", "training loop", "loss falls", "resume at 12", "throughput", "planner"):
        assert expected in names, names
    assert "gpu-check: PASSED" in p.stdout


def test_gpu_check_without_a_gpu_says_so_and_exits_0():
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and "no CUDA GPU here" in p.stdout, p.stdout + p.stderr


def _gpu_check_module():
    """bench/gpu_check.py as a module (a script, not part of the package), for its row functions."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    return gpu_check


def test_the_padded_sdpa_row_agrees_with_the_oracle():
    """The CUDA-only row (SDPA on v padded to 192, timed next to the sdpa backend), run here on CPU
    tensors so that its first run on a GPU is not its first run."""
    import importlib

    import torch

    from megamoe.kernels import reference
    gpu_check = _gpu_check_module()
    attn = importlib.import_module("megamoe.kernels.attention")
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 16, 2, 192, generator=g) for _ in range(2))
    v = torch.randn(1, 16, 2, 128, generator=g)
    r = gpu_check.sdpa_padded_row(attn, reference, q, k, v, 192 ** -0.5, 16, 2, torch.device("cpu"))
    assert r["ok"] and r["fwd_bwd_ms"] > 0 and "v padded to 192" in r["name"], r


def test_the_planner_row_holds_the_measured_cuda_peak_to_15_percent():
    """The CUDA-only comparison of the end-to-end run's tensor peak with megamoe-plan's figure for
    the same setup, fed numbers here: it passes within 15% of the plan and fails outside."""
    import torch

    from megamoe.config import ModelConfig
    gpu_check = _gpu_check_module()
    s = gpu_check.FULL
    cfg = ModelConfig.load(s["preset"], num_hidden_layers=s["e2e_layers"])
    cuda = torch.device("cuda")          # only named: the planner allocates nothing
    planned = gpu_check.planner_row(cfg, s, cuda, 1.0)["planned_gib"]
    assert 5 < planned < 80                # V2-Lite x4 layers, micro batch 4 x 4096, one GPU
    assert gpu_check.planner_row(cfg, s, cuda, 1.1 * planned)["ok"]
    assert not gpu_check.planner_row(cfg, s, cuda, 1.2 * planned)["ok"]
    assert not gpu_check.planner_row(cfg, s, cuda, 0.8 * planned)["ok"]
    cpu = gpu_check.planner_row(cfg, s, torch.device("cpu"), 3.0)
    assert cpu["ok"] and "not compared" in cpu["name"] and "CUDA only" in cpu["reason"]
