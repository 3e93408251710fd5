"""Fast, single-process checks of the trainer's pieces: argument/config reconciliation, the LR
schedule, FLOPs per token, the checkpoint guard and `latest` handling, the shipped ds_configs."""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from megamoe import checkpoint as ckpt  # noqa: E402
from megamoe import schedule, train_config  # noqa: E402
from megamoe.guard import LossGuard  # noqa: E402
from megamoe.config import ModelConfig  # noqa: E402
from megamoe.monitor import flops_per_token  # noqa: E402


def args(*extra):
    return train_config.parse_args(["--model-config", "tiny", "--data-path", "x", "--seq-length", "64",
                                "--train-iters", "10", "--deepspeed-config", "c.json", *extra])


def ds(**kw):
    d = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
         "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
         "zero_optimization": {"stage": 2}}
    d.update(kw)
    return d


def test_reconcile_fills_batch_triple_and_lr():
    out = train_config.reconcile_ds_config(ds(), args("--lr", "1e-3"), world_size=2)
    assert out["train_batch_size"] == 16 and out["optimizer"]["params"]["lr"] == 1e-3
    out = train_config.reconcile_ds_config(ds(train_batch_size=32, gradient_accumulation_steps=None,
                                          train_micro_batch_size_per_gpu=None) | {"gradient_accumulation_steps": 4},
                                       args("--lr", "1e-3"), world_size=2)
    assert out["train_micro_batch_size_per_gpu"] == 4


@pytest.mark.parametrize("extra, cfg, match", [
    (["--micro-batch-size", "8"], {}, "micro-batch-size 8 contradicts"),
    (["--global-batch-size", "64"], {}, "global-batch-size 64 contradicts"),
    (["--clip-grad", "0.5"], {}, "clip-grad 0.5 contradicts"),
    (["--lr", "1e-3"], {"optimizer": {"type": "AdamW", "params": {"lr": 2e-3}}}, "--lr 0.001 contradicts"),
    ([], {}, "no learning rate"),
    (["--lr", "1e-3"], {"scheduler": {"type": "WarmupLR"}}, "scheduler"),
    (["--lr", "1e-3"], {"train_batch_size": 12}, "train_batch_size 12"),
    (["--lr", "1e-3", "--bf16"], {"bf16": {"enabled": False}}, "--bf16"),
    (["--lr", "1e-3", "--expert-model-parallel-size", "2"], {"expert_parallel": {"autoep_size": 4}}, "autoep_size"),
    (["--lr", "1e-3", "--min-lr", "1e-2"], {}, "min-lr"),
])
def test_reconcile_refuses_contradictions(extra, cfg, match):
    with pytest.raises(train_config.ConfigConflict, match=match):
        train_config.reconcile_ds_config(ds(**cfg), args(*extra), world_size=2, source="c.json")


