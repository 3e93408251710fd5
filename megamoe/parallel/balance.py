"""Aux-loss-free load balancing (DeepSeek-V3 §2.1.2), done by the trainer once per optimizer step.

Each Router adds the tokens it routes during training forwards to `tokens_per_expert_acc` [E].
After every optimizer step (at a gradient-accumulation boundary, so the counts cover all
micro-batches of the step) the trainer calls `update_routing_bias`, which

  1. all-reduces the counts of every MoE layer over the data-parallel world: every rank routes
     its own tokens over all E experts (expert parallelism moves tokens, not routing), so the sum
     over ranks is the global load of the step, the same number on every rank;
  2. updates the selection-only bias of each layer: b_i += rate * sign(mean_load - load_i),
     computed from identical inputs with identical ops, hence identical on every rank;
  3. zeroes the accumulators (ours and AutoEP's own never-reset `tokens_per_expert`).

The bias is a persistent buffer of the Router (`...router.e_score_correction_bias`), so it is in
the engine's module state dict and travels with checkpoints and the HF export.

Works on a raw Transformer, a DeepSpeed engine (engine.module) and with AutoEP layers (whose
`.router` is our Router, see megamoe.parallel.expert).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from megamoe.model.moe import Router


def routers(engine_or_model: nn.Module) -> list[tuple[str, Router]]:
    """(module name, Router) of every MoE layer, in layer order."""
    model = getattr(engine_or_model, "module", engine_or_model)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Router)]


@torch.no_grad()
def update_routing_bias(model: nn.Module, rate: float, group=None) -> dict:
    """All-reduce the routed-token counts, move each layer's bias toward balance, reset counts.

    model: Transformer or DeepSpeed engine. rate: gamma (0 = only stats and reset).
    group: process group over which tokens were routed (default: the whole world, i.e. the
    data-parallel world when there is no tensor/pipeline parallelism).

    Returns stats of the step's global load, identical on every rank, on the routers' device:
      "tokens_per_expert" [L_moe, E] float (summed over ranks and micro-batches),
      "max_over_mean" [L_moe] (1.0 = perfectly balanced; 0 for a layer that routed nothing),
      "bias_abs_mean" [L_moe] (mean |bias| after the update),
      "load_entropy" [L_moe] (entropy of the load over experts / log E: 1 = uniform, 0 = one expert),
      "rerouted_fraction" [L_moe] (share of (token, slot) picks the selection bias changed; 0 when
          the bias cannot move), "layers": module names.
    """
    found = routers(model)
    if not found:
        return {"tokens_per_expert": torch.zeros(0, 0), "max_over_mean": torch.zeros(0),
                "bias_abs_mean": torch.zeros(0), "load_entropy": torch.zeros(0), "rerouted_fraction": torch.zeros(0),
                "layers": []}
    names = [n for n, _ in found]
    E = found[0][1].n_experts
    # one all-reduce for the loads and the re-routing counts ([picks changed by the bias, picks])
    both_LX = torch.stack([torch.cat([r.tokens_per_expert_acc.float(), r.rerouted_acc.float()]) for _, r in found])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(both_LX, op=dist.ReduceOp.SUM, group=group)
    counts_LE, rerouted_L2 = both_LX[:, :E], both_LX[:, E:]
    mean_L1 = counts_LE.mean(dim=-1, keepdim=True)
    if rate:
        delta_LE = float(rate) * torch.sign(mean_L1 - counts_LE)
        for (_, r), delta_E in zip(found, delta_LE):
            r.e_score_correction_bias.add_(delta_E.to(r.e_score_correction_bias))
    for _, r in found:
        r.tokens_per_expert_acc.zero_()
        r.rerouted_acc.zero_()
    _reset_autoep_counters(model)
    max_over_mean_L = torch.where(mean_L1.squeeze(-1) > 0,
                                  counts_LE.max(dim=-1).values / mean_L1.squeeze(-1).clamp_min(1e-12),
                                  torch.zeros_like(mean_L1.squeeze(-1)))
    bias_abs_mean_L = torch.stack([r.e_score_correction_bias.abs().mean() for _, r in found])
    p_LE = counts_LE / counts_LE.sum(-1, keepdim=True).clamp_min(1e-12)
    entropy_L = -(p_LE * p_LE.clamp_min(1e-30).log()).sum(-1) / math.log(E) if E > 1 else torch.zeros_like(mean_L1[:, 0])
    rerouted_L = rerouted_L2[:, 0] / rerouted_L2[:, 1].clamp_min(1.0)
    # on the device: the trainer reads them once per log interval, not once per step
    return {"tokens_per_expert": counts_LE, "max_over_mean": max_over_mean_L,
            "bias_abs_mean": bias_abs_mean_L.float(), "load_entropy": entropy_L, "rerouted_fraction": rerouted_L,
            "layers": names}


@torch.no_grad()
def expert_specialisation(model: nn.Module) -> torch.Tensor:
    """[L_moe] how much a token's id tells which experts it goes to: the mutual information between
    the token-id bucket (id mod moe.SPECIALISATION_BUCKETS) and the chosen expert over this rank's
    training tokens since the last call, divided by the entropy of the expert choice (0: experts
    ignore the token; 1: the token decides its experts). Resets the counts. A rank-local estimate
    (biased upward when few tokens were counted); MTP layers count nothing and read 0."""
    found = routers(model)
    if not found:
        return torch.zeros(0)
    c_LBE = torch.stack([r.bucket_expert_acc.float() for _, r in found])
    for _, r in found:
        r.bucket_expert_acc.zero_()
    p_LBE = c_LBE / c_LBE.sum((1, 2), keepdim=True).clamp_min(1.0)
    pb_LB1, pe_L1E = p_LBE.sum(2, keepdim=True), p_LBE.sum(1, keepdim=True)
    ratio = p_LBE / (pb_LB1 * pe_L1E).clamp_min(1e-30)
    mi_L = torch.where(p_LBE > 0, p_LBE * ratio.clamp_min(1e-30).log(), 0.0).sum((1, 2))
    h_L = -torch.where(pe_L1E > 0, pe_L1E * pe_L1E.clamp_min(1e-30).log(), 0.0).sum((1, 2))
    return torch.where(h_L > 0, mi_L / h_L.clamp_min(1e-30), 0.0)


def _reset_autoep_counters(model: nn.Module) -> None:
    # AutoEPMoELayer keeps its own fp32 `tokens_per_expert` and never resets it (it would lose
    # integer precision past 2**24 tokens); nothing reads it, but keep it bounded.
    inner = getattr(model, "module", model)
    for m in inner.modules():
        if getattr(m, "_is_autoep_layer", False) and isinstance(getattr(m, "tokens_per_expert", None), torch.Tensor):
            m.tokens_per_expert.zero_()


def routing_bias_state(model: nn.Module) -> torch.Tensor:
    """[L_moe, E] copy of the selection biases (for tests and monitoring)."""
    found = routers(model)
    if not found:
        return torch.zeros(0, 0)
    return torch.stack([r.e_score_correction_bias.detach().float().cpu().clone() for _, r in found])
