"""RMSNorm in Triton: y = x * rsqrt(mean(x^2) + eps) * weight over the last dim.

Forward and backward both accumulate in fp32 whatever the storage dtype (bf16/fp16/fp32), and
work for any row width N: a row is processed in column chunks of BLOCK_N (a power of 2, the
tail masked), so rows wider than one tile are handled by looping instead of by a bigger tile
that would spill registers.

Forward  (one program per BLOCK_M rows): rstd = rsqrt(sum(x^2)/N + eps); y = x * rstd * w.
          rstd [M] fp32 is saved for the backward.
Backward (a persistent grid of G programs, each looping over row blocks):
          xhat = x * rstd, g = dy * w
          dx   = rstd * (g - xhat * sum(g * xhat) / N)
          dw   = sum over rows of dy * xhat: every program accumulates its rows into its own
                 fp32 row of partial_dw [G, N] (no atomics, deterministic) and torch sums the G
                 rows at the end.

`RMSNormFunction` is the autograd wrapper; `rms_norm_config` picks tiles and warps;
`kernels.reference.rms_norm` is the oracle and CPU path.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Widest column chunk kept in registers at once. 8192 fp32 over 8 warps is 32 values/thread
# per live tile, which keeps the forward and backward well clear of register spills.
MAX_BLOCK_N = 8192


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def rms_norm_config(N: int, interpret: bool | None = None, backward: bool = False) -> dict:
    """Tile shape and warps for a row width N.

    Aim for ~4096-8192 elements per program: enough work per program to hide latency on a GPU,
    few enough programs that the interpreter (~0.4 ms per program) stays fast in tests. The
    backward keeps ~5 tiles live (x, dy, w, xhat, dx), so it gets ~16 elements per thread per tile
    (up to 16 warps): ~90-100 registers instead of ~150-180, for better occupancy.
    """
    interpret = _interpreting() if interpret is None else interpret
    block_n = min(triton.next_power_of_2(N), MAX_BLOCK_N)
    target = 16384 if interpret else 4096
    block_m = max(1, min(64 if interpret else 16, target // block_n))
    num_warps = 4 if block_m * block_n <= 4096 else 8
    if backward:  # ~16 elements per thread per tile
        num_warps = max(4, min(16, block_m * block_n // 512))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, NUM_CHUNKS=triton.cdiv(N, block_n),
                num_warps=num_warps)


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, M, N, stride_x, stride_y, eps,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    pid = tl.program_id(0)
    rows_M = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok_M = rows_M < M
    rows_M64 = rows_M.to(tl.int64)  # M * stride can exceed 2^31 for long sequences
    cols_N = tl.arange(0, BLOCK_N)

    if NUM_CHUNKS == 1:
        # the common case (N <= MAX_BLOCK_N): the row stays in registers, x is read once
        col_ok = cols_N < N
        mask = row_ok_M[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows_M64[:, None] * stride_x + cols_N[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        rstd_M = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
        tl.store(rstd_ptr + rows_M, rstd_M, mask=row_ok_M)
        w = tl.load(w_ptr + cols_N, mask=col_ok, other=0.0).to(tl.float32)
        y = x * rstd_M[:, None] * w[None, :]
        tl.store(y_ptr + rows_M64[:, None] * stride_y + cols_N[None, :],
                 y.to(y_ptr.dtype.element_ty), mask=mask)
        return

    sumsq_M = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c in tl.static_range(NUM_CHUNKS):
        col_N = c * BLOCK_N + cols_N
        mask = row_ok_M[:, None] & (col_N < N)[None, :]
        x = tl.load(x_ptr + rows_M64[:, None] * stride_x + col_N[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        sumsq_M += tl.sum(x * x, axis=1)
    rstd_M = 1.0 / tl.sqrt(sumsq_M / N + eps)
    tl.store(rstd_ptr + rows_M, rstd_M, mask=row_ok_M)

    for c in tl.static_range(NUM_CHUNKS):
        col_N = c * BLOCK_N + cols_N
        col_ok = col_N < N
        mask = row_ok_M[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows_M64[:, None] * stride_x + col_N[None, :], mask=mask, other=0.0)
        w = tl.load(w_ptr + col_N, mask=col_ok, other=0.0).to(tl.float32)
        y = x.to(tl.float32) * rstd_M[:, None] * w[None, :]
        tl.store(y_ptr + rows_M64[:, None] * stride_y + col_N[None, :],
                 y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, partial_dw_ptr, M, N,
                         stride_x, stride_dy, stride_dx, num_row_blocks,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols_N = tl.arange(0, BLOCK_N)
    dw_row_ptr = partial_dw_ptr + pid.to(tl.int64) * N  # this program's own fp32 dw row

    for rb in range(pid, num_row_blocks, num_programs):
        rows_M = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok_M = rows_M < M
        rows_M64 = rows_M.to(tl.int64)
        rstd_M = tl.load(rstd_ptr + rows_M, mask=row_ok_M, other=0.0)

        # pass 1: c_M = sum(dy * w * xhat) / N per row
        dot_M = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c in tl.static_range(NUM_CHUNKS):
            col_N = c * BLOCK_N + cols_N
            col_ok = col_N < N
            mask = row_ok_M[:, None] & col_ok[None, :]
            x = tl.load(x_ptr + rows_M64[:, None] * stride_x + col_N[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + rows_M64[:, None] * stride_dy + col_N[None, :], mask=mask,
                         other=0.0).to(tl.float32)
            w = tl.load(w_ptr + col_N, mask=col_ok, other=0.0).to(tl.float32)
            dot_M += tl.sum(dy * w[None, :] * x, axis=1)
        c_M = dot_M * rstd_M / N

        # pass 2: dx, and this block's contribution to dw
        for c in tl.static_range(NUM_CHUNKS):
            col_N = c * BLOCK_N + cols_N
            col_ok = col_N < N
            mask = row_ok_M[:, None] & col_ok[None, :]
            x = tl.load(x_ptr + rows_M64[:, None] * stride_x + col_N[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + rows_M64[:, None] * stride_dy + col_N[None, :], mask=mask,
                         other=0.0).to(tl.float32)
            w = tl.load(w_ptr + col_N, mask=col_ok, other=0.0).to(tl.float32)
            xhat = x * rstd_M[:, None]
            dx = rstd_M[:, None] * (dy * w[None, :] - xhat * c_M[:, None])
            tl.store(dx_ptr + rows_M64[:, None] * stride_dx + col_N[None, :],
                     dx.to(dx_ptr.dtype.element_ty), mask=mask)
            # Only this program touches its dw row, so a plain read-modify-write is race-free.
            dw_N = tl.load(dw_row_ptr + col_N, mask=col_ok, other=0.0)
            tl.store(dw_row_ptr + col_N, dw_N + tl.sum(dy * xhat, axis=0), mask=col_ok)


def _num_bwd_programs(num_row_blocks: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(num_row_blocks, 4 * sms))
    return max(1, min(num_row_blocks, 4))  # interpreter: few programs, each looping


def rms_norm_fwd(x_MN: torch.Tensor, weight_N: torch.Tensor, eps: float):
    M, N = x_MN.shape
    cfg = rms_norm_config(N)
    y_MN = torch.empty_like(x_MN)
    rstd_M = torch.empty(M, dtype=torch.float32, device=x_MN.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    _rms_norm_fwd_kernel[grid](x_MN, weight_N, y_MN, rstd_M, M, N, x_MN.stride(0), y_MN.stride(0),
                               eps, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                               NUM_CHUNKS=cfg["NUM_CHUNKS"], num_warps=cfg["num_warps"])
    return y_MN, rstd_M


def rms_norm_bwd(dy_MN: torch.Tensor, x_MN: torch.Tensor, weight_N: torch.Tensor,
                 rstd_M: torch.Tensor):
    M, N = x_MN.shape
    cfg = rms_norm_config(N, backward=True)
    num_row_blocks = triton.cdiv(M, cfg["BLOCK_M"])
    G = _num_bwd_programs(num_row_blocks, x_MN.device)
    dx_MN = torch.empty_like(x_MN)
    partial_dw_GN = torch.zeros(G, N, dtype=torch.float32, device=x_MN.device)
    _rms_norm_bwd_kernel[(G,)](x_MN, weight_N, dy_MN, rstd_M, dx_MN, partial_dw_GN, M, N,
                               x_MN.stride(0), dy_MN.stride(0), dx_MN.stride(0), num_row_blocks,
                               BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                               NUM_CHUNKS=cfg["NUM_CHUNKS"], num_warps=cfg["num_warps"])
    return dx_MN, partial_dw_GN.sum(0).to(weight_N.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x_MN = x.reshape(-1, shape[-1])
        if x_MN.stride(-1) != 1:
            x_MN = x_MN.contiguous()
        y_MN, rstd_M = rms_norm_fwd(x_MN, weight.contiguous(), eps)
        ctx.save_for_backward(x_MN, weight, rstd_M)
        return y_MN.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x_MN, weight, rstd_M = ctx.saved_tensors
        dy_MN = dy.reshape(-1, dy.shape[-1])
        if dy_MN.stride(-1) != 1:
            dy_MN = dy_MN.contiguous()
        dx_MN, dw_N = rms_norm_bwd(dy_MN, x_MN, weight.contiguous(), rstd_M)
        return dx_MN.view(dy.shape), dw_N, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm over the last dim of x (any leading shape); same contract as the reference."""
    return RMSNormFunction.apply(x, weight, eps)
