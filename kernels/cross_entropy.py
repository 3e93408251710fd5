"""Cross-entropy of one chunk of logits in Triton, loss and gradient in one kernel, in place.

The fused LM head + loss (reference.linear_cross_entropy) multiplies a chunk of tokens by the
head's weight and needs, per row, the loss and d(loss)/d(logits) = (softmax - onehot) / n_valid.
The PyTorch path makes that several full passes over the [C, V] chunk (an fp32 copy, logsumexp,
subtract, exp, scatter, scale, a cast back). Here one program per row reads its logits twice:
  pass 1: online max and sum of exp (fp32, whatever the logits' dtype) -> lse;
  pass 2: g = exp(x - lse), minus 1 at the label, times 1/n_valid (0 for an ignored row), written
          over the logits in their own dtype: the chunk buffer becomes the gradient the two
          matmuls need, with no second [C, V] buffer.
The loss per row (lse - x[label], 0 when ignored) goes to an fp32 [C] vector. The numbers are the
PyTorch path's: softmax in fp32 from the stored logits, the gradient rounded to the logits' dtype.
`chunk_cross_entropy` is the launcher; `kernels.reference._chunk_ce_torch` the oracle and CPU path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK_V = 4096   # columns per tile: 4096 fp32 over 8 warps is 16 values per thread


def ce_config(V: int) -> dict:
    block_v = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    return dict(BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4)


@triton.jit
def _ce_kernel(logits_ptr, stride, labels_ptr, loss_ptr, n_valid_ptr, V, ignore_index,
               WANT_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride
    y = tl.load(labels_ptr + row)
    valid = y != ignore_index
    m = tl.full((), float("-inf"), tl.float32)
    d = tl.zeros((), tl.float32)
    for off in range(0, V, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    y_safe = tl.where(valid, y, 0)
    x_y = tl.load(ptr + y_safe).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - x_y, 0.0))
    if WANT_GRAD:
        scale = tl.where(valid, 1.0 / tl.load(n_valid_ptr), 0.0)
        for off in range(0, V, BLOCK_V):
            cols = off + tl.arange(0, BLOCK_V)
            x = tl.load(ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(cols == y_safe, 1.0, 0.0)
            tl.store(ptr + cols, (g * scale).to(logits_ptr.dtype.element_ty), mask=cols < V)


def chunk_cross_entropy(logits_CV: torch.Tensor, labels_C: torch.Tensor, n_valid: torch.Tensor,
                        ignore_index: int, want_grad: bool):
    """(sum of the chunk's losses [fp32 scalar], gradient [C, V] in the logits' dtype written over
    `logits_CV`, or None). `n_valid` (an fp32 device scalar) is the whole batch's labelled count."""
    C, V = logits_CV.shape
    if logits_CV.stride(1) != 1:
        raise ValueError("chunk_cross_entropy needs rows of contiguous logits")
    loss_C = torch.empty(C, dtype=torch.float32, device=logits_CV.device)
    if C:
        _ce_kernel[(C,)](logits_CV, logits_CV.stride(0), labels_C.contiguous(), loss_C,
                         n_valid.to(torch.float32).reshape(1), V, ignore_index, WANT_GRAD=want_grad,
                         **ce_config(V))
    return loss_C.sum(), (logits_CV if want_grad else None)
