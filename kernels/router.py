"""DeepSeek-V3 token-choice router in one Triton kernel (forward) plus one for the backward.

From gate logits [T, E] a program takes BLOCK_T tokens x all E experts (E padded to a power of
2, E <= 256 keeps a [BLOCK_T, 256] fp32 tile in registers) and computes, without leaving
registers:
  scores  = softmax or sigmoid of the fp32 logits                      -> scores_TE  (fp32)
  choice  = scores + bias (selection only: aux-loss-free balancing)
  groups  : with N_GROUP > 1, group score = top-2 sum of `choice` in the group; the TOPK_GROUP
            best groups are kept, every other expert's choice becomes -inf
  top-k   : K passes of (row max, lowest index reaching it, mask it out); K argmax passes
            rather than tl.topk because tl.topk wants a power-of-2 k and K is 6 for DeepSeek-V2
  weights = unbiased scores at the chosen experts, renormalised (sum + 1e-20), times
            routed_scaling_factor                                      -> weights_TK (fp32)
  indices                                                              -> indices_TK (int64)
  counts  = tokens per expert: per-program column sums of the chosen mask, atomically added
            into counts_E (integer atomics: exact and order-independent)

Ties in the selection break towards the lower expert index (torch.topk does not promise any
order for ties, so tests compare indices only where the scores are not tied).

Backward (selection is piecewise constant, so no gradient flows through indices or the bias):
  g_j = scores[idx_j], S = sum_j g_j, c = routed_scaling_factor
  renorm:   w_j = c g_j / (S + eps)  =>  dg_j = c (dw_j / (S + eps) - sum_i dw_i g_i / (S + eps)^2)
  no renorm: dg_j = c dw_j
  dscores = dscores_in + scatter(dg at idx)
  sigmoid:  dlogits = dscores * s (1 - s)
  softmax:  dlogits = s (dscores - sum_e dscores_e s_e)

`RouterFunction` is the autograd wrapper; `router_config` picks tiles;
`kernels.reference.route` is the oracle and CPU path.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

MAX_EXPERTS = 256
MAX_TOP_K = 8


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def router_config(E: int, top_k: int, n_group: int = 1, interpret: bool | None = None) -> dict:
    """BLOCK_T tokens per program so a program holds ~2048 (GPU; 16 fp32 per thread per tile at
    4 warps) or ~16384 (interpreter, fewer programs) logits."""
    interpret = _interpreting() if interpret is None else interpret
    block_e = triton.next_power_of_2(E)
    target = 16384 if interpret else 2048
    block_t = max(1, target // block_e)
    return dict(BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k),
                BLOCK_G=triton.next_power_of_2(max(n_group, 1)), num_warps=4)


@triton.jit
def _router_fwd_kernel(logits_ptr, bias_ptr, weights_ptr, indices_ptr, scores_ptr, counts_ptr,
                       T, E, stride_logits, routed_scaling_factor,
                       K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                       GROUP_SIZE: tl.constexpr, SOFTMAX: tl.constexpr, NORM: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr):
    pid = tl.program_id(0)
    rows_T = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok_T = rows_T < T
    rows_T64 = rows_T.to(tl.int64)
    cols_E = tl.arange(0, BLOCK_E)
    col_ok_E = cols_E < E
    mask_TE = row_ok_T[:, None] & col_ok_E[None, :]
    neg_inf = float("-inf")

    logits = tl.load(logits_ptr + rows_T64[:, None] * stride_logits + cols_E[None, :],
                     mask=mask_TE, other=0.0).to(tl.float32)
    if SOFTMAX:
        # padded experts get -inf so exp() gives them 0 mass; padded rows stay finite (0 logits)
        logits = tl.where(col_ok_E[None, :], logits, neg_inf)
        row_max_T = tl.max(logits, axis=1)
        e = tl.exp(logits - row_max_T[:, None])
        scores = e / tl.sum(e, axis=1)[:, None]
    else:
        scores = 1.0 / (1.0 + tl.exp(-logits))
    tl.store(scores_ptr + rows_T64[:, None] * E + cols_E[None, :], scores, mask=mask_TE)

    choice = scores
    if HAS_BIAS:
        bias_E = tl.load(bias_ptr + cols_E, mask=col_ok_E, other=0.0).to(tl.float32)
        choice = choice + bias_E[None, :]
    # NaN scores (a NaN logit) never win: they become -inf, so every row picks K in-range,
    # distinct experts and the EP split sizes agree across ranks (the loss guard sees the NaN)
    choice = tl.where(col_ok_E[None, :] & (choice == choice), choice, neg_inf)

    if N_GROUP > 1:
        group_E = cols_E // GROUP_SIZE
        gcols_G = tl.arange(0, BLOCK_G)
        gscore_TG = tl.full([BLOCK_T, BLOCK_G], neg_inf, tl.float32)
        for g in tl.static_range(N_GROUP):
            in_g = tl.where((group_E == g)[None, :], choice, neg_inf)
            top1_T = tl.max(in_g, axis=1)
            arg1_T = tl.min(tl.where(in_g == top1_T[:, None], cols_E[None, :], BLOCK_E), axis=1)
            # top-2 sum: mask the first maximum by index (not value) so a tied pair counts twice
            top2_T = tl.max(tl.where(cols_E[None, :] == arg1_T[:, None], neg_inf, in_g), axis=1)
            gscore_TG = tl.where(gcols_G[None, :] == g, (top1_T + top2_T)[:, None], gscore_TG)
        keep_TE = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int1)
        for i in tl.static_range(TOPK_GROUP):
            best_T = tl.max(gscore_TG, axis=1)
            gbest_T = tl.min(tl.where(gscore_TG == best_T[:, None], gcols_G[None, :], BLOCK_G),
                             axis=1)
            gscore_TG = tl.where(gcols_G[None, :] == gbest_T[:, None], neg_inf, gscore_TG)
            keep_TE = keep_TE | (group_E[None, :] == gbest_T[:, None])
        choice = tl.where(keep_TE, choice, neg_inf)

    kcols_K = tl.arange(0, BLOCK_K)
    weights_TK = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    indices_TK = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    chosen_TE = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int1)
    for i in tl.static_range(K):
        best_T = tl.max(tl.where(chosen_TE, neg_inf, choice), axis=1)
        # lowest unchosen valid index reaching the max (a row of -inf still picks distinct experts)
        free_TE = (choice == best_T[:, None]) & (chosen_TE == 0) & col_ok_E[None, :]
        arg_T = tl.minimum(tl.min(tl.where(free_TE, cols_E[None, :], BLOCK_E), axis=1), E - 1)
        sel_TE = cols_E[None, :] == arg_T[:, None]
        w_T = tl.sum(tl.where(sel_TE, scores, 0.0), axis=1)      # unbiased score of the pick
        weights_TK = tl.where(kcols_K[None, :] == i, w_T[:, None], weights_TK)
        indices_TK = tl.where(kcols_K[None, :] == i, arg_T[:, None], indices_TK)
        choice = tl.where(sel_TE, neg_inf, choice)
        chosen_TE = chosen_TE | sel_TE

    if NORM:
        weights_TK = weights_TK / (tl.sum(weights_TK, axis=1)[:, None] + 1e-20)
    weights_TK = weights_TK * routed_scaling_factor
    mask_TK = row_ok_T[:, None] & (kcols_K < K)[None, :]
    out_TK = rows_T64[:, None] * K + kcols_K[None, :]
    tl.store(weights_ptr + out_TK, weights_TK, mask=mask_TK)
    tl.store(indices_ptr + out_TK, indices_TK.to(tl.int64), mask=mask_TK)

    counts_E = tl.sum((chosen_TE & row_ok_T[:, None]).to(tl.int32), axis=0)
    tl.atomic_add(counts_ptr + cols_E, counts_E, mask=col_ok_E)


@triton.jit
def _router_bwd_kernel(scores_ptr, indices_ptr, dweights_ptr, dscores_ptr, dlogits_ptr,
                       T, E, stride_dscores, stride_dlogits, routed_scaling_factor,
                       K: tl.constexpr, SOFTMAX: tl.constexpr, NORM: tl.constexpr,
                       HAS_DSCORES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    rows_T = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok_T = rows_T < T
    rows_T64 = rows_T.to(tl.int64)
    cols_E = tl.arange(0, BLOCK_E)
    col_ok_E = cols_E < E
    mask_TE = row_ok_T[:, None] & col_ok_E[None, :]

    scores = tl.load(scores_ptr + rows_T64[:, None] * E + cols_E[None, :], mask=mask_TE,
                     other=0.0)
    if HAS_DSCORES:
        dscores = tl.load(dscores_ptr + rows_T64[:, None] * stride_dscores + cols_E[None, :],
                          mask=mask_TE, other=0.0).to(tl.float32)
    else:
        dscores = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)

    if NORM:
        # S = sum_j g_j and sum_j dw_j g_j, with g_j the score gathered at idx_j
        sum_g_T = tl.zeros([BLOCK_T], dtype=tl.float32)
        dot_T = tl.zeros([BLOCK_T], dtype=tl.float32)
        for j in tl.static_range(K):
            idx_T = tl.load(indices_ptr + rows_T64 * K + j, mask=row_ok_T, other=-1)
            dw_T = tl.load(dweights_ptr + rows_T64 * K + j, mask=row_ok_T, other=0.0)
            g_T = tl.sum(tl.where(cols_E[None, :] == idx_T[:, None], scores, 0.0), axis=1)
            sum_g_T += g_T
            dot_T += dw_T * g_T
        inv_T = 1.0 / (sum_g_T + 1e-20)
    for j in tl.static_range(K):
        idx_T = tl.load(indices_ptr + rows_T64 * K + j, mask=row_ok_T, other=-1)
        dw_T = tl.load(dweights_ptr + rows_T64 * K + j, mask=row_ok_T, other=0.0)
        if NORM:
            dg_T = routed_scaling_factor * (dw_T * inv_T - dot_T * inv_T * inv_T)
        else:
            dg_T = routed_scaling_factor * dw_T
        dscores += tl.where(cols_E[None, :] == idx_T[:, None], dg_T[:, None], 0.0)

    if SOFTMAX:
        dlogits = scores * (dscores - tl.sum(dscores * scores, axis=1)[:, None])
    else:
        dlogits = dscores * scores * (1.0 - scores)
    tl.store(dlogits_ptr + rows_T64[:, None] * stride_dlogits + cols_E[None, :],
             dlogits.to(dlogits_ptr.dtype.element_ty), mask=mask_TE)


def check_route_args(E: int, top_k: int, score_func: str, n_group: int, topk_group: int) -> None:
    if score_func not in ("softmax", "sigmoid"):
        raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
    if not 1 <= top_k <= min(E, MAX_TOP_K):
        raise ValueError(f"router kernel: top_k must be in [1, min(E, {MAX_TOP_K})], got {top_k}")
    if E > MAX_EXPERTS:
        raise ValueError(f"router kernel: E must be <= {MAX_EXPERTS}, got {E}")
    if n_group > 1:
        if E % n_group or E // n_group < 2:
            raise ValueError(f"router: n_group={n_group} must divide E={E} into groups of >= 2")
        if not 1 <= topk_group <= n_group or top_k > topk_group * (E // n_group):
            raise ValueError(f"router: topk_group={topk_group} groups of {E // n_group} experts "
                             f"cannot supply top_k={top_k} picks")


def router_fwd(logits_TE: torch.Tensor, bias_E: Optional[torch.Tensor], top_k: int,
               score_func: str, n_group: int, topk_group: int, norm_topk_prob: bool,
               routed_scaling_factor: float):
    T, E = logits_TE.shape
    dev = logits_TE.device
    cfg = router_config(E, top_k, n_group)
    weights_TK = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    indices_TK = torch.empty(T, top_k, dtype=torch.int64, device=dev)
    scores_TE = torch.empty(T, E, dtype=torch.float32, device=dev)
    counts_E = torch.zeros(E, dtype=torch.int32, device=dev)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]),)
    bias_arg = bias_E.contiguous() if bias_E is not None else scores_TE  # dummy pointer if unused
    _router_fwd_kernel[grid](
        logits_TE, bias_arg, weights_TK, indices_TK, scores_TE, counts_E,
        T, E, logits_TE.stride(0), float(routed_scaling_factor),
        K=top_k, N_GROUP=max(n_group, 1), TOPK_GROUP=topk_group if n_group > 1 else 1,
        GROUP_SIZE=E // max(n_group, 1), SOFTMAX=score_func == "softmax", NORM=norm_topk_prob,
        HAS_BIAS=bias_E is not None, BLOCK_T=cfg["BLOCK_T"], BLOCK_E=cfg["BLOCK_E"],
        BLOCK_K=cfg["BLOCK_K"], BLOCK_G=cfg["BLOCK_G"], num_warps=cfg["num_warps"])
    return weights_TK, indices_TK, scores_TE, counts_E


def router_bwd(dweights_TK, dscores_TE, scores_TE, indices_TK, logits_dtype, score_func,
               norm_topk_prob, routed_scaling_factor):
    T, E = scores_TE.shape
    K = indices_TK.shape[1]
    cfg = router_config(E, K)
    dlogits_TE = torch.empty(T, E, dtype=logits_dtype, device=scores_TE.device)
    if dweights_TK is None:
        dweights_TK = torch.zeros(T, K, dtype=torch.float32, device=scores_TE.device)
    dweights_TK = dweights_TK.float().contiguous()
    if dscores_TE is not None and dscores_TE.stride(-1) != 1:
        dscores_TE = dscores_TE.contiguous()
    grid = (triton.cdiv(T, cfg["BLOCK_T"]),)
    _router_bwd_kernel[grid](
        scores_TE, indices_TK, dweights_TK, dscores_TE if dscores_TE is not None else scores_TE,
        dlogits_TE, T, E, dscores_TE.stride(0) if dscores_TE is not None else 0,
        dlogits_TE.stride(0), float(routed_scaling_factor),
        K=K, SOFTMAX=score_func == "softmax", NORM=norm_topk_prob,
        HAS_DSCORES=dscores_TE is not None, BLOCK_T=cfg["BLOCK_T"], BLOCK_E=cfg["BLOCK_E"],
        num_warps=cfg["num_warps"])
    return dlogits_TE


class RouterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, bias_E, top_k, score_func, n_group, topk_group, norm_topk_prob,
                routed_scaling_factor):
        if logits_TE.stride(-1) != 1:
            logits_TE = logits_TE.contiguous()
        weights_TK, indices_TK, scores_TE, counts_E = router_fwd(
            logits_TE, bias_E, top_k, score_func, n_group, topk_group, norm_topk_prob,
            routed_scaling_factor)
        ctx.save_for_backward(scores_TE, indices_TK)
        ctx.cfg = (logits_TE.dtype, score_func, norm_topk_prob, routed_scaling_factor)
        ctx.mark_non_differentiable(indices_TK, counts_E)
        ctx.set_materialize_grads(False)  # an unused output (often scores) costs no zeros tensor
        return weights_TK, indices_TK, scores_TE, counts_E

    @staticmethod
    def backward(ctx, dweights_TK, _dindices, dscores_TE, _dcounts):
        scores_TE, indices_TK = ctx.saved_tensors
        if dweights_TK is None and dscores_TE is None:
            return (None,) * 8
        dlogits_TE = router_bwd(dweights_TK, dscores_TE, scores_TE, indices_TK, *ctx.cfg)
        return dlogits_TE, None, None, None, None, None, None, None


def route(logits_TE: torch.Tensor, bias_E: Optional[torch.Tensor], top_k: int, score_func: str,
          n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
          routed_scaling_factor: float = 1.0):
    """Triton routing; same contract as kernels.reference.route."""
    T, E = logits_TE.shape
    check_route_args(E, top_k, score_func, n_group, topk_group)
    return RouterFunction.apply(logits_TE, bias_E, top_k, score_func, n_group, topk_group,
                                norm_topk_prob, routed_scaling_factor)
