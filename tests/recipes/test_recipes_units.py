"""Training recipes in one process: parameter groups, QK-clip on a plain model, config checks for
Muon / MuonClip, the MTP loss on a toy task."""
import argparse
import copy
import json
from pathlib import Path

import pytest
import torch

from megamoe import schedule, train_config  # noqa: E402
from megamoe.config import ModelConfig
from megamoe.optim import GroupSpec, QKClip, param_groups, qk_clip_scalars, qk_row_scales

ROOT = Path(__file__).resolve().parents[2]


def tiny(**kw):
    return ModelConfig.load("tiny", **kw)


def kind_by_rule(name: str) -> str:
    """The issue's rules, spelled out by name for the tiny model (independent of megamoe.optim)."""
    if name == "embed_tokens.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "lm_head"
    if name.endswith("ffn.router.weight"):
        return "router"
    if name.endswith(("norm.weight", "enorm.weight", "hnorm.weight")):
        return "norm"
    return "matrix"


@pytest.mark.parametrize("tied", [False, True])
def test_param_groups_exact(tied):
    model = tiny(num_nextn_predict_layers=1, tie_word_embeddings=tied).build(seed=0)
    spec = GroupSpec(weight_decay=0.1, lr_mult={"router": 0.5, "embedding": 2.0})
    groups = param_groups(model, spec, base_lr=1e-3)
    by_id = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(by_id) == sum(len(g["params"]) for g in groups) == len(names)  # each exactly once
    assert groups[0]["name"] == "matrix"
    for n, p in names.items():
        g = by_id[id(p)]
        kind = kind_by_rule(n)
        assert g["name"] == kind, n
        assert g["weight_decay"] == (0.0 if kind in ("norm", "embedding") else 0.1), n
        assert g["lr"] == pytest.approx(1e-3 * {"router": 0.5, "embedding": 2.0}.get(kind, 1.0)), n
    if tied:
        assert "lm_head" not in {g["name"] for g in groups}  # the tied head is the embedding
    # Muon: its lr / adam_lr per half; decaying everything when asked
    groups = param_groups(model, GroupSpec(weight_decay=0.1, no_decay=()), 0.02,
                          {"muon_lr": 0.02, "adam_lr": 3e-3}, muon=True)
    assert {g["name"]: g["lr"] for g in groups}["matrix"] == 0.02
    assert all(g["lr"] == 3e-3 for g in groups if g["name"] != "matrix")
    assert all(g["weight_decay"] == 0.1 for g in groups)


def test_group_spec_and_flags_reject_bad_input():
    with pytest.raises(ValueError, match="unknown parameter kind"):
        GroupSpec(no_decay=("norms",))
    with pytest.raises(ValueError, match=">= 0"):
        GroupSpec(lr_mult={"router": -1.0})
    assert train_config.parse_lr_mult(["router=0.1", "embedding=2"]) == {"router": 0.1, "embedding": 2.0}
    for bad in (["router"], ["routers=1"], ["router=x"], ["router=nan"]):
        with pytest.raises(ValueError, match="--lr-mult"):
            train_config.parse_lr_mult(bad)


def test_muon_assignment_puts_only_hidden_matrices_on_muon():
    """DeepSpeed's own tagging (deepspeed.set_optimizer_flags) under megamoe.optim.muon_assignment."""
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig
    from megamoe.optim import muon_assignment
    model = tiny().build(seed=0)
    cfg = DeepSpeedConfig({"train_batch_size": 1, "optimizer": {"type": "Muon", "params": {"lr": 0.02}}})
    deepspeed.set_optimizer_flags(cfg, model)
    assert model.layers[1].ffn.router.weight.use_muon  # DeepSpeed alone: router on Muon
    with muon_assignment():
        deepspeed.set_optimizer_flags(cfg, model)
    assert deepspeed.set_optimizer_flags.__module__ == "deepspeed"  # restored
    for n, p in model.named_parameters():
        assert p.use_muon == (kind_by_rule(n) == "matrix"), n


