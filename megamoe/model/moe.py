"""DeepSeek-V3 MoE: router, grouped routed experts, shared experts.

Routing is dropless token-choice top-k (kernels.route). Routed experts keep their weights as
fused 3-D tensors (`gate_up_proj` [E, 2I, H], gate rows first; `down_proj` [E, H, I]) — the
layout of transformers' DeepseekV3Experts and of DeepSpeed AutoEP, so expert parallelism can
shard them without a repack. Tokens are sorted by expert and each expert runs one matmul over
its contiguous slice (`torch._grouped_mm`, or a loop where that is unavailable).

The balance loss and z-loss do not travel through return values: the router attaches their
gradient to its output weights (Megatron's MoEAuxLossAutoScaler), so they reach the router
weights through activation checkpointing and through DeepSpeed's expert-parallel layer alike,
and `loss.backward()` on the LM loss alone trains the router correctly. Their detached values
and the tokens-per-expert counts are kept on the router for logging and bias updates.

Shapes: T tokens (B*S), H hidden, E routed experts, K top-k, I expert intermediate size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megamoe import faults, kernels
from megamoe.config import ModelConfig
from megamoe.model import dispatch
from megamoe.model.layers import MLP


SPECIALISATION_BUCKETS = 256   # token ids hashed (id mod 256) for the specialisation metric


class AuxLossScaler(torch.autograd.Function):
    """Identity on `x`; in backward, gives `aux_loss` the gradient `scale` (d total / d aux).

    `scale` is set by the trainer: DeepSpeed divides the LM loss by the gradient accumulation
    steps inside engine.backward, so the aux losses must be scaled the same way.
    """
    scale: float = 1.0

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_x, torch.full_like(aux_loss, AuxLossScaler.scale)


def set_aux_loss_scale(scale: float) -> None:
    AuxLossScaler.scale = float(scale)


def sequence_balance_loss(scores_TE: torch.Tensor, indices_TK: torch.Tensor, n_experts: int,
                          seq_len: Optional[int]) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss (eqs. 17-20), before the alpha coefficient.

    Per sequence: f_i = E / (K * S) * #tokens routed to i, P_i = mean_t s'_{i,t} with scores
    normalised over experts; loss = sum_i f_i P_i, averaged over sequences. Equals 1 when balanced.
    """
    T, K = indices_TK.shape
    S = seq_len if seq_len and T % seq_len == 0 else T
    B = T // S
    probs_BSE = (scores_TE / scores_TE.sum(-1, keepdim=True)).view(B, S, n_experts)
    with torch.no_grad():
        counts_BE = torch.zeros(B, n_experts, device=scores_TE.device, dtype=scores_TE.dtype)
        counts_BE.scatter_add_(1, indices_TK.view(B, S * K), torch.ones(B, S * K, device=scores_TE.device,
                                                                          dtype=scores_TE.dtype))
        f_BE = counts_BE * (n_experts / (K * S))
    return (f_BE * probs_BSE.mean(1)).sum(-1).mean()


def capacity_keep_mask(scores_TK: torch.Tensor, indices_TK: torch.Tensor, n_experts: int,
                       capacity: int) -> torch.Tensor:
    """[T, K] bool: per expert, its `capacity` assignments with the highest scores are kept."""
    flat_e, flat_s = indices_TK.reshape(-1), scores_TK.detach().reshape(-1)
    by_score = flat_s.argsort(descending=True, stable=True)
    order = by_score[flat_e[by_score].argsort(stable=True)]  # grouped by expert, best first
    counts_E = torch.bincount(flat_e, minlength=n_experts)
    starts_E = counts_E.cumsum(0) - counts_E
    rank_in_expert = torch.arange(flat_e.numel(), device=flat_e.device) - starts_E[flat_e[order]]
    kept = torch.empty_like(flat_e, dtype=torch.bool)
    kept[order] = rank_in_expert < capacity
    return kept.view_as(indices_TK)


