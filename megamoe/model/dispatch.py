"""The dropless MoE data path as hand-written autograd functions: tokens into expert order through
the experts' SwiGLU (`RoutedExperts`), and back, weighted (`Combine`).

`order` [N = T*K] lists the (token, slot) pairs grouped by expert; `inverse` is its inverse
permutation. Both directions are plain row gathers (index_select), forward and backward: no
index_put, no scatter-add with atomics. That makes them deterministic on GPUs and, on CPUs, about
three times faster than advanced indexing (whose backward is an accumulating index_put).

What backward keeps is chosen, not left to autograd: the experts save only their gate/up output
[N, 2I] and recompute the gathered input and the SwiGLU product from it (an index_select and an
elementwise op), where autograd would keep the gathered input [N, H], silu(gate) and the product
too. Megatron-Core's fused permutation and activation recompute do the same for the same reason:
per MoE layer and token that is K x (H + 2I) fewer activations (V2-Lite: 28 KB in bf16).

Shapes: T tokens, K slots per token, N = T*K pairs, H hidden, I expert intermediate.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from megamoe import kernels, syncs


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device, dtype=order.dtype)
    return inverse


class PaddedRows(NamedTuple):
    """Where each expert-ordered row goes when every expert's rows are padded to a multiple of
    kernels.expert_row_block (CPUs: oneDNN then compiles few matmul shapes). Pad rows are zeros in
    the input, so they stay zero through the SwiGLU and add nothing to the weight gradients."""
    pos: torch.Tensor        # [used] padded row of each real row
    src: torch.Tensor        # [rows] real row of each padded row; `used` (a zero row) for pad rows
    counts_E: torch.Tensor   # padded row counts
    offs_E: torch.Tensor     # their int32 cumulative sums, for torch._grouped_mm
    rows: int                # padded rows in all

    @classmethod
    def of(cls, x_NH: torch.Tensor, w: torch.Tensor, counts_E: torch.Tensor) -> Optional["PaddedRows"]:
        block = kernels.expert_row_block(x_NH, w)
        if block == 1:
            return None
        counts_P = (counts_E + block - 1) // block * block
        offs_P = counts_P.cumsum(0)
        with syncs.cpu_only():           # host reads that only CPU runs make
            used, rows = int(counts_E.sum()), int(offs_P[-1])
            shift = torch.repeat_interleave(offs_P - counts_P - (counts_E.cumsum(0) - counts_E), counts_E,
                                            output_size=used)
        ids = torch.arange(used, device=x_NH.device)
        pos = ids + shift
        src = torch.full((rows,), used, device=x_NH.device).index_copy_(0, pos, ids)
        return cls(pos, src, counts_P, offs_P.to(torch.int32), rows)

    def pad(self, x_NH: torch.Tensor) -> torch.Tensor:
        # a gather from the real rows and one zero row: 4x faster than index_copy_ into zeros (bf16,
        # small-moe's 6,144 padded rows: 107 against 483 us); rows past the last expert's (AutoEP's
        # alignment padding) are left out
        used = self.pos.numel()
        return torch.cat([x_NH[:used], x_NH.new_zeros(1, x_NH.shape[-1])]).index_select(0, self.src)

    def unpad(self, x_PH: torch.Tensor, rows: int) -> torch.Tensor:
        out = x_PH.index_select(0, self.pos)      # differentiable: the dropping path runs it under autograd
        if rows > out.shape[0]:                    # AutoEP's alignment rows come back as zeros
            out = torch.cat([out, out.new_zeros(rows - out.shape[0], out.shape[1])])
        return out


def swiglu_experts(x_NH: torch.Tensor, gate_up_E2IH: torch.Tensor, down_EHI: torch.Tensor, counts_E: torch.Tensor,
                   offs_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h = [gate | up], y_NH = down(silu(gate) * up)) for rows already in expert order. `h` is
    only for swiglu_experts_backward: on CPUs its rows are padded (PaddedRows)."""
    padded = PaddedRows.of(x_NH, gate_up_E2IH, counts_E)
    x = padded.pad(x_NH) if padded else x_NH
    counts_E, offs_E = (padded.counts_E, padded.offs_E) if padded else (counts_E, offs_E)
    h_N2I = kernels.grouped_mm(x, gate_up_E2IH, counts_E, offs_E)
    gate, up = h_N2I.chunk(2, dim=-1)
    y = kernels.grouped_mm(F.silu(gate) * up, down_EHI, counts_E, offs_E)
    return h_N2I, padded.unpad(y, x_NH.shape[0]) if padded else y


