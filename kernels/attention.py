"""Attention backends for MLA: FlashAttention where installed and usable, PyTorch SDPA otherwise.

Layout everywhere: q, k [B, S, H, Dqk], v [B, S, H, Dv] -> out [B, S, H, Dv].

Backends (the model config's `attention_backend`, or the `backend=` argument):
  fa3   : FlashAttention-3, `flash_attn_interface.flash_attn_func` (the `hopper/` build of the
          flash-attention repository). Hopper (sm_90) only, fp16/bf16, and it takes MLA's head
          dims natively: Dqk 192 with Dv 128 (DeepSeek-V3's shape), no padding.
  flash : FlashAttention-2, `flash_attn.flash_attn_func`. CUDA sm_80+, fp16/bf16 and one head dim
          for q, k and v, while MLA has Dqk = nope + rope (e.g. 192) != Dv (128): v is zero-padded
          to Dqk and the output sliced back to Dv (the padded columns of P @ V are exactly 0, and
          the slice's backward drops their gradient), which costs 1.5x the P.V work at 192/128.
          If Dv > Dqk, q and k are padded instead (zeros do not change q.k).
  sdpa  : torch.nn.functional.scaled_dot_product_attention (any device, any dtype).
  eager : kernels.reference.attention (fp32 math; the oracle).
  auto  : the first of fa3, flash, sdpa that can run these tensors. The choice and its reason are
          logged once per distinct outcome (logger "megamoe.kernels"); the trainer prints it.
An explicitly requested backend that cannot run raises a RuntimeError naming the reason (never a
silent fallback). `set_deterministic(True)` asks FlashAttention for its deterministic backward
and, under auto, prefers it.

Causal masking with Sq < Sk (a KV prefix) is bottom-right aligned in every backend, which is
flash_attn's convention since 2.1.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from . import reference

BACKENDS = ("auto", "fa3", "flash", "sdpa", "eager")
FLASH_MAX_HEAD_DIM = 256
FLASH_DTYPES = (torch.float16, torch.bfloat16)
# FlashAttention flavours: (import module, function, oldest compute capability, newest, Dqk/Dv pairs
# taken as they are; None = equal dims only, others are padded to equal)
_FLAVOURS = {
    "fa3": ("flash_attn_interface", "flash_attn_func", (9, 0), (9, 9), {(192, 128)}),
    "flash": ("flash_attn", "flash_attn_func", (8, 0), None, None),
}



@dataclass
class Documents:
    """Packed documents of a batch (Megatron's --reset-attention-mask): tokens attend only within
    their own document. Built on the host with the batch (`documents_of`), so no backend has to
    read document boundaries back from the device.
      doc_ids_BS  [B, S] int32: document number of each token within its row (masks for sdpa/eager)
      cu_seqlens  [n + 1] int32: starts of the n documents over the flattened B*S tokens, and B*S
      max_seqlen  the longest document (a host int: FlashAttention's varlen grid)"""
    doc_ids_BS: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    def pin_memory(self) -> "Documents":
        return Documents(self.doc_ids_BS.pin_memory(), self.cu_seqlens.pin_memory(), self.max_seqlen)

    def to(self, device, non_blocking: bool = False) -> "Documents":
        return Documents(self.doc_ids_BS.to(device, non_blocking=non_blocking),
                         self.cu_seqlens.to(device, non_blocking=non_blocking), self.max_seqlen)

    def mask_BSS(self) -> torch.Tensor:
        """[B, S, S] bool: same document and causal."""
        S = self.doc_ids_BS.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool, device=self.doc_ids_BS.device).tril()
        return (self.doc_ids_BS[:, :, None] == self.doc_ids_BS[:, None, :]) & causal


def documents_of(input_ids_BS, eos_id: int) -> Documents:
    """Documents of a packed batch (numpy array or CPU tensor): a new one starts after every `eos_id`
    and at every row start."""
    import numpy as np
    ids = np.asarray(input_ids_BS)
    B, S = ids.shape
    starts = np.zeros((B, S), dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = ids[:, :-1] == eos_id
    cu = np.append(np.flatnonzero(starts.reshape(-1)), B * S).astype(np.int32)
    return Documents(torch.from_numpy((starts.cumsum(1) - 1).astype(np.int32)), torch.from_numpy(cu),
                     int(np.diff(cu).max()) if B * S else 0)


logger = logging.getLogger("megamoe.kernels")
_logged: set = set()
_probed: dict = {}
_deterministic = False


def set_deterministic(on: bool) -> None:
    """FlashAttention's deterministic backward (a little slower); SDPA follows torch's switch."""
    global _deterministic
    _deterministic = bool(on)


def _flash_fn(name: str, varlen: bool = False) -> Tuple[Optional[Callable], Optional[str]]:
    """(flavour's function if importable, else None and why not); probed once per flavour.
    varlen: its `flash_attn_varlen_func` (packed documents, cu_seqlens)."""
    key = name + ("_varlen" if varlen else "")
    if key not in _probed:
        module, func = _FLAVOURS[name][0], ("flash_attn_varlen_func" if varlen else _FLAVOURS[name][1])
        try:
            _probed[key] = (getattr(__import__(module), func), None)
        except Exception as exc:  # ImportError, or a broken CUDA build raising at import
            _probed[key] = (None, f"{module}.{func} is not importable ({type(exc).__name__}: {exc})")
    return _probed[key]


def _flash_attn_func() -> Tuple[Optional[Callable], Optional[str]]:
    return _flash_fn("flash")


def _device_capability(device: torch.device) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def takes_natively(name: str, qk_dim: int, v_dim: int) -> bool:
    """Whether the FlashAttention flavour runs these head dims without padding."""
    native = _FLAVOURS[name][4] or set()
    return qk_dim == v_dim or (qk_dim, v_dim) in native


def unusable_reason(name: str, device: torch.device, dtype: Optional[torch.dtype] = None,
                    qk_dim: Optional[int] = None, v_dim: Optional[int] = None) -> Optional[str]:
    """None if backend `name` can run on this device/dtype/head dims, else a sentence saying why not."""
    if name in ("sdpa", "eager"):
        return None
    fn, err = (_flash_attn_func() if name == "flash" else _flash_fn(name))
    if fn is None:
        return err
    device = torch.device(device)
    if device.type != "cuda":
        return f"tensors are on {device.type}; {name} needs CUDA"
    lo, hi = _FLAVOURS[name][2:4]
    cc = _device_capability(device)
    if cc < lo or (hi is not None and cc > hi):
        need = f"sm_{lo[0]}{lo[1]}" + (" (Hopper)" if hi else " or newer")
        return f"GPU is sm_{cc[0]}{cc[1]}; {name} needs {need}"
    if dtype is not None and dtype not in FLASH_DTYPES:
        return f"dtype is {dtype}; {name} needs fp16 or bf16"
    if qk_dim is not None:
        v_dim = qk_dim if v_dim is None else v_dim
        dim = max(qk_dim, v_dim)
        if dim > FLASH_MAX_HEAD_DIM:
            return f"head dim {dim} (after padding) exceeds {name}'s {FLASH_MAX_HEAD_DIM}"
    return None


def resolve_attention_backend(requested: str, device: torch.device, dtype: Optional[torch.dtype] = None,
                              qk_dim: Optional[int] = None, v_dim: Optional[int] = None) -> Tuple[str, str]:
    """(backend that runs, why). Raises if an explicitly requested backend cannot run."""
    if requested not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {requested!r}")
    if requested != "auto":
        reason = unusable_reason(requested, device, dtype, qk_dim, v_dim)
        if reason is not None:
            raise RuntimeError(f"attention backend '{requested}' was requested but cannot run: {reason}."
                               " Use 'auto' (the best one that runs) or 'sdpa'.")
        return requested, "requested explicitly"
    skipped = []
    for name in ("fa3", "flash"):
        reason = unusable_reason(name, device, dtype, qk_dim, v_dim)
        if reason is None:
            note = f" (v padded {v_dim} -> {qk_dim})" if name == "flash" and qk_dim and v_dim and qk_dim != v_dim else ""
            return name, f"auto: {name} is installed and supports this device/dtype/head dims{note}" + (
                f"; not {'; not '.join(skipped)}" if skipped else "")
        skipped.append(f"{name}: {reason}")
    return "sdpa", f"auto: {'; '.join(skipped)}; using PyTorch SDPA"


def attention_backend(requested: str, device: torch.device, dtype: Optional[torch.dtype] = None,
                      qk_dim: Optional[int] = None, v_dim: Optional[int] = None) -> str:
    """Resolve 'auto' to a concrete backend for this device (and dtype/head dims if given)."""
    return resolve_attention_backend(requested, device, dtype, qk_dim, v_dim)[0]


def available_backends(device, dtype, qk_dim: int, v_dim: int) -> list[str]:
    """Every concrete backend that can run these tensors, best first."""
    return [n for n in BACKENDS[1:] if unusable_reason(n, device, dtype, qk_dim, v_dim) is None]


def unavailable_backends(device, dtype, qk_dim: int, v_dim: int) -> dict[str, str]:
    return {n: r for n in BACKENDS[1:] if (r := unusable_reason(n, device, dtype, qk_dim, v_dim)) is not None}


def _log_choice(requested: str, name: str, why: str) -> None:
    key = (requested, name, why)
    if key not in _logged:
        _logged.add(key)
        logger.info("attention backend: %s (requested %r; %s)", name, requested, why)


def _one_head_dim(q, k, v):
    """q, k, v zero-padded to one head dim, the larger: zeros change neither q.k nor the first Dv
    columns of P.V, so the caller slices the output back to v's width (and the slice's backward
    drops the padded columns' gradient)."""
    Dqk, Dv = q.shape[-1], v.shape[-1]
    D = max(Dqk, Dv)
    if Dv < D:
        v = F.pad(v, (0, D - Dv))
    if Dqk < D:   # only one side is ever padded: no copy of the other
        q, k = F.pad(q, (0, D - Dqk)), F.pad(k, (0, D - Dqk))
    return q, k, v


def _flash_call(fn, name: str, q, k, v, scale, causal, *varlen_args):
    """One FlashAttention call in either layout: head dims the flavour does not take as they are get
    zero-padded to the larger one (zeros change neither q.k nor the kept columns of P.V) and the
    output is sliced back to v's width."""
    Dv = v.shape[-1]
    if not takes_natively(name, q.shape[-1], Dv):
        q, k, v = _one_head_dim(q, k, v)
    kwargs = {"softmax_scale": scale, "causal": causal, "deterministic": _deterministic}
    if name == "flash":
        kwargs["dropout_p"] = 0.0
    out = fn(q, k, v, *varlen_args, **kwargs)
    if isinstance(out, tuple):   # FA3 releases before 3.0 also return the log-sum-exp
        out = out[0]
    return out[..., :Dv]


def _flash(q_BSHD, k_BSHD, v_BSHE, scale, causal, name: str = "flash"):
    fn, _ = _flash_attn_func() if name == "flash" else _flash_fn(name)
    return _flash_call(fn, name, q_BSHD, k_BSHD, v_BSHE, scale, causal)


def _flash_varlen(q_BSHD, k_BSHD, v_BSHE, scale, docs: Documents, name: str = "flash"):
    """FlashAttention over packed documents: tokens flattened to [B*S, H, D], one causal sequence
    per document (cu_seqlens)."""
    fn, err = _flash_fn(name, varlen=True)
    if fn is None:
        raise RuntimeError(f"attention backend '{name}' with documents needs {err}")
    B, S, H, _ = q_BSHD.shape
    q, k, v = (t.reshape(B * S, H, t.shape[-1]) for t in (q_BSHD, k_BSHD, v_BSHE))
    cu = docs.cu_seqlens.to(device=q.device, dtype=torch.int32)
    out = _flash_call(fn, name, q, k, v, scale, True, cu, cu, docs.max_seqlen, docs.max_seqlen)
    return out.reshape(B, S, H, -1)


def _sdpa(q_BSHD, k_BSHD, v_BSHE, scale, causal, docs: Optional[Documents] = None):
    if _deterministic and q_BSHD.is_cuda:
        # the flash and memory-efficient SDPA kernels accumulate dq with atomics in backward
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.MATH):
            return _sdpa_call(q_BSHD, k_BSHD, v_BSHE, scale, causal, docs)
    return _sdpa_call(q_BSHD, k_BSHD, v_BSHE, scale, causal, docs)


def _sdpa_call(q_BSHD, k_BSHD, v_BSHE, scale, causal, docs: Optional[Documents] = None):
    Dv = v_BSHE.shape[-1]
    if q_BSHD.device.type == "cpu" and q_BSHD.shape[-1] != Dv:
        # SDPA's one fused CPU kernel (flash) needs one head dim; MLA's differ (nope + rope vs v),
        # and the math fallback materialises [B, H, Sq, Sk] scores and probabilities in fp32.
        # Padded (bench/attention.py, one thread, fwd+bwd, 48/32 dims): 1.3x faster at 256 tokens,
        # 2.6-3.6x at 1,024, a tenth of the memory there. CUDA's memory-efficient kernel takes
        # unequal dims as they are (not measured padded: no GPU here), so CUDA is left alone.
        q_BSHD, k_BSHD, v_BSHE = _one_head_dim(q_BSHD, k_BSHD, v_BSHE)
    q, k, v = (t.transpose(1, 2) for t in (q_BSHD, k_BSHD, v_BSHE))
    if docs is not None:
        mask = docs.mask_BSS()[:, None]
    elif causal and q.shape[-2] != k.shape[-2]:
        # is_causal aligns the mask top-left; with a KV prefix (Sq < Sk) we need bottom-right.
        Sq, Sk = q.shape[-2], k.shape[-2]
        mask = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(Sk - Sq)
    else:
        mask = None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale)
    return out.transpose(1, 2)[..., :Dv]


def attention(q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHE: torch.Tensor, scale: float,
              causal: bool = True, backend: str = "auto", documents: Optional[Documents] = None) -> torch.Tensor:
    """`scale` is the model's softmax scale (YaRN's mscale included): passed to every backend as is.
    `documents`: attend within documents only (causal, Sq == Sk; FlashAttention's varlen kernels)."""
    if documents is not None and not (causal and q_BSHD.shape[1] == k_BSHD.shape[1]):
        raise ValueError("documents need causal self-attention (Sq == Sk): a KV cache is for generation")
    name, why = resolve_attention_backend(backend, q_BSHD.device, q_BSHD.dtype, q_BSHD.shape[-1], v_BSHE.shape[-1])
    _log_choice(backend, name, why)
    if name == "eager":
        return reference.attention(q_BSHD, k_BSHD, v_BSHE, scale, causal,
                                   mask_BSS=documents.mask_BSS() if documents is not None else None)
    if name == "sdpa":
        return _sdpa(q_BSHD, k_BSHD, v_BSHE, scale, causal, documents)
    if documents is not None:
        return _flash_varlen(q_BSHD, k_BSHD, v_BSHE, scale, documents, name)
    return _flash(q_BSHD, k_BSHD, v_BSHE, scale, causal, name)