class RouterLogits(torch.autograd.Function):
    """fp32 router logits, F.linear(x.float(), w.float()), keeping x and w as they came (bf16
    under DeepSpeed's bf16) and upcasting them again in backward: autograd through `.float()`
    would keep an fp32 copy of x, 4 bytes per token and hidden unit in every MoE layer (8 KB a
    token at V2-Lite, 7-9% of what its MoE layer saves). Backward makes autograd's two
    matmuls, in its layouts, so the gradients are its own to the bit."""

    @staticmethod
    def forward(ctx, x_TH: torch.Tensor, w_EH: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_TH, w_EH)
        return F.linear(x_TH.float(), w_EH.float())

    @staticmethod
    def backward(ctx, g_TE: torch.Tensor):
        x_TH, w_EH = ctx.saved_tensors
        dx = (g_TE @ w_EH.float()).to(x_TH.dtype) if ctx.needs_input_grad[0] else None
        dw = (x_TH.float().t() @ g_TE).t().to(w_EH.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


@dataclass
class Routing:
    weights_TK: torch.Tensor          # fp32; zero where capacity dropped the assignment
    indices_TK: torch.Tensor          # int64 expert ids
    counts_E: torch.Tensor            # int32 assignments per expert (before capacity dropping)
    kept_TK: Optional[torch.Tensor]   # bool, None when dropless


def _recomputing() -> bool:
    """True inside backward, i.e. when activation checkpointing re-runs this forward: routing is
    recomputed identically but must not be counted twice."""
    return torch._C._current_graph_task_id() != -1


class Router(nn.Module):
    """Scores experts for each token and picks the top-k.

    Contract shared with DeepSpeed AutoEP's router: forward(x [T, H], expert_bias=None) ->
    (weights [T, K] fp32, indices [T, K] int64, tokens_per_expert [E] int32).
    `e_score_correction_bias` [E] (fp32, saved in checkpoints) steers selection only; the trainer
    updates it from `tokens_per_expert_acc` once per optimizer step (aux-loss-free balancing).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.score_func, self.n_group, self.topk_group = cfg.scoring_func, cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.aux_loss_alpha, self.z_loss_coef = cfg.aux_loss_alpha, cfg.router_z_loss_coef
        self.jitter, self.capacity_factor = cfg.router_jitter_noise, cfg.capacity_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        # Routed-token counts since the trainer last read them (for the bias update and monitoring).
        self.register_buffer("tokens_per_expert_acc", torch.zeros(cfg.n_routed_experts, dtype=torch.float32),
                             persistent=False)
        # [(token, slot) picks the selection bias changed, picks] since the trainer last read them;
        # counted only when the bias can move (bias_update_rate > 0): it costs a second top-k
        self.register_buffer("rerouted_acc", torch.zeros(2, dtype=torch.float32), persistent=False)
        self.track_rerouting = cfg.bias_update_rate > 0
        self.seq_len: Optional[int] = None  # set by the Block so the balance loss is per sequence
        # token ids of the forward (set by the Transformer for its main layers): which experts each
        # token-id bucket goes to, counted over training forwards for the specialisation metric
        self.token_ids: Optional[torch.Tensor] = None
        self.register_buffer("bucket_expert_acc", torch.zeros(SPECIALISATION_BUCKETS, cfg.n_routed_experts),
                             persistent=False)
        self._reset_last()

    def _reset_last(self, device=None) -> None:
        self.last_aux_loss = torch.zeros((), device=device)
        self.last_z_loss = torch.zeros((), device=device)
        self.last_tokens_per_expert = torch.zeros(self.n_experts, dtype=torch.int32, device=device)
        self.last_dropped_fraction = torch.zeros((), device=device)

    def reset_buffers(self, device) -> None:
        """Zero bias and counters on `device` (after a build on the meta device)."""
        for name, buf in self._buffers.items():
            self._buffers[name] = torch.zeros(buf.shape, dtype=torch.float32, device=device)
        self._reset_last(device)

    def _apply(self, fn, recurse=True):
        # The bias must stay fp32 under model.half()/bf16 engines: it is compared against scores.
        super()._apply(fn, recurse)
        if self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias.data = self.e_score_correction_bias.data.float()
        for name in ("tokens_per_expert_acc", "rerouted_acc", "bucket_expert_acc"):
            buf = getattr(self, name)
            if buf.dtype != torch.float32:
                buf.data = buf.data.float()
        return self

    def forward(self, x_TH: torch.Tensor, expert_bias: Optional[torch.Tensor] = None):
        """AutoEP's contract. Capacity-dropped assignments come back with weight 0: the expert-
        parallel layer still dispatches them, which costs compute but gives the same output."""
        r = self.route(x_TH, expert_bias)
        return r.weights_TK, r.indices_TK, r.counts_E

    def route(self, x_TH: torch.Tensor, expert_bias: Optional[torch.Tensor] = None) -> Routing:
        jitter = self.training and self.jitter > 0
        if x_TH.dtype in (torch.bfloat16, torch.float16) and not jitter \
                and not torch.is_autocast_enabled(x_TH.device.type):
            logits_TE = RouterLogits.apply(x_TH, self.weight)
        else:   # fp32 x needs no copy; jitter makes its own; autocast runs F.linear in its dtype
            x = x_TH.float()
            if jitter:
                x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            logits_TE = F.linear(x, self.weight.float())
        if faults.nan_router_logits():
            logits_TE = torch.cat([torch.full_like(logits_TE[:1], float("nan")), logits_TE[1:]])
        bias_E = self.e_score_correction_bias if expert_bias is None else self.e_score_correction_bias + expert_bias
        weights_TK, indices_TK, scores_TE, counts_E = self._top_k(logits_TE, bias_E)
        self.last_tokens_per_expert = counts_E.detach()
        if self.training and torch.is_grad_enabled():
            if not _recomputing():
                self.tokens_per_expert_acc += counts_E.detach().float()
                if self.track_rerouting:
                    self._count_rerouted(logits_TE.detach(), indices_TK)
                if self.token_ids is not None and self.token_ids.numel() == indices_TK.shape[0]:
                    self._count_buckets(indices_TK)
            aux = torch.zeros((), device=logits_TE.device)
            if self.aux_loss_alpha > 0:
                bal = sequence_balance_loss(scores_TE, indices_TK, self.n_experts, self.seq_len)
                aux = aux + self.aux_loss_alpha * bal
                self.last_aux_loss = (self.aux_loss_alpha * bal).detach()
            if self.z_loss_coef > 0:
                z = self.z_loss_coef * torch.logsumexp(logits_TE, dim=-1).square().mean()
                aux = aux + z
                self.last_z_loss = z.detach()
            if aux.requires_grad:
                weights_TK = AuxLossScaler.apply(weights_TK, aux)
        kept_TK = None
        if self.capacity_factor is not None:
            T, K = indices_TK.shape
            capacity = math.ceil(self.capacity_factor * T * K / self.n_experts)
            kept_TK = capacity_keep_mask(scores_TE.gather(1, indices_TK), indices_TK, self.n_experts, capacity)
            weights_TK = weights_TK * kept_TK
            self.last_dropped_fraction = 1.0 - kept_TK.float().mean().detach()
        return Routing(weights_TK, indices_TK, counts_E, kept_TK)

    def _top_k(self, logits_TE: torch.Tensor, bias_E: Optional[torch.Tensor]):
        """kernels.route with this router's settings: (weights, indices, scores, counts)."""
        return kernels.route(logits_TE, bias_E, self.top_k, self.score_func, self.n_group, self.topk_group,
                             self.norm_topk_prob, self.routed_scaling_factor)

    @torch.no_grad()
    def _count_rerouted(self, logits_TE: torch.Tensor, indices_TK: torch.Tensor) -> None:
        """How many (token, slot) picks the selection bias changed: top-k without it vs with it."""
        plain_TK = self._top_k(logits_TE, None)[1]
        ones = torch.ones(indices_TK.shape, dtype=torch.float32, device=indices_TK.device)
        picked_TE = torch.zeros(logits_TE.shape, device=logits_TE.device).scatter_(1, indices_TK, ones)
        both = picked_TE.gather(1, plain_TK).sum()
        self.rerouted_acc += torch.stack([indices_TK.numel() - both, ones.sum()])

    @torch.no_grad()
    def _count_buckets(self, indices_TK: torch.Tensor) -> None:
        T, K = indices_TK.shape
        bucket_TK = (self.token_ids.reshape(T, 1) % SPECIALISATION_BUCKETS).expand(T, K)
        flat = bucket_TK.reshape(-1) * self.n_experts + indices_TK.reshape(-1)
        # index_put_ with accumulate has a deterministic implementation under --deterministic
        self.bucket_expert_acc.view(-1).index_put_((flat,), torch.ones(flat.shape, device=flat.device), accumulate=True)


class GroupedExperts(nn.Module):
    """E SwiGLU experts as fused 3-D weights; dropless, computed per expert on sorted tokens."""

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.n_experts = n_experts
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))

    def forward(self, x_TH: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor,
                kept_TK: Optional[torch.Tensor] = None, counts_E: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Each (token, slot) pair runs through its expert; pairs with kept_TK False are skipped.
        `counts_E`: the router's per-expert counts of `indices_TK` (dropless), reused as they are."""
        T, K = indices_TK.shape
        # torch._grouped_mm is on no autocast list: under bf16 autocast the experts, most of an MoE
        # model's FLOPs, would run in fp32. Without autocast (DeepSpeed's bf16) nothing changes.
        x_in, gate_up_E2IH, down_EHI = kernels.autocast_operands(x_TH, self.gate_up_proj, self.down_proj)
        flat_expert = indices_TK.reshape(-1)
        order = flat_expert.argsort(stable=True)       # (token, slot) pairs grouped by expert
        if kept_TK is not None:
            order = order[kept_TK.reshape(-1)[order]]   # a host sync on GPUs: capacity dropping only
            flat_expert = torch.where(kept_TK.reshape(-1), flat_expert, self.n_experts)  # out of range: not counted
            counts_E = None
        if counts_E is None:
            # scatter_add, not bincount: bincount reads the maximum back to the host on CUDA
            counts_E = torch.zeros(self.n_experts + 1, dtype=torch.int64, device=flat_expert.device).scatter_add_(
                0, flat_expert, torch.ones_like(flat_expert))[:self.n_experts]
        offs_E = counts_E.cumsum(0).to(torch.int32)
        if kept_TK is None:   # dropless: `order` is a permutation, both ways are row gathers
            inverse = dispatch.inverse_permutation(order)
            y_sorted = dispatch.RoutedExperts.apply(x_in, gate_up_E2IH, down_EHI, order, inverse, K, counts_E, offs_E)
            return dispatch.Combine.apply(y_sorted, weights_TK, order, inverse).to(x_TH.dtype)
        _, y_sorted = dispatch.swiglu_experts(x_in[order // K], gate_up_E2IH, down_EHI, counts_E, offs_E)
        return combine(y_sorted, order, weights_TK, x_TH.dtype)


def combine(y_sorted: torch.Tensor, order: torch.Tensor, weights_TK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The capacity-dropping path's combine (the dropless one is dispatch.Combine): [T, H] = sum
    over the K slots of weight x expert output, as DeepSpeed AutoEP combines. Each kept (token,
    slot) output goes back to its own row (`order` lists the kept pairs; dropped rows stay 0),
    then the weighted sum over K runs in fp32 in slot order: no atomics, no bf16 accumulation."""
    T, K = weights_TK.shape
    y_NH = y_sorted.new_zeros(T * K, y_sorted.shape[-1])
    y_NH[order] = y_sorted
    return (y_NH.view(T, K, -1) * weights_TK.unsqueeze(-1).float()).sum(dim=1).to(dtype)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts > 0 else None)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        B, S, H = x_BSH.shape
        x_TH = x_BSH.reshape(B * S, H)
        r = self.router.route(x_TH)
        y_TH = self.experts(x_TH, r.weights_TK, r.indices_TK, r.kept_TK, r.counts_E)
        if self.shared_experts is not None:
            y_TH = y_TH + self.shared_experts(x_TH)
        return y_TH.view(B, S, H)