class RoutedExperts(torch.autograd.Function):
    """x_TH -> y_NH in expert order: pair n = (token order[n] // K) through expert e's SwiGLU,
    down(silu(gate) * up) with [gate | up] = gate_up[e] x. Backward sums each token's K input
    gradients in slot order (the same sum on every device and layout)."""

    @staticmethod
    def forward(ctx, x_TH: torch.Tensor, gate_up_E2IH: torch.Tensor, down_EHI: torch.Tensor, order: torch.Tensor,
                inverse: torch.Tensor, k: int, counts_E: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        h_N2I, y_NH = swiglu_experts(x_TH.index_select(0, order // k), gate_up_E2IH, down_EHI, counts_E, offs_E)
        ctx.save_for_backward(x_TH, gate_up_E2IH, down_EHI, h_N2I, order, inverse, counts_E, offs_E)
        ctx.k = k
        return y_NH

    @staticmethod
    def backward(ctx, dy_NH: torch.Tensor):
        x_TH, gate_up, down, h_N2I, order, inverse, counts_E, offs_E = ctx.saved_tensors
        k, need = ctx.k, ctx.needs_input_grad
        dx_NH, d_gate_up, d_down = swiglu_experts_backward(
            dy_NH, h_N2I, lambda: x_TH.index_select(0, order // k), gate_up, down, counts_E, offs_E, need[:3])
        dx_TH = None
        if dx_NH is not None:
            # each token's K copies summed in slot order, one [T, H] gather at a time
            inverse_TK = inverse.view(-1, k)
            dx_TH = dx_NH.index_select(0, inverse_TK[:, 0])
            for slot in range(1, k):
                dx_TH += dx_NH.index_select(0, inverse_TK[:, slot])
        return dx_TH, d_gate_up, d_down, None, None, None, None, None


class SortedExperts(torch.autograd.Function):
    """RoutedExperts for rows that arrive in expert order, with gate and up as separate [E, I, H]
    weights: DeepSpeed AutoEP's experts (w1 gate, w2 down, w3 up) after its all-to-all and
    permutation, where autograd would keep the input, gate, up, silu(gate) and the product (and,
    with AutoEP's fused gate/up on Hopper, a concatenated copy of every local expert's w1 and w3
    per layer). This keeps the input and [gate | up] and rebuilds the rest in backward. Rows past
    the last offset (AutoEP's alignment padding) are left as torch._grouped_mm leaves them, as
    AutoEP's own path does: its un-permutation drops them."""

    @staticmethod
    def forward(ctx, x_NH: torch.Tensor, w1_EIH: torch.Tensor, w2_EHI: torch.Tensor, w3_EIH: torch.Tensor,
                counts_E: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        h_N2I, y_NH = swiglu_experts(x_NH, torch.cat([w1_EIH, w3_EIH], dim=1), w2_EHI, counts_E, offs_E)
        ctx.save_for_backward(x_NH, w1_EIH, w2_EHI, w3_EIH, h_N2I, counts_E, offs_E)
        return y_NH

    @staticmethod
    def backward(ctx, dy_NH: torch.Tensor):
        x_NH, w1, w2, w3, h_N2I, counts_E, offs_E = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx_NH, d_gate_up, d_down = swiglu_experts_backward(
            dy_NH, h_N2I, lambda: x_NH, torch.cat([w1, w3], dim=1), w2, counts_E, offs_E,
            (need[0], need[1] or need[3], need[2]))
        d_w1 = d_w3 = None
        if d_gate_up is not None:
            d_w1, d_w3 = (d.contiguous() for d in d_gate_up.chunk(2, dim=1))
        return dx_NH, d_w1, d_down, d_w3, None, None


def swiglu_experts_backward(dy_NH: torch.Tensor, h_N2I: torch.Tensor, x_NH: Callable[[], torch.Tensor],
                            gate_up_E2IH: torch.Tensor, down_EHI: torch.Tensor, counts_E: torch.Tensor,
                            offs_E: torch.Tensor, need: tuple[bool, bool, bool]):
    """(dx_NH, d_gate_up, d_down) of swiglu_experts from its saved [gate | up], each None unless
    `need` (input, gate_up, down) asks for it; `x_NH()` gives the expert-order input, rebuilt
    only when the gate/up weight gradient needs it."""
    padded = PaddedRows.of(dy_NH, gate_up_E2IH, counts_E)
    if padded:
        rows, get_x = dy_NH.shape[0], x_NH
        dy_NH, x_NH = padded.pad(dy_NH), lambda: padded.pad(get_x())
        counts_E, offs_E = padded.counts_E, padded.offs_E
    gate, up = h_N2I.chunk(2, dim=-1)
    silu = F.silu(gate)
    d_down = kernels.grouped_mm_wgrad(dy_NH, silu * up, counts_E, offs_E) if need[2] else None
    d_act = kernels.grouped_mm(dy_NH, down_EHI.transpose(1, 2), counts_E, offs_E)
    # the two halves autograd computes for silu(gate) * up (with its own silu backward),
    # written into one [N, 2I] buffer rather than concatenated
    dh_N2I = torch.empty_like(h_N2I)
    d_gate, d_up = dh_N2I.chunk(2, dim=-1)
    torch.ops.aten.silu_backward.grad_input(torch.mul(d_act, up, out=d_gate), gate, grad_input=d_gate)
    torch.mul(d_act, silu, out=d_up)
    del d_act, silu, d_gate, d_up
    d_gate_up = kernels.grouped_mm_wgrad(dh_N2I, x_NH(), counts_E, offs_E) if need[1] else None
    dx_NH = kernels.grouped_mm(dh_N2I, gate_up_E2IH.transpose(1, 2), counts_E, offs_E) if need[0] else None
    if padded and dx_NH is not None:
        dx_NH = padded.unpad(dx_NH, rows)
    return dx_NH, d_gate_up, d_down


def _combine_chunk(T: int, K: int, H: int, device: torch.device) -> int:
    """Tokens per chunk of Combine's fp32 [chunk, K, H] product: about 1 MiB on CPUs, where it
    then stays in cache (5x faster than one [T, K, H] pass at the demo's shape), 256 MiB on GPUs,
    only to bound memory."""
    budget = 1 << 20 if device.type == "cpu" else 1 << 28
    return max(1, min(T, budget // (4 * K * H)))


def _slot_chunks(y_NH: torch.Tensor, inverse: torch.Tensor, T: int, K: int, acc: torch.dtype):
    """(first token, [C, K, H] copy in `acc`) of y's pairs in slot order, a chunk of tokens at a
    time: each chunk gathered on its own, so y in slot order is never whole (a [T*K, H] copy: 400 MB
    per MoE layer at V2-Lite's micro batch 4 x 4096 in bf16)."""
    H = y_NH.shape[-1]
    step = _combine_chunk(T, K, H, y_NH.device)
    for s in range(0, T, step):
        y_CKH = y_NH.index_select(0, inverse[s * K:(s + step) * K]).view(-1, K, H)
        yield s, y_CKH.to(acc)       # the gather is a fresh tensor: callers may work in place


class Combine(torch.autograd.Function):
    """y_NH (expert order) -> y_TH = sum_k w[t, k] * y[pair (t, k)], accumulated in fp32 (float64
    stays float64), returned in y's dtype: DeepSpeed AutoEP's weighted_sum combine, bit for bit,
    computed a chunk of tokens at a time, so neither y in slot order nor the fp32 [T, K, H] product
    AutoEP materialises (10 MB per layer at the demo's micro batch, 0.8 GB at V2-Lite's) is ever
    whole. (Each chunk is cast, then multiplied in place: the same numbers as the promoting
    multiply, 30% faster on CPUs.) Saves y as it came, for the weight gradient's own chunks."""

    @staticmethod
    def forward(ctx, y_NH: torch.Tensor, weights_TK: torch.Tensor, order: torch.Tensor,
                inverse: torch.Tensor) -> torch.Tensor:
        T, K = weights_TK.shape
        acc = torch.promote_types(y_NH.dtype, torch.float32)   # fp32, or float64 for the oracle
        w_TK1 = weights_TK.to(acc).unsqueeze(-1)
        out_TH = y_NH.new_empty(T, y_NH.shape[-1], dtype=acc)
        with torch.autocast(y_NH.device.type, enabled=False):   # the sum stays in `acc` under autocast
            for s, y_CKH in _slot_chunks(y_NH, inverse, T, K, acc):
                e = s + y_CKH.shape[0]
                torch.sum(y_CKH.mul_(w_TK1[s:e]), dim=1, out=out_TH[s:e])
        ctx.save_for_backward(y_NH, w_TK1, order, inverse)
        ctx.w_dtype = weights_TK.dtype
        return out_TH.to(y_NH.dtype)

    @staticmethod
    def backward(ctx, grad_TH: torch.Tensor):
        # grad is used in its own dtype: every product below is still computed in `acc` and rounded
        # once, as with an fp32 copy of grad, but on GPUs TensorIterator casts inside its kernels,
        # so neither that [T, H] copy nor an fp32 [N, H] grad_y (805 MB per MoE layer at V2-Lite's
        # micro batch 4 x 4096) is made; on CPUs TensorIterator still makes them itself
        y_NH, w_TK1, order, inverse = ctx.saved_tensors
        (T, K), acc = w_TK1.shape[:2], w_TK1.dtype
        g_T1H = grad_TH.unsqueeze(1)
        grad_w_TK = None
        if ctx.needs_input_grad[1]:
            grad_w_TK = w_TK1.new_empty(T, K)
            for s, y_CKH in _slot_chunks(y_NH, inverse, T, K, acc):
                e = s + y_CKH.shape[0]
                torch.sum(y_CKH.mul_(g_T1H[s:e]), dim=-1, out=grad_w_TK[s:e])
            grad_w_TK = grad_w_TK.to(ctx.w_dtype)
        grad_y_NH = None
        if ctx.needs_input_grad[0]:
            # pair n of expert order is (token order[n] // K, slot order[n] % K); the gather is in
            # grad's dtype and the product, in `acc`, is written back into it in y's dtype
            grad_y_NH = grad_TH.index_select(0, order // K)
            grad_y_NH.mul_(w_TK1.view(-1, 1).index_select(0, order))
        return grad_y_NH, grad_w_TK, None, None