def test_lr_schedules():
    cos = schedule.LRSchedule("cosine", 1.0, 0.1, warmup_iters=4, train_iters=14)
    assert [cos(n) for n in range(4)] == [0.25, 0.5, 0.75, 1.0]  # iteration 1 never trains at lr 0
    assert cos(13) == pytest.approx(0.1) and cos(100) == pytest.approx(0.1)
    assert cos(8) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    wsd = schedule.LRSchedule("wsd", 2.0, 0.0, warmup_iters=0, train_iters=10, wsd_decay_iters=4)
    assert [wsd(n) for n in range(10)] == pytest.approx([1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0.0])
    const = schedule.LRSchedule("constant", 1.0, 0.0, warmup_iters=2, train_iters=10)
    assert [const(n) for n in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_lambda_lr_state_roundtrip():
    import torch
    p = torch.nn.Parameter(torch.zeros(1))
    sched_fn = schedule.LRSchedule("cosine", 1e-3, 1e-4, 2, 10)
    opt = torch.optim.AdamW([p], lr=1e-3)
    s = schedule.lr_scheduler_factory(sched_fn)(opt)
    for _ in range(5):
        opt.step()
        s.step()
    opt2 = torch.optim.AdamW([p], lr=1e-3)
    s2 = schedule.lr_scheduler_factory(sched_fn)(opt2)
    s2.load_state_dict(s.state_dict())
    assert s2.get_last_lr() == s.get_last_lr() and s2.last_epoch == 5


def test_flops_per_token_counts_active_experts_and_mla_attention():
    cfg = ModelConfig.load("small-moe")
    f = flops_per_token(cfg, 256)
    n = cfg.num_params()
    assert f["matmul"] == 6 * (n["active"] - n["embedding"] - n["norm"])
    h, L = cfg.num_attention_heads, cfg.num_hidden_layers
    assert f["attention"] == L * 6 * h * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * 257 / 2
    E, K, H, I = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    n_moe = sum(cfg.is_moe_layer(i) for i in range(L))
    more_experts = ModelConfig.load("small-moe", n_routed_experts=2 * E)  # inactive experts cost nothing ...
    assert flops_per_token(more_experts, 256)["matmul"] == pytest.approx(f["matmul"] + 6 * E * H * n_moe)
    # ... except their router rows (E x H per MoE layer); top-k experts are what count
    two_more = ModelConfig.load("small-moe", num_experts_per_tok=K + 2)
    assert flops_per_token(two_more, 256)["matmul"] - f["matmul"] == 6 * 2 * 3 * H * I * n_moe


@pytest.mark.parametrize("name,over", [("small-dense", {}), ("small-moe", {}),
                                       ("tiny", {"num_nextn_predict_layers": 2, "n_shared_experts": 2}),
                                       ("tiny", {"q_lora_rank": None, "tie_word_embeddings": True})])
def test_flops_per_token_is_what_torch_counts(name, over, monkeypatch):
    """The training FLOPs per token that MFU and bench/quality.py's equal-compute budgets use,
    against torch's FlopCounterMode over a real forward + backward (experts as one matmul each so
    that they are counted; attention as the eager backend's full S x S bmm's, where ours is causal:
    SDPA's CPU flash kernel has no FLOP formula)."""
    from torch.utils.flop_counter import FlopCounterMode
    monkeypatch.setenv("MEGAMOE_KERNELS", "reference")
    cfg = ModelConfig.load(name, attention_backend="eager", **over)
    model = cfg.build(seed=0).train()
    S = 64
    x = torch.randint(0, cfg.vocab_size, (2, S))
    # The experts' weighted combine is an elementwise weighted sum (dispatch.Combine): 4 K H
    # FLOPs per token and MoE layer that neither FlopCounterMode nor the model's count (like
    # Megatron's) includes, so every bmm left is attention's.
    with FlopCounterMode(display=False) as counter:
        model(x, labels=x).loss.backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = counts.pop("aten.bmm")
    f = flops_per_token(cfg, S)
    assert sum(counts.values()) == f["matmul"] * 2 * S, counts
    assert attention == pytest.approx(f["attention"] * 2 * S * 2 * S / (S + 1))


def _fake_ckpt(root: Path, step: int, **state):
    d = root / ckpt.tag_for(step)
    d.mkdir(parents=True)
    st = ckpt.TrainerState(step=step, model_config={}, ep_size=2, world_size=2, zero_stage=2, **state)
    st.write(d)
    return st


def test_guard_and_latest(tmp_path):
    assert ckpt.find_checkpoint(tmp_path) is None  # empty --load directory: fresh start
    st = _fake_ckpt(tmp_path, 3)
    with pytest.raises(ckpt.CheckpointError, match="no `latest`"):
        ckpt.find_checkpoint(tmp_path)
    ckpt.atomic_write_text(tmp_path / "latest", "global_step3\n")
    tag, got = ckpt.find_checkpoint(tmp_path)
    assert tag == "global_step3" and got == st
    assert ckpt.check_compatible(st, ep_size=2, world_size=2, zero_stage=2) == {}
    for kw, what in [({"ep_size": 1}, "ep_size 2 -> 1"), ({"world_size": 4}, "world_size 2 -> 4"),
                     ({"zero_stage": 3}, "zero_stage 2 -> 3")]:
        layout = {"ep_size": 2, "world_size": 2, "zero_stage": 2, **kw}
        with pytest.raises(ckpt.CheckpointError, match=what) as e:
            ckpt.check_compatible(st, **layout)
        assert "tools/convert_checkpoint.py" in str(e.value)
    assert ckpt.check_compatible(dataclasses.replace(st, universal=True), 1, 4, 3) == {"checkpoint": {"load_universal": True}}
    (tmp_path / "global_step6").mkdir()  # an interrupted save: no state file
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.find_checkpoint(tmp_path, "global_step6")


def test_loss_guard_spike_detection():
    import torch
    g = LossGuard(spike_factor=2.0, min_history=3)
    for v in (5.0, 4.8, 4.6, 4.5):
        status, means = g.check(torch.tensor(v), 1)
        assert status is None and means[0] == pytest.approx(v)
        g.accept(v)
    assert g.check(torch.tensor(20.0), 5)[0] == "spike"
    assert g.check(torch.tensor(float("inf")), 5)[0] == "nan"
    assert g.check(torch.tensor(5.0), 5)[0] is None


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero2_offload", "muon"])
def test_shipped_ds_configs_reconcile(name):
    cfg = train_config.load_ds_config(str(ROOT / "ds_configs" / f"{name}.json"))
    out = train_config.reconcile_ds_config(cfg, args("--lr", "1e-3"), world_size=2)
    assert out["bf16"]["enabled"] and out["optimizer"]["params"]["lr"] == 1e-3
    if name == "muon":
        assert out["gradient_clipping"] == 0 and "reduce_scatter" not in out["zero_optimization"]
        assert "clipping" in cfg["_comment"] and "reduce_scatter" in cfg["_comment"]


def test_resume_refuses_a_different_model_but_allows_training_knobs():
    from megamoe.config import ModelConfig
    cfg = ModelConfig.load("tiny")
    state = ckpt.TrainerState(step=1, model_config=cfg.to_dict())
    ckpt.check_model_config(state, ModelConfig.load("tiny", aux_loss_alpha=0.5, bias_update_rate=0.0))
    with pytest.raises(ckpt.CheckpointError, match="num_experts_per_tok: 2 -> 3"):
        ckpt.check_model_config(state, ModelConfig.load("tiny", num_experts_per_tok=3))
    assert ckpt.check_compatible(dataclasses.replace(state, weights_only=True), ep_size=4, world_size=8, zero_stage=3) == {}


def test_layout_change_of_a_muon_checkpoint_points_to_the_weights_only_route():
    st = ckpt.TrainerState(step=1, model_config={}, ep_size=2, world_size=2, zero_stage=2,
                           ds_config={"optimizer": {"type": "Muon"}})
    with pytest.raises(ckpt.CheckpointError, match="convert_from_hf") as e:
        ckpt.check_compatible(st, ep_size=1, world_size=2, zero_stage=2, where="ckpt")
    assert "muon" in str(e.value) and "convert_checkpoint" not in str(e.value)


def test_mfu_is_refused_above_the_measured_peak():
    from megamoe.monitor import mfu
    assert mfu(5e9, 1e10) == 0.5
    assert mfu(1.1e10, 1e10) is None and mfu(1e9, None) is None and mfu(1e9, 0.0) is None


def test_device_name_is_the_cpu_model_off_cuda(monkeypatch):
    """Benches and quality runs say what they ran on: the CPU's model name from /proc/cpuinfo."""
    from pathlib import Path

    from megamoe.monitor import cpu_name, device_name
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    models = [line.partition(":")[2].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("model name")]
    assert device_name() == cpu_name() == (models[0] if models else cpu_name()) and device_name()


def test_heatmap_is_skipped_with_a_warning_without_matplotlib(tmp_path, monkeypatch):
    import builtins

    import torch

    from megamoe.monitor import Monitor, read_scalars
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    mon = Monitor(str(tmp_path), enabled=True)
    with pytest.warns(UserWarning, match="heatmap is skipped"):
        mon.heatmap("moe/expert_load", torch.ones(2, 4), [1, 2], 5)
    mon.heatmap("moe/expert_load", torch.ones(2, 4), [1, 2], 6)   # said once
    mon.scalars({"moe/x": 1.0}, 5)
    mon.close()
    assert read_scalars(tmp_path, "moe/x") == {5: 1.0}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ds_config_at_precision_changes_only_bf16(tmp_path, precision):
    src = Path(__file__).resolve().parents[2] / "ds_configs" / "zero2.json"
    out = train_config.ds_config_at_precision(src, precision, tmp_path)
    old, new = json.loads(src.read_text()), json.loads(out.read_text())
    assert new.pop("bf16") == {"enabled": precision == "bf16"} and old.pop("bf16")["enabled"] is True
    assert new == old and out.parent == tmp_path
