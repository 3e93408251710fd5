"""Model-side training recipes: capacity limit, router jitter, multi-token prediction."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from megamoe import hf
from megamoe.config import ModelConfig
from megamoe.model.moe import MoE

TINY = ModelConfig.load("tiny")


def moe_layer(**kw):
    cfg = dataclasses.replace(TINY, hidden_size=32, moe_intermediate_size=16, n_group=1, topk_group=1,
                              aux_loss_alpha=0.0, router_z_loss_coef=0.0, **kw).validate()
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return cfg, moe


def reference_capacity_moe(moe: MoE, x_TH, factor):
    """Route, then per expert keep the ceil(factor*T*K/E) assignments with the highest scores."""
    with torch.no_grad():
        logits = x_TH @ moe.router.weight.T
    scores = torch.sigmoid(logits)
    w, idx, _ = moe.router(x_TH)   # capacity-free weights of the chosen experts...
    T, K = idx.shape
    E = moe.router.n_experts
    cap = math.ceil(factor * T * K / E)
    keep = torch.zeros(T, K, dtype=torch.bool)
    for e in range(E):
        pairs = [(scores[t, e].item(), t, k) for t in range(T) for k in range(K) if idx[t, k] == e]
        for _, t, k in sorted(pairs, key=lambda p: -p[0])[:cap]:
            keep[t, k] = True
    I = moe.experts.down_proj.shape[-1]
    out = moe.shared_experts(x_TH).clone()
    for t in range(T):
        for k in range(K):
            if keep[t, k]:
                e = idx[t, k]
                gu = moe.experts.gate_up_proj[e]
                h = F.silu(x_TH[t] @ gu[:I].T) * (x_TH[t] @ gu[I:].T)
                out[t] += w[t, k] * (h @ moe.experts.down_proj[e].T)
    return out, 1 - keep.float().mean()


@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_capacity_dropping_matches_reference_and_reports_fraction(factor):
    cfg, moe = moe_layer(capacity_factor=factor)
    x = torch.randn(40, cfg.hidden_size)
    ours = moe(x[None])[0]
    moe.router.capacity_factor = None      # the reference routes without capacity, then drops
    ref, dropped = reference_capacity_moe(moe, x, factor)
    moe.router.capacity_factor = factor
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert moe.router.last_dropped_fraction.item() == pytest.approx(dropped.item())
    if factor == 0.5:
        assert dropped > 0.3   # at most half the assignments fit


def test_large_capacity_equals_dropless():
    cfg, moe = moe_layer(capacity_factor=100.0)
    x = torch.randn(1, 30, cfg.hidden_size)
    capped = moe(x)
    assert moe.router.last_dropped_fraction.item() == 0
    moe.router.capacity_factor = None
    torch.testing.assert_close(capped, moe(x))


def test_capacity_drop_through_autoep_contract_gives_zero_weights():
    cfg, moe = moe_layer(capacity_factor=0.25)
    x = torch.randn(40, cfg.hidden_size)
    w, idx, counts = moe.router(x)
    assert (w == 0).any() and counts.sum() == idx.numel()  # counts still cover every dispatched pair


def test_router_jitter_only_in_training():
    cfg, moe = moe_layer(router_jitter_noise=0.5)
    x = torch.randn(1, 64, cfg.hidden_size)
    moe.eval()
    assert torch.equal(moe(x), moe(x))
    moe.train()
    torch.manual_seed(1)
    a = moe.router.route(x[0]).weights_TK
    torch.manual_seed(2)
    b = moe.router.route(x[0]).weights_TK
    assert not torch.equal(a, b)


def test_mtp_model_counts_trains_and_exports_without_mtp(tmp_path):
    cfg = dataclasses.replace(TINY, num_nextn_predict_layers=1, mtp_loss_weight=0.5).validate()
    model = cfg.build(seed=0)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()["total"]
    # a toy task: sequences of consecutive ids, so token i+2 is predictable from token i
    starts = torch.randint(3, cfg.vocab_size - 40, (8, 1))
    seq = starts + torch.arange(33)
    ids, labels = seq[:, :-1], seq[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    mtp_losses = []
    for _ in range(40):
        out = model(ids, labels=labels)
        out.loss.backward()          # the MTP loss joins through the logits
        opt.step()
        opt.zero_grad()
        mtp_losses.append(out.mtp_loss.item())
    assert mtp_losses[-1] < 0.5 * mtp_losses[0]
    # the MTP gradient really reaches the MTP module
    model.zero_grad()
    model(ids, labels=labels).loss.backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0

    model.eval()
    with pytest.raises(hf.HFConversionError, match="drop-mtp"):
        hf.save_hf_dir(tmp_path / "refused", cfg, model.state_dict())
    assert not (tmp_path / "refused").exists()
    hf.save_hf_dir(tmp_path / "hf", cfg, model.state_dict(), drop_mtp=True)
    from transformers import AutoModelForCausalLM
    theirs, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True,
                                                        dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        ours_logits, theirs_logits = model(ids).logits, theirs(ids).logits
    assert ((ours_logits - theirs_logits).norm() / theirs_logits.norm()) < 1e-5
