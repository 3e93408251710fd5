"""What the router did with a text: per MoE layer and token, the experts chosen and their gate
weights, the share of the layer's output that came from the shared experts, and the load.

`trace_routes(model, ids)` runs one forward over the ids with hooks on each MoE block's routed
experts (their inputs are the router's choice: indices [T, K] and weights [T, K]) and shared
experts (their output). Nothing in the model changes; a dense model gives an empty trace.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megamoe.model.moe import GroupedExperts, MoE


@dataclass
class LayerRoutes:
    layer: int                   # index among all blocks (dense first layers count)
    experts_TK: torch.Tensor     # int64 [T, K] chosen experts, in the router's slot order
    weights_TK: torch.Tensor     # fp32 [T, K] their gate weights (after normalisation and scaling)
    shared_share_T: torch.Tensor  # fp32 [T] |shared out| / (|shared out| + |routed out|); 0 without shared experts
    n_experts: int

    def pairs(self, t: int) -> list[tuple[int, float]]:
        """Token t's (expert, gate weight) picks, largest weight first."""
        return sorted(zip(self.experts_TK[t].tolist(), self.weights_TK[t].tolist()), key=lambda p: -p[1])

    @property
    def load_E(self) -> torch.Tensor:
        """fp32 [E] share of the (token, slot) picks that went to each expert (sums to 1)."""
        counts = torch.bincount(self.experts_TK.reshape(-1), minlength=self.n_experts).float()
        return counts / counts.sum().clamp(min=1)


@dataclass
class RouteTrace:
    ids: list[int]
    layers: list[LayerRoutes] = field(default_factory=list)

    @property
    def is_dense(self) -> bool:
        return not self.layers

    def route_of(self, t: int) -> list[tuple[int, list[tuple[int, float]], float]]:
        """Token t's path: (layer, [(expert, weight) by weight, largest first], shared share)."""
        out = []
        for lr in self.layers:
            out.append((lr.layer, lr.pairs(t), float(lr.shared_share_T[t])))
        return out


def _moe_blocks(model) -> list[tuple[int, MoE]]:
    return [(i, layer.ffn) for i, layer in enumerate(model.layers) if isinstance(layer.ffn, MoE)]


@torch.no_grad()
def trace_routes(model, ids: list[int]) -> RouteTrace:
    """One forward of `ids` (a single sequence, positions from 0) with routing recorded."""
    trace = RouteTrace(ids=list(ids))
    blocks = _moe_blocks(model)
    routed: dict[int, tuple] = {}
    shared: dict[int, torch.Tensor] = {}
    hooks = []
    for i, moe in blocks:
        def on_experts(module: GroupedExperts, args, y_TH, i=i):
            _, weights_TK, indices_TK = args[:3]
            routed[i] = (indices_TK.detach().cpu(), weights_TK.detach().float().cpu(), y_TH.detach().float())
        hooks.append(moe.experts.register_forward_hook(on_experts))
        if moe.shared_experts is not None:
            hooks.append(moe.shared_experts.register_forward_hook(
                lambda module, args, y_TH, i=i: shared.__setitem__(i, y_TH.detach().float())))
    try:
        device = model.embed_tokens.weight.device
        model(torch.tensor([ids], device=device))
    finally:
        for h in hooks:
            h.remove()
    for i, moe in blocks:
        indices_TK, weights_TK, y_routed = routed[i]
        if i in shared:
            s, r = shared[i].norm(dim=-1), y_routed.norm(dim=-1)
            share_T = (s / (s + r).clamp(min=1e-30)).cpu()
        else:
            share_T = torch.zeros(indices_TK.shape[0])
        trace.layers.append(LayerRoutes(i, indices_TK, weights_TK, share_T, moe.experts.n_experts))
    return trace
