"""Pure-PyTorch reference ops: the CPU path and the test oracle for the Triton kernels.

Each function here has exactly the signature of its dispatched twin in `kernels/__init__.py`.
They compute in fp32 (or the input's dtype if wider) and return the input dtype, like the kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last dim; statistics in fp32."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(acc)).to(x.dtype)


def apply_rope(x_BSND: torch.Tensor, cos_BSR: torch.Tensor, sin_BSR: torch.Tensor,
               interleaved: bool = True) -> torch.Tensor:
    """Rotate x [B, S, N, D] by per-position angles; cos/sin are [B or 1, S, D/2].

    interleaved=True rotates DeepSeek's adjacent pairs (x[2i], x[2i+1]) and keeps that layout;
    interleaved=False rotates (x[i], x[i + D/2]) (the "rotate_half" layout of Llama/HF).
    """
    acc = torch.promote_types(x_BSND.dtype, torch.float32)
    x = x_BSND.to(acc)
    cos = cos_BSR.to(acc).unsqueeze(2)  # [B, S, 1, D/2]
    sin = sin_BSR.to(acc).unsqueeze(2)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = x.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x_BSND.dtype)


def top_k_ties_to_lower(choice_TE: torch.Tensor, k: int) -> torch.Tensor:
    """[T, k] int64: the k largest per row in descending order, ties to the lower index: the first k
    of a stable descending sort (the kernel's order; torch.topk leaves ties unspecified, and an
    all-NaN row is all ties). For fp32 the same picks come from one topk over keys made unique:
    the float's order-preserving int32 bits above the reversed index (three times faster than the
    sort on CPU). NaN must already be masked."""
    if choice_TE.dtype != torch.float32:
        return choice_TE.sort(dim=-1, descending=True, stable=True).indices[:, :k].contiguous()
    bits = (choice_TE + 0.0).view(torch.int32).long()           # + 0.0: -0.0 ties with 0.0, as in sort
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)       # negative floats: larger bits = smaller
    E = choice_TE.shape[-1]
    reversed_id = torch.arange(E - 1, -1, -1, device=choice_TE.device)
    return ((bits << 32) | reversed_id).topk(k, dim=-1).indices


def route(logits_TE: torch.Tensor, bias_E: Optional[torch.Tensor], top_k: int, score_func: str,
          n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
          routed_scaling_factor: float = 1.0):
    """Token-choice top-k routing, DeepSeek-V3 semantics.

    Returns (weights_TK fp32, indices_TK int64, scores_TE fp32, counts_E int32):
      scores   = softmax or sigmoid of the fp32 logits
      choice   = scores + bias (the bias steers selection only: aux-loss-free balancing)
      groups   : with n_group > 1, keep the topk_group groups with the largest top-2 sum of
                 `choice`, mask the rest to -inf
      indices  = top-k of choice;  weights = scores at indices (unbiased), optionally
                 renormalised to sum 1 (+1e-20, as DeepSeek/HF), times routed_scaling_factor
      counts   = tokens routed to each expert
    Gradients flow to logits through weights and scores.
    Scores and weights are fp32 for fp32/bf16/fp16 logits; float64 logits stay float64 (the
    module's "input dtype if wider" rule), which makes this the float64 oracle for the kernel.
    """
    T, E = logits_TE.shape
    logits = logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32))
    if score_func == "sigmoid":
        scores = torch.sigmoid(logits)
    elif score_func == "softmax":
        scores = F.softmax(logits, dim=-1)
    else:
        raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
    with torch.no_grad():
        choice = scores if bias_E is None else scores + bias_E.to(scores.dtype)
        # a NaN score never wins (torch.topk ranks NaN highest): -inf, as in the kernel
        choice = choice.masked_fill(choice.isnan(), float("-inf"))
        if n_group > 1:
            grouped = choice.view(T, n_group, E // n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)          # [T, G]
            group_idx = group_scores.topk(topk_group, dim=-1, sorted=False).indices
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, False)
            choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).view(T, E)
        indices = top_k_ties_to_lower(choice, top_k)
    weights = scores.gather(1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * routed_scaling_factor
    counts = torch.zeros(E, dtype=torch.int32, device=logits.device)
    counts.scatter_add_(0, indices.reshape(-1), torch.ones(indices.numel(), dtype=torch.int32, device=logits.device))
    return weights, indices, scores, counts


def attention(q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHE: torch.Tensor, scale: float,
              causal: bool = True, mask_BSS: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain softmax attention in fp32 (eager): the oracle for the fused backends. [B, S, H, E] out.
    `mask_BSS` (bool, True = attend) replaces the causal mask, e.g. causal within documents."""
    q, k, v = (t.transpose(1, 2).float() for t in (q_BSHD, k_BSHD, v_BSHE))
    scores = q @ k.transpose(-1, -2) * scale
    if mask_BSS is not None:
        scores = scores.masked_fill(~mask_BSS[:, None], float("-inf"))
    elif causal:
        Sq, Sk = scores.shape[-2:]
        mask = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(Sk - Sq)
        scores = scores.masked_fill(~mask, float("-inf"))
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).to(q_BSHD.dtype)