# ----------------------------------------------------------------------------------------------
# QK-clip
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q_lora", [None, 32])
def test_qk_clip_plain_model(q_lora):
    cfg = tiny(q_lora_rank=q_lora, num_attention_heads=4, num_hidden_layers=2)
    model = cfg.build(seed=3).train()
    clip = QKClip(model, tau=1e9)
    ids = torch.randint(3, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    observed = clip.global_max_logits()
    tau = float(observed.flatten().median())
    clip.tau = tau
    qn = "wq" if q_lora is None else "wq_b"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(ids)
    stats = clip.step()
    assert torch.equal(stats["max_logits"], observed)
    clipped = stats["clipped"]
    assert 0 < int(clipped.sum()) < clipped.numel()
    assert torch.equal(clipped, observed > tau)
    after = model.state_dict()
    Dn, Dr, Dv, N = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.num_attention_heads
    for k in before:
        touched = k.endswith((f"attn.{qn}.weight", "attn.wkv_b.weight"))
        if not touched:
            assert torch.equal(after[k], before[k]), k  # wkv_a (shared rope key), wq_a, norms, wo, ...
            continue
        li = int(k.split(".")[1])
        g = stats["gamma"][li]
        per = Dn + (Dr if qn in k else Dv)
        w_b, w_a = before[k].view(N, per, -1), after[k].view(N, per, -1)
        for h in range(N):
            if not clipped[li, h]:
                assert torch.equal(w_a[h], w_b[h]), (k, h)
                continue
            root = torch.sqrt(g[h])
            assert torch.equal(w_a[h, :Dn], w_b[h, :Dn] * root), (k, h)   # q_nope / k_nope
            if qn in k:
                assert torch.equal(w_a[h, Dn:], w_b[h, Dn:] * g[h])       # q_rope
            else:
                assert torch.equal(w_a[h, Dn:], w_b[h, Dn:])              # v untouched
    with torch.no_grad():
        model(ids)
    nxt = clip.global_max_logits()
    # first layer: same input, so exactly gamma x the old logits (<= tau); the second layer's input moved a bit
    assert (nxt[0] <= tau * (1 + 1e-5)).all()
    assert torch.equal(nxt[0][~clipped[0]], observed[0][~clipped[0]])
    assert (nxt <= tau * 1.02).all(), (nxt, tau)
    s = qk_clip_scalars(stats)
    assert s["qk_clip/clipped_heads"] == int(clipped.sum()) and s["qk_clip/max_logit"] == float(observed.max())


def test_qk_row_scales_layout():
    cfg = tiny(num_attention_heads=2)
    attn = cfg.build(seed=0).layers[0].attn
    q, kv = qk_row_scales(attn, torch.tensor([0.25, 1.0]))
    Dn, Dr, Dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    assert q.tolist() == [0.5] * Dn + [0.25] * Dr + [1.0] * (Dn + Dr)
    assert kv.tolist() == [0.5] * Dn + [1.0] * Dv + [1.0] * (Dn + Dv)
    with pytest.raises(ValueError, match="tau"):
        QKClip(cfg.build(seed=0), tau=0.0)


# ----------------------------------------------------------------------------------------------
# DeepSpeed config checks
# ----------------------------------------------------------------------------------------------
def args_for(**kw):
    a = train_config.parse_args(["--model-config", "tiny", "--data-path", "x", "--seq-length", "16", "--train-iters", "1",
                             "--deepspeed-config", "x.json", "--lr", "0.02"] + [s for k, v in kw.items()
                                                                                for s in (f"--{k.replace('_', '-')}", str(v))])
    return a


def test_muon_with_clipping_is_refused():
    ds = json.loads((ROOT / "ds_configs" / "muon.json").read_text())
    train_config.reconcile_ds_config(ds, args_for(), 2)  # the shipped config is fine
    bad = copy.deepcopy(ds)
    bad["gradient_clipping"] = 1.0
    with pytest.raises(train_config.ConfigConflict, match="Muon with gradient_clipping 1.0 is refused.*Newton-Schulz"):
        train_config.reconcile_ds_config(bad, args_for(), 2)
    z3 = copy.deepcopy(ds)
    z3["zero_optimization"]["stage"] = 3
    with pytest.raises(train_config.ConfigConflict, match="reduce_scatter"):
        train_config.reconcile_ds_config(z3, args_for(), 2)
    z3["zero_optimization"]["reduce_scatter"] = False
    train_config.reconcile_ds_config(z3, args_for(), 2)


def test_muonclip_config_block_belongs_to_the_trainer():
    ds = json.loads((ROOT / "ds_configs" / "muonclip.json").read_text())
    args = args_for()
    out = train_config.reconcile_ds_config(ds, args, 2)
    assert "qk_clip" not in out and args.optim.qk_clip_tau == 100.0
    assert out["optimizer"]["type"] == "Muon" and out["gradient_clipping"] == 0.0
    with pytest.raises(train_config.ConfigConflict, match="--qk-clip-tau 50.0 contradicts qk_clip.tau 100.0"):
        train_config.reconcile_ds_config(ds, args_for(qk_clip_tau=50), 2)
    with pytest.raises(SystemExit):
        args_for(qk_clip_tau=-1)


# ----------------------------------------------------------------------------------------------
# Multi-token prediction
# ----------------------------------------------------------------------------------------------
def test_mtp_loss_decreases_on_a_toy_task():
    """Arithmetic progressions: the token two ahead is predictable, so depth-1 MTP must learn."""
    cfg = tiny(num_nextn_predict_layers=1, mtp_loss_weight=0.3, num_hidden_layers=2)
    model = cfg.build(seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    mtp, lm = [], []
    for _ in range(40):
        start = torch.randint(3, 200, (8, 1), generator=gen)
        stride = torch.randint(1, 4, (8, 1), generator=gen)
        seq = (start + stride * torch.arange(33)) % 500 + 3
        out = model(seq[:, :-1], labels=seq[:, 1:])
        opt.zero_grad()
        out.loss.backward()   # the MTP gradient joins through the logits
        opt.step()
        mtp.append(float(out.mtp_loss))
        lm.append(out.loss.item())
    first, last = sum(mtp[:5]) / 5, sum(mtp[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert model.mtp[0].eh_proj.weight.grad is not None and model.mtp[0].eh_proj.weight.grad.abs().sum() > 0
    assert sum(lm[-5:]) < sum(lm[:5])
