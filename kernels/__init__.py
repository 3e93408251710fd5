"""The one place that picks a kernel (installed as megamoe.kernels; megamoe/kernels links here).

    from megamoe.kernels import rms_norm, apply_rope, route, attention

auto (the default): the Triton kernel on CUDA tensors, the pure-PyTorch reference
(kernels/reference.py) on anything else.
triton: Triton always; CPU tensors need TRITON_INTERPRET=1 set before `kernels` is imported
(the interpreter, for tests); anything else is an error, never a silent fallback.
reference: the PyTorch reference always.
MEGAMOE_KERNELS=auto|triton|reference chooses for every op; `set_backend()` does the same from code.
Attention has its own switch (flash | sdpa | eager), see kernels/attention.py. The experts' grouped
matmul (`grouped_mm`, and `grouped_mm_wgrad` for its weight gradient) is torch._grouped_mm where
torch supports the shapes and dtype, else one matmul per expert (kernels/reference.py);
MEGAMOE_KERNELS=reference forces the loop. On CPUs, in bf16, the experts' rows are padded to
multiples of `expert_row_block` first, so that oneDNN compiles few matmul shapes.

Kernel modules (each: Triton kernels, a launch-config function, a torch.autograd.Function):
  kernels/rmsnorm.py  rms_norm     any width, fp32 statistics, dx and dweight
  kernels/rope.py     apply_rope   interleaved and half layouts, strided inputs, [1 or B] tables
  kernels/router.py   route        E <= 256, k <= 8, sigmoid/softmax, bias, groups, d(logits)
  kernels/cross_entropy.py  linear_cross_entropy's per-chunk loss and d(logits), in place
They are imported lazily, on the first Triton call, so the reference path never needs Triton.
Shapes outside a kernel's range (a router with E > 256 or k > 8) go to the reference under
auto; under forced triton the kernel raises instead.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import reference
from .reference import autocast_operands  # noqa: F401  (the experts cast with it too)
from .attention import attention, attention_backend  # noqa: F401
from .attention import set_deterministic as set_attention_deterministic  # noqa: F401

_BACKENDS = ("auto", "triton", "reference")
ROUTER_MAX_EXPERTS = 256  # the router kernel keeps a token's E scores in one register tile
ROUTER_MAX_TOP_K = 8
_forced: Optional[str] = None


def set_backend(name: Optional[str]) -> None:
    """Force 'triton' or 'reference' for every op (None: back to MEGAMOE_KERNELS / auto)."""
    global _forced
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"kernel backend must be one of {_BACKENDS}, got {name!r}")
    _forced = name


def backend() -> str:
    name = _forced or os.environ.get("MEGAMOE_KERNELS", "auto")
    if name not in _BACKENDS:
        raise ValueError(f"MEGAMOE_KERNELS must be one of {_BACKENDS}, got {name!r}")
    return name


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """Whether this op call runs Triton (see the module docstring for the rule)."""
    name = backend()
    if name == "reference":
        return False
    if name == "auto":
        return x.is_cuda and triton_available()
    usable = triton_available() and (x.is_cuda or interpreting())
    if not usable:
        raise RuntimeError("MEGAMOE_KERNELS=triton but Triton cannot run here: it needs CUDA tensors, "
                           "or TRITON_INTERPRET=1 set before kernels are imported (CPU, for tests)")
    return usable


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (kernels/rmsnorm.py); fp32 statistics, returns x.dtype."""
    if use_triton(x):
        from . import rmsnorm  # imported lazily: Triton decides interpret mode at import
        return rmsnorm.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def apply_rope(x_BSND: torch.Tensor, cos_BSR: torch.Tensor, sin_BSR: torch.Tensor,
               interleaved: bool = True) -> torch.Tensor:
    """RoPE on x [B, S, N, D] with cos/sin [B or 1, S, D/2] (kernels/rope.py)."""
    # The kernel gives cos/sin no gradient; if a caller ever trains them, stay exact.
    if use_triton(x_BSND) and not (cos_BSR.requires_grad or sin_BSR.requires_grad):
        from . import rope
        return rope.apply_rope(x_BSND, cos_BSR, sin_BSR, interleaved)
    return reference.apply_rope(x_BSND, cos_BSR, sin_BSR, interleaved)