def _expert_rows(counts_E: torch.Tensor, rows: int) -> list[int]:
    """Row counts per expert, then the rows past the last expert's (DeepSpeed AutoEP pads its
    expert-ordered input to an aligned length; those rows belong to no expert)."""
    counts = counts_E.tolist()
    return [*counts, rows - sum(counts)]


def grouped_mm(x_TK: torch.Tensor, w_ENK: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """y[t] = x[t] @ w[e].T for the tokens t of expert e (tokens sorted by expert): one matmul
    per expert. [T, N] out; rows past the last expert's are zeros."""
    *chunks, rest = x_TK.split(_expert_rows(counts_E, x_TK.shape[0]))
    out = [chunk @ w_ENK[e].T for e, chunk in enumerate(chunks)]
    return torch.cat([*out, rest.new_zeros(rest.shape[0], w_ENK.shape[1], dtype=out[0].dtype)], dim=0)


def grouped_mm_wgrad(dy_TN: torch.Tensor, x_TK: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """The weight gradient of grouped_mm, one matmul per expert: [E, N, K]."""
    split = _expert_rows(counts_E, x_TK.shape[0])
    return torch.stack([dy.T @ x for dy, x in zip(dy_TN.split(split)[:-1], x_TK.split(split)[:-1])])


# A chunk's fp32 logits on CPUs: 8 MiB (256 tokens at the demo's vocabulary) stays in cache and
# below glibc's mmap threshold (32 MiB at most), so the chunk's temporaries reuse heap memory; one
# [1024, 8192] fp32 chunk was a fresh mapping every step, page faults included (13 ms per copy).
# Only where that holds 256 tokens or more (vocabularies up to 8,192): each chunk reads the whole
# [V, H] head again, and at 129,280 (256 MiB chunks of 519 tokens, as on GPUs) 256-token chunks
# were 15-20% slower (one thread, fp32, 4,096 tokens, H 256).
LM_CHUNK_BYTES_CPU, LM_CHUNK_MIN_TOKENS_CPU = 1 << 23, 256


def lm_chunk_tokens(vocab: int, budget_bytes: int = 1 << 28) -> int:
    """Tokens per chunk of the fused LM head + loss: a chunk's fp32 logits stay under the budget."""
    return max(16, budget_bytes // (4 * max(vocab, 1)))


def device_lm_chunk(vocab: int, device_type: str) -> int:
    """The default chunk: 256 MiB of fp32 logits (only to bound memory), or on CPUs 8 MiB where
    that still holds LM_CHUNK_MIN_TOKENS_CPU tokens."""
    small = lm_chunk_tokens(vocab, LM_CHUNK_BYTES_CPU)
    return small if device_type == "cpu" and small >= LM_CHUNK_MIN_TOKENS_CPU else lm_chunk_tokens(vocab)


def _chunk_ce_torch(logits_CV: torch.Tensor, labels_C: torch.Tensor, n_valid: torch.Tensor, ignore_index: int,
                    want_grad: bool):
    """One chunk's (sum of losses, d(mean loss)/d(logits) in the logits' dtype or None): the
    PyTorch path, oracle of kernels/cross_entropy.py. Softmax in fp32 from the stored logits."""
    y_C, v_C = labels_C.clamp(min=0), labels_C != ignore_index
    x_CV = logits_CV.float()        # the chunk's logits are a temporary: worked on in place
    x_y_C = x_CV.gather(1, y_C[:, None])[:, 0]
    # logsumexp by hand, so the one exp pass also gives the softmax (logsumexp would allocate
    # x - max and exp it again, a [C, V] fp32 temporary and pass per chunk)
    max_C1 = x_CV.amax(-1, keepdim=True)
    sum_C = x_CV.sub_(max_C1).exp_().sum(-1)
    loss = ((sum_C.log() + max_C1[:, 0] - x_y_C) * v_C).sum()
    if not want_grad:
        return loss, None
    g_CV = x_CV.div_(sum_C[:, None])                               # softmax, in place
    g_CV.scatter_add_(1, y_C[:, None], torch.full_like(g_CV[:, :1], -1.0))
    g_CV.mul_((v_C.to(torch.float32) / n_valid)[:, None])
    return loss, g_CV.to(logits_CV.dtype)


def autocast_operands(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in autocast's dtype when autocast is on, as its matmuls would cast them (every
    floating tensor but float64), else as they are: for ops autocast does not cover, or covers
    with a cast at every call."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)


class _LinearCrossEntropy(torch.autograd.Function):
    """mean over labelled tokens of cross_entropy((h @ w.T).float(), labels), chunk by chunk.

    Forward computes the loss and, when gradients are wanted, the gradients too (Liger's fused
    linear cross-entropy): per chunk of tokens the logits live only until that chunk's
    softmax - onehot has gone through both matmuls. Backward scales the saved gradients. The
    numbers are the unfused path's: logits in h's dtype, softmax in fp32, d(logits) rounded to h's
    dtype for the matmuls; d(w) accumulates in fp32 across chunks and is kept in w's dtype (like
    d(h); both are scaled by the upstream gradient in backward, one more rounding). `chunk_ce`
    does one chunk's loss and gradient (_chunk_ce_torch, or the Triton kernel on GPUs);
    `accumulate` adds a chunk's d(w) to the fp32 sum (accumulate_mm, or on GPUs a matmul that
    accumulates into the sum itself: kernels.fp32_accumulating_mm)."""

    @staticmethod
    def forward(ctx, h_TH, w_VH, labels_T, ignore_index: int, chunk: int, chunk_ce, accumulate):
        n_valid = (labels_T != ignore_index).sum().to(torch.float32)   # stays on the device
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h_TH) if want_h else None
        grad_w = None
        total = torch.zeros((), dtype=torch.float32, device=h_TH.device)
        # under autocast each chunk's `h @ w.T` would cast the fp32 weight again (autocast caches
        # no cast of a view: 4 MB per chunk at the demo's head), and each chunk of h twice
        h_mm, w_mm = autocast_operands(h_TH, w_VH)
        for s in range(0, h_TH.shape[0], chunk):
            h_CH = h_mm[s:s + chunk]
            loss, g_CV = chunk_ce(h_CH @ w_mm.T, labels_T[s:s + chunk], n_valid, ignore_index, want_h or want_w)
            total += loss
            if want_h:
                grad_h[s:s + chunk] = g_CV @ w_mm
            if want_w:
                grad_w = accumulate(grad_w, g_CV.T, h_CH)
        if grad_w is not None:
            # held until backward in w's dtype, rounded once here as grad_h is: the fp32 sum would
            # hold 3.7 GB per head call at DeepSeek-V3's head through the whole backward, bf16 half
            grad_w = grad_w.to(w_VH.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        # The saved gradients are this Function's own buffers: scaled in place (mul_ keeps their
        # dtype, multiplying by the fp32 scale before rounding once), so the [V, H] weight gradient
        # is not held twice (1.85 GB each at DeepSeek-V3's head in bf16). A second backward through
        # a retained graph is then refused by autograd's version check, not mis-scaled.
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h.mul_(grad_loss) if grad_h is not None else None
        dw = grad_w.mul_(grad_loss) if grad_w is not None else None
        return dh, dw, None, None, None, None, None


def accumulate_mm(acc_VH: Optional[torch.Tensor], a_VC: torch.Tensor, b_CH: torch.Tensor) -> torch.Tensor:
    """acc + a @ b in fp32 (float64 stays float64); acc None starts the sum, with no zero-filled
    [V, H] to add to. In fp32 the matmul adds into the sum itself (addmm_, beta 1: no [V, H]
    product per chunk). A 16-bit product is added as it is (add_ upcasts exactly): on GPUs add_
    casts inside its kernel, so there is no fp32 copy of it (3.7 GB per chunk at DeepSeek-V3's
    head); on CPUs TensorIterator still makes one, as `.float()` did."""
    if a_VC.dtype in (torch.float32, torch.float64):
        return a_VC @ b_CH if acc_VH is None else acc_VH.addmm_(a_VC, b_CH)
    ab_VH = a_VC @ b_CH
    return ab_VH.float() if acc_VH is None else acc_VH.add_(ab_VH)


def linear_cross_entropy(h_TH: torch.Tensor, w_VH: torch.Tensor, labels_T: torch.Tensor,
                         ignore_index: int = -100, chunk: Optional[int] = None, chunk_ce=None,
                         accumulate=None) -> torch.Tensor:
    """The LM head and the mean cross-entropy without [T, V] fp32 logits (see _LinearCrossEntropy)."""
    return _LinearCrossEntropy.apply(h_TH, w_VH, labels_T, ignore_index,
                                     chunk or device_lm_chunk(w_VH.shape[0], h_TH.device.type),
                                     chunk_ce or _chunk_ce_torch, accumulate or accumulate_mm)
