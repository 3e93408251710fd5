"""Rotary position embedding in Triton, for MLA's rope slices and the shared rope key.

x [B, S, N, D] (any strides: the model passes q[..., nope:] slices without copying) is rotated
by per-position angles; cos/sin [B or 1, S, D/2] fp32 are already gathered by position ids and
carry YaRN's attention factor (mscale), so YaRN needs nothing special here.

Layouts (R = D/2 pairs, pair r rotated by angle theta[b, s, r]):
  interleaved=True  (DeepSeek): pair r is (x[2r], x[2r+1]); the output keeps that layout
  interleaved=False (Llama/HF rotate_half): pair r is (x[r], x[r + R])
  out1 = x1*cos - x2*sin,  out2 = x2*cos + x1*sin

Backward is the inverse rotation (the Jacobian is orthogonal): dx1 = dy1*cos + dy2*sin,
dx2 = dy2*cos - dy1*sin; same kernel with sin negated. cos/sin get no gradient (they are
position tables, not parameters): the dispatch sends the call to the reference if they ever
require grad.

One program handles BLOCK_T tokens (b, s) times all N*R (head, pair) slots of each token, so
the cos/sin row of a token is loaded once and reused by every head.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def rope_config(N: int, R: int, interpret: bool | None = None) -> dict:
    """Tiles: all N*R (head, pair) slots of a token in one padded power-of-2 row, and enough
    tokens per program for ~2048 pairs (GPU) or ~16384 (interpreter: fewer, bigger programs)."""
    interpret = _interpreting() if interpret is None else interpret
    block_hr = triton.next_power_of_2(N * R)
    target = 16384 if interpret else 2048
    block_t = max(1, target // block_hr)
    num_warps = 4 if block_t * block_hr <= 2048 else 8
    return dict(BLOCK_T=block_t, BLOCK_HR=block_hr, num_warps=num_warps)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, T, S, N,
                 sx_b, sx_s, sx_n, sx_d, so_b, so_s, so_n, so_d, sc_b, sc_s, sc_r,
                 sin_sign,
                 R: tl.constexpr, INTERLEAVED: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_HR: tl.constexpr):
    pid = tl.program_id(0)
    tok_T = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    b_T = (tok_T // S).to(tl.int64)
    s_T = (tok_T % S).to(tl.int64)
    slot_H = tl.arange(0, BLOCK_HR)          # (head, pair) slot within one token
    head_H = slot_H // R
    pair_H = slot_H % R
    mask = (tok_T < T)[:, None] & (slot_H < N * R)[None, :]

    if INTERLEAVED:
        d1_H = 2 * pair_H
        d2_H = 2 * pair_H + 1
    else:
        d1_H = pair_H
        d2_H = pair_H + R

    x_base = b_T[:, None] * sx_b + s_T[:, None] * sx_s + head_H[None, :] * sx_n
    x1 = tl.load(x_ptr + x_base + d1_H[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_base + d2_H[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
    cs_off = b_T[:, None] * sc_b + s_T[:, None] * sc_s + pair_H[None, :] * sc_r
    cos = tl.load(cos_ptr + cs_off, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + cs_off, mask=mask, other=0.0).to(tl.float32) * sin_sign

    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    o_base = b_T[:, None] * so_b + s_T[:, None] * so_s + head_H[None, :] * so_n
    tl.store(out_ptr + o_base + d1_H[None, :] * so_d, out1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + o_base + d2_H[None, :] * so_d, out2.to(out_ptr.dtype.element_ty), mask=mask)


def rope_launch(x_BSND: torch.Tensor, cos_BSR: torch.Tensor, sin_BSR: torch.Tensor,
                interleaved: bool, inverse: bool = False) -> torch.Tensor:
    B, S, N, D = x_BSND.shape
    R = D // 2
    if D % 2 or cos_BSR.shape[-1] != R or sin_BSR.shape != cos_BSR.shape:
        raise ValueError(f"rope: x {tuple(x_BSND.shape)} needs cos/sin [B or 1, S, {R}], "
                         f"got {tuple(cos_BSR.shape)} / {tuple(sin_BSR.shape)}")
    # Broadcast the [1, S, R] tables over batch with stride 0 instead of materialising them.
    cos_BSR = cos_BSR.expand(B, S, R)
    sin_BSR = sin_BSR.expand(B, S, R)
    if cos_BSR.stride() != sin_BSR.stride():
        cos_BSR, sin_BSR = cos_BSR.contiguous(), sin_BSR.contiguous()
    out = torch.empty((B, S, N, D), dtype=x_BSND.dtype, device=x_BSND.device)
    cfg = rope_config(N, R)
    T = B * S
    grid = (triton.cdiv(T, cfg["BLOCK_T"]),)
    _rope_kernel[grid](x_BSND, cos_BSR, sin_BSR, out, T, S, N,
                       *x_BSND.stride(), *out.stride(), *cos_BSR.stride(),
                       -1.0 if inverse else 1.0,
                       R=R, INTERLEAVED=interleaved, BLOCK_T=cfg["BLOCK_T"],
                       BLOCK_HR=cfg["BLOCK_HR"], num_warps=cfg["num_warps"])
    return out


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BSND, cos_BSR, sin_BSR, interleaved):
        ctx.save_for_backward(cos_BSR, sin_BSR)
        ctx.interleaved = interleaved
        return rope_launch(x_BSND, cos_BSR, sin_BSR, interleaved)

    @staticmethod
    def backward(ctx, dy_BSND):
        cos_BSR, sin_BSR = ctx.saved_tensors
        dx = rope_launch(dy_BSND, cos_BSR, sin_BSR, ctx.interleaved, inverse=True)
        return dx, None, None, None


def apply_rope(x_BSND: torch.Tensor, cos_BSR: torch.Tensor, sin_BSR: torch.Tensor,
               interleaved: bool = True) -> torch.Tensor:
    """Triton RoPE; same contract as kernels.reference.apply_rope (cos/sin get no gradient)."""
    return RoPEFunction.apply(x_BSND, cos_BSR, sin_BSR, interleaved)