def route(logits_TE: torch.Tensor, bias_E: Optional[torch.Tensor], top_k: int, score_func: str,
          n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
          routed_scaling_factor: float = 1.0):
    """DeepSeek-V3 routing (kernels/router.py); see reference.route for the exact semantics.

    Returns (weights_TK fp32, indices_TK int64, scores_TE fp32, counts_E int32).
    """
    fits_kernel = logits_TE.shape[-1] <= ROUTER_MAX_EXPERTS and top_k <= ROUTER_MAX_TOP_K
    # auto sends shapes the kernel does not cover to the reference; forced triton lets the
    # kernel raise its ValueError (never a silent fallback).
    if use_triton(logits_TE) and (fits_kernel or backend() == "triton"):
        from . import router
        return router.route(logits_TE, bias_E, top_k, score_func, n_group, topk_group,
                            norm_topk_prob, routed_scaling_factor)
    return reference.route(logits_TE, bias_E, top_k, score_func, n_group, topk_group,
                           norm_topk_prob, routed_scaling_factor)


def linear_cross_entropy(h_TH: torch.Tensor, w_VH: torch.Tensor, labels_T: torch.Tensor,
                         ignore_index: int = -100, chunk: Optional[int] = None) -> torch.Tensor:
    """LM head + mean cross-entropy in token chunks, never holding [T, V] fp32 logits
    (reference.linear_cross_entropy); each chunk's loss and gradient by kernels/cross_entropy.py
    under Triton, in place over the chunk's logits; in 16 bits on CUDA each chunk's weight
    gradient accumulated into the fp32 sum by the matmul itself where torch can
    (fp32_accumulating_mm)."""
    chunk_ce = None
    if use_triton(h_TH):
        from . import cross_entropy
        chunk_ce = cross_entropy.chunk_cross_entropy
    mm_dtype = torch.get_autocast_dtype("cuda") if h_TH.is_cuda and torch.is_autocast_enabled("cuda") else h_TH.dtype
    accumulate = fp32_accumulating_mm if gemm_accumulates_in_fp32(h_TH.device, mm_dtype) else None
    return reference.linear_cross_entropy(h_TH, w_VH, labels_T, ignore_index, chunk, chunk_ce, accumulate)


def fp32_accumulating_mm(acc_VH: Optional[torch.Tensor], a_VC: torch.Tensor, b_CH: torch.Tensor) -> torch.Tensor:
    """reference.accumulate_mm for 16-bit operands on CUDA: the matmul accumulates in fp32 and
    adds into the fp32 sum itself (cuBLAS with an fp32 C, beta 1; torch's out_dtype matmuls), as
    Megatron-Core's gradient-accumulation fusion does. Per chunk of the fused loss that saves the
    16-bit [V, H] product and the pass that adds it (1.85 GB written and read twice at
    DeepSeek-V3's head), and the product is no longer rounded to 16 bits before the sum."""
    if acc_VH is None:
        return torch.mm(a_VC, b_CH, out_dtype=torch.float32)
    return torch.addmm(acc_VH, a_VC, b_CH, out_dtype=torch.float32, out=acc_VH)


_FP32_ACCUMULATION: dict = {}


