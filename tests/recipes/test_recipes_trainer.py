"""The recipes through the real trainer (2 CPU ranks, EP 2, ZeRO-2, bf16): MuonClip
(ds_configs/muonclip.json), MTP, capacity dropping, kind groups; their TensorBoard scalars; an
MTP-trained checkpoint exports to HF only with --drop-mtp, and the export matches the native logits.
(Muon checkpoint export has its own tests in tests/export/test_export_muon.py.)"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import multirank
from megamoe.monitor import read_scalars as scalars

ROOT = Path(__file__).resolve().parents[2]
ITERS = 6
pytestmark = pytest.mark.slow


def train(d: Path, data: Path, ds: str, extra: list[str], iters: int = ITERS) -> dict:
    args = ["--model-config", "tiny", "--model-override", "num_nextn_predict_layers=1", "capacity_factor=1.0",
            "--data-path", str(data), "--seq-length", "64", "--train-iters", str(iters),
            "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-interval", "3",
            "--eval-iters", "1", "--deepspeed-config", str(ROOT / "ds_configs" / f"{ds}.json"),
            "--expert-model-parallel-size", "2", "--seed", "7",
            "--save", str(d / "ckpt"), "--tensorboard-dir", str(d / "tb"), *extra]
    rc, out = multirank.run(["-m", "megamoe.pretrain", *args])
    assert rc == 0, out[-5000:]
    return {"dir": d, "out": out}


@pytest.fixture(scope="module")
def run(tmp_path_factory, progression_corpus):
    return train(tmp_path_factory.mktemp("muonclip"), progression_corpus, "muonclip",
                 ["--lr", "0.02", "--qk-clip-tau", "100", "--lr-mult", "router=0.5"])


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory, progression_corpus):
    # --exit-duration-in-mins 0: the time limit is reached after the first iteration (deterministic)
    return train(tmp_path_factory.mktemp("adamw_mtp"), progression_corpus, "zero2", ["--lr", "3e-3", "--exit-duration-in-mins", "0"],
                 iters=100)


def test_exit_duration_evaluates_saves_and_stops(adamw_run):
    out = adamw_run["out"]
    assert "validation at iteration 1:" in out and "--exit-duration-in-mins 0.0 reached at iteration 1" in out
    from megamoe.checkpoint import read_latest
    assert read_latest(adamw_run["dir"] / "ckpt") == "global_step1"


def test_trainer_logs_mtp_drops_and_qk_clip(run):
    tb, out = run["dir"] / "tb", run["out"]
    mtp = scalars(tb, "train/mtp_loss")
    assert sorted(mtp) == list(range(1, ITERS + 1)) and all(v > 0 for v in mtp.values())
    # tiny: MoE layers 1, 2 and the MTP block (layer 3); capacity 1.0 drops some assignments
    for li in (1, 2, 3):
        drops = scalars(tb, f"moe/dropped_fraction/layer_{li}")
        assert sorted(drops) == list(range(1, ITERS + 1))
        assert all(0 <= v < 0.6 for v in drops.values())
    assert max(scalars(tb, "moe/dropped_fraction_max").values()) > 0
    assert max(scalars(tb, "moe/dropped_tokens").values()) > 0
    ml = scalars(tb, "qk_clip/max_logit")
    assert sorted(ml) == list(range(1, ITERS + 1)) and all(0 < v < 100 for v in ml.values())
    assert set(scalars(tb, "qk_clip/clipped_heads").values()) == {0.0}  # tau 100: nothing to clip here
    assert scalars(tb, "qk_clip/max_logit/layer_3")  # the MTP block's attention is clipped too
    assert "mtp " in out and "dropped " in out and "max logit " in out and "clipped heads 0" in out
    # the groups the trainer logged: Muon on matrices and experts only, router lr x 0.5
    assert "matrix-muon-params:" in out and "router-adam-params:" in out and "ep_size_2:" in out
    router_line = next(ln for ln in out.splitlines() if "router-adam-params:" in ln)
    assert "AdamW" in router_line and "lr 1.500e-03" in router_line  # adam_lr 3e-3 x 0.5


def test_mtp_checkpoint_exports_only_with_drop_mtp(adamw_run, tmp_path):
    from megamoe.checkpoint import load_native_state_dict
    from megamoe.export import convert_to_hf
    from megamoe.hf import HFConversionError
    ckpt = adamw_run["dir"] / "ckpt"
    cli = [sys.executable, str(ROOT / "tools" / "convert_to_hf.py"), "--checkpoint", str(ckpt), "--no-tokenizer"]
    p = subprocess.run(cli + ["--output", str(tmp_path / "refused")], capture_output=True, text=True,
                       env=dict(os.environ, DS_ACCELERATOR="cpu"), timeout=300)
    assert p.returncode == 1 and "--drop-mtp" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
    with pytest.raises(HFConversionError, match="drop-mtp"):
        convert_to_hf(ckpt, tmp_path / "refused2", tokenizer=None)
    p = subprocess.run(cli + ["--output", str(tmp_path / "hf"), "--drop-mtp"], capture_output=True, text=True,
                       env=dict(os.environ, DS_ACCELERATOR="cpu"), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    from safetensors import safe_open
    keys = [k for f in (tmp_path / "hf").glob("*.safetensors") for k in safe_open(str(f), "pt").keys()]
    assert keys and not any("mtp" in k or "layers.3." in k for k in keys)
    # logits: HF model == native model from the same checkpoint (MTP never touches the logits).
    # HF has no capacity limit: compare with the native model dropless (capacity_factor None)
    sd, ck = load_native_state_dict(ckpt)
    assert any(k.startswith("mtp.") for k in sd) and ck.config.capacity_factor == 1.0
    native = type(ck.config).from_dict({**ck.config.to_dict(), "capacity_factor": None}).build(seed=0)
    native.load_state_dict(sd)
    native.eval()
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True, dtype=torch.float32).eval()
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = native(ids).logits.float()
        b = hf(ids).logits.float()
    torch.testing.assert_close(b, a, atol=2e-4, rtol=1e-4)
