"""Attention backends for MLA: FlashAttention where installed and usable, PyTorch SDPA otherwise.

Layout everywhere: q, k [B, S, H, Dqk], v [B, S, H, Dv] -> out [B, S, H, Dv].

Backends (the model config's `attention_backend`, or the `backend=` argument):
  flash : `flash_attn.flash_attn_func`. It needs CUDA, sm_80+, fp16/bf16 and one head dim for
          q, k and v, while MLA has Dqk = nope + rope (e.g. 192) != Dv (128): v is zero-padded
          to Dqk and the output sliced back to Dv (the padded columns of P @ V are exactly 0,
          and the slice's backward drops their gradient). If Dv > Dqk, q and k are padded
          instead (zeros do not change q.k). Requested explicitly but unusable -> RuntimeError
          naming the reason (never a silent fallback).
  sdpa  : torch.nn.functional.scaled_dot_product_attention (any device, any dtype).
  eager : kernels.reference.attention (fp32 math; the oracle).
  auto  : flash when usable for these tensors, else sdpa. The choice and its reason are logged
          once per distinct outcome (logger "megamoe.kernels").

Causal masking with Sq < Sk (a KV prefix) is bottom-right aligned in every backend, which is
flash_attn's convention since 2.1.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from . import reference

BACKENDS = ("auto", "flash", "sdpa", "eager")
FLASH_MAX_HEAD_DIM = 256
FLASH_DTYPES = (torch.float16, torch.bfloat16)

logger = logging.getLogger("megamoe.kernels")
_logged: set = set()
_flash_fn: Optional[Callable] = None
_flash_import_error: Optional[str] = None
_flash_probed = False


def _flash_attn_func() -> Tuple[Optional[Callable], Optional[str]]:
    """flash_attn_func if importable (probed once), else (None, why not)."""
    global _flash_fn, _flash_import_error, _flash_probed
    if not _flash_probed:
        _flash_probed = True
        try:
            from flash_attn import flash_attn_func
            _flash_fn = flash_attn_func
        except Exception as exc:  # ImportError, or a broken CUDA build raising at import
            _flash_import_error = f"flash_attn is not importable ({type(exc).__name__}: {exc})"
    return _flash_fn, _flash_import_error


def flash_unusable_reason(device: torch.device, dtype: Optional[torch.dtype] = None,
                          head_dim: Optional[int] = None) -> Optional[str]:
    """None if flash_attn can run on this device/dtype/head dim, else a sentence saying why not."""
    fn, err = _flash_attn_func()
    if fn is None:
        return err
    device = torch.device(device)
    if device.type != "cuda":
        return f"tensors are on {device.type}; flash_attn needs CUDA"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"GPU is sm_{major}{minor}; flash_attn needs sm_80 or newer"
    if dtype is not None and dtype not in FLASH_DTYPES:
        return f"dtype is {dtype}; flash_attn needs fp16 or bf16"
    if head_dim is not None and head_dim > FLASH_MAX_HEAD_DIM:
        return f"head dim {head_dim} (after padding v) exceeds flash_attn's {FLASH_MAX_HEAD_DIM}"
    return None


def resolve_attention_backend(requested: str, device: torch.device,
                              dtype: Optional[torch.dtype] = None,
                              head_dim: Optional[int] = None) -> Tuple[str, str]:
    """(backend that runs, why). Raises if 'flash' is requested but cannot run."""
    if requested not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {requested!r}")
    if requested in ("sdpa", "eager"):
        return requested, "requested explicitly"
    reason = flash_unusable_reason(device, dtype, head_dim)
    if requested == "flash":
        if reason is not None:
            raise RuntimeError(f"attention backend 'flash' was requested but cannot run: {reason}."
                               " Use 'auto' (falls back to PyTorch SDPA) or 'sdpa'.")
        return "flash", "requested explicitly"
    if reason is None:
        return "flash", "auto: flash_attn is installed and supports this device/dtype"
    return "sdpa", f"auto: {reason}, using PyTorch SDPA"


def attention_backend(requested: str, device: torch.device, dtype: Optional[torch.dtype] = None,
                      head_dim: Optional[int] = None) -> str:
    """Resolve 'auto' to a concrete backend for this device (and dtype/head dim if given)."""
    return resolve_attention_backend(requested, device, dtype, head_dim)[0]


def _log_choice(requested: str, name: str, why: str) -> None:
    key = (requested, name, why)
    if key not in _logged:
        _logged.add(key)
        logger.info("attention backend: %s (requested %r; %s)", name, requested, why)


def _flash(q_BSHD, k_BSHD, v_BSHE, scale, causal):
    fn, _ = _flash_attn_func()
    Dqk, Dv = q_BSHD.shape[-1], v_BSHE.shape[-1]
    D = max(Dqk, Dv)
    if Dv < D:
        v_BSHE = F.pad(v_BSHE, (0, D - Dv))
    if Dqk < D:
        q_BSHD = F.pad(q_BSHD, (0, D - Dqk))
        k_BSHD = F.pad(k_BSHD, (0, D - Dqk))
    out_BSHD = fn(q_BSHD, k_BSHD, v_BSHE, dropout_p=0.0, softmax_scale=scale, causal=causal)
    return out_BSHD[..., :Dv]


def _sdpa(q_BSHD, k_BSHD, v_BSHE, scale, causal):
    q, k, v = (t.transpose(1, 2) for t in (q_BSHD, k_BSHD, v_BSHE))
    # is_causal aligns the mask top-left; with a KV prefix (Sq < Sk) we need bottom-right.
    Sq, Sk = q.shape[-2], k.shape[-2]
    if causal and Sq != Sk:
        mask = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(Sk - Sq)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return out.transpose(1, 2)


def attention(q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHE: torch.Tensor, scale: float,
              causal: bool = True, backend: str = "auto") -> torch.Tensor:
    head_dim = max(q_BSHD.shape[-1], v_BSHE.shape[-1])
    name, why = resolve_attention_backend(backend, q_BSHD.device, q_BSHD.dtype, head_dim)
    _log_choice(backend, name, why)
    if name == "eager":
        return reference.attention(q_BSHD, k_BSHD, v_BSHE, scale, causal)
    if name == "sdpa":
        return _sdpa(q_BSHD, k_BSHD, v_BSHE, scale, causal)
    return _flash(q_BSHD, k_BSHD, v_BSHE, scale, causal)