def gemm_accumulates_in_fp32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether fp32_accumulating_mm runs here: CUDA, 16-bit operands, and a torch whose CUDA
    addmm takes an fp32 `self` with 16-bit matrices (older ones refuse it: then the product is
    added as reference.accumulate_mm does). Found once per device and dtype by a call on 16 x 16
    tensors, which only raises or not: no value is read back."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    key = (device, dtype)
    if key not in _FP32_ACCUMULATION:
        a = torch.zeros(16, 16, device=device, dtype=dtype)
        try:
            fp32_accumulating_mm(fp32_accumulating_mm(None, a, a), a, a)
            _FP32_ACCUMULATION[key] = True
        except (RuntimeError, TypeError, NotImplementedError):
            _FP32_ACCUMULATION[key] = False
    return _FP32_ACCUMULATION[key]


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm needs 16-byte aligned rows; on CUDA it wants bf16 (Hopper kernels)."""
    return _grouped_mm_takes(x, *w.shape[1:])


def _grouped_mm_takes(x: torch.Tensor, *widths: int) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False   # float64 (the tests' oracles) takes the per-expert loop
    if x.is_cuda and (x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (9, 0)):
        return False
    align = 16 // x.element_size()
    return all(d % align == 0 for d in (*widths, x.shape[-1]))


# Expert row counts are padded to this multiple on CPUs (see expert_row_block).
CPU_EXPERT_ROW_BLOCK = 32


def expert_row_block(x: torch.Tensor, w: torch.Tensor) -> int:
    """The multiple each expert's row count is padded to before the grouped matmuls (1: none).

    32 for bf16/fp16 on CPUs where torch._grouped_mm runs: its CPU path is a loop of per-expert
    matmuls, and oneDNN compiles a matmul for every new row count, about 2 ms for a bf16 one on AMX
    against 0.07 ms to run it. Routing gives every expert a new count at every step, and the
    shapes outgrow oneDNN's primitive cache (1024): on small-moe at the demo's lr, the grouped
    matmuls took 0.2-0.9 s of a 0.5-1.3 s step, rising as routing skewed. Multiples of 32 leave 64
    row counts per matmul up to 2,048 rows, compiled once. fp32 (a new shape: 0.25 ms) runs faster
    unpadded (bench/moe_layer.py: the copies into and out of the padded rows cost more); GPUs (a
    real grouped GEMM) and the reference loop (float64 oracles) pad nothing."""
    return row_block(x.device.type, x.dtype) if grouped_mm_supported(x, w) else 1


def row_block(device_type: str, dtype: torch.dtype, kernel_backend: Optional[str] = None) -> int:
    """expert_row_block's rule by device, dtype and backend alone (default: this process's
    backend()), for where there are no tensors yet (the memory planner, which passes its target's
    backend): CPU_EXPERT_ROW_BLOCK for bf16/fp16 on CPUs unless the reference backend runs."""
    name = backend() if kernel_backend is None else kernel_backend
    if device_type != "cpu" or dtype not in (torch.bfloat16, torch.float16) or name == "reference":
        return 1
    return max(1, CPU_EXPERT_ROW_BLOCK)


def grouped_mm(x_TK: torch.Tensor, w_ENK: torch.Tensor, counts_E: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """y[t] = x[t] @ w[e].T for the tokens t of expert e, tokens sorted by expert. [T, N] out.
    `offs_E` (int32 cumulative counts) feeds torch._grouped_mm, `counts_E` the per-expert loop."""
    if backend() != "reference" and grouped_mm_supported(x_TK, w_ENK):
        return torch._grouped_mm(x_TK, w_ENK.transpose(-2, -1), offs=offs_E)
    return reference.grouped_mm(x_TK, w_ENK, counts_E)


def grouped_mm_wgrad(dy_TN: torch.Tensor, x_TK: torch.Tensor, counts_E: torch.Tensor,
                     offs_E: torch.Tensor) -> torch.Tensor:
    """The weight gradient of grouped_mm: [E, N, K], expert e's block = dy[tokens of e].T @
    x[tokens of e] (zeros for an expert with no tokens). The same torch._grouped_mm call torch's
    own autograd makes for grouped_mm's backward, or one matmul per expert."""
    if backend() != "reference" and _grouped_mm_takes(x_TK, dy_TN.shape[-1]):
        return torch._grouped_mm(dy_TN.transpose(0, 1), x_TK, offs=offs_E)
    return reference.grouped_mm_wgrad(dy_TN, x_TK, counts_E)
