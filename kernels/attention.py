"""Attention backends for MLA: FlashAttention where installed and usable, PyTorch SDPA otherwise.

Layout everywhere: q, k [B, S, H, Dqk], v [B, S, H, Dv] -> out [B, S, H, Dv].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import reference

BACKENDS = ("auto", "flash", "sdpa", "eager")


def attention_backend(requested: str, device: torch.device) -> str:
    """Resolve 'auto' to a concrete backend for this device."""
    if requested not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "auto":
        return "sdpa"
    return requested


def attention(q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHE: torch.Tensor, scale: float,
              causal: bool = True, backend: str = "auto") -> torch.Tensor:
    name = attention_backend(backend, q_BSHD.device)
    if name == "eager":
        return reference.attention(q_BSHD, k_BSHD, v_BSHE, scale, causal)
    if name == "sdpa":
        q, k, v = (t.transpose(1, 2) for t in (q_BSHD, k_BSHD, v_BSHE))
        # is_causal aligns the mask top-left; with a KV prefix (Sq < Sk) we need bottom-right.
        Sq, Sk = q.shape[-2], k.shape[-2]
        if causal and Sq != Sk:
            mask = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(Sk - Sq)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        return out.transpose(1, 2)
    raise NotImplementedError(f"attention backend {name!r} is not available yet")
