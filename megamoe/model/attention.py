"""Multi-head Latent Attention (DeepSeek-V2/V3).

Keys and values are compressed into one latent c_kv [kv_lora_rank] per token plus a single rope
key [qk_rope_head_dim] shared by all heads; the KV cache stores only those two. Training expands
the latent into per-head k_nope and v (wkv_b) and runs a fused attention kernel; cached decoding
"absorbs" wkv_b into the query and output sides instead, so attention runs against the latent
directly and the cache never grows per head.

Shapes: B batch, S query length, T key length, N heads, C kv_lora_rank, Dn qk_nope_head_dim,
Dr qk_rope_head_dim, Dv v_head_dim.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from megamoe import kernels
from megamoe.config import ModelConfig, yarn_get_mscale
from megamoe.kernels.attention import Documents
from megamoe.model.layers import RMSNorm

# DeepSeek's released code and transformers both normalise the q and kv latents with eps 1e-6,
# whatever rms_norm_eps says; keeping it fixed is what makes converted checkpoints match.
LATENT_NORM_EPS = 1e-6


@dataclass
class LatentCache:
    """Per-layer decode cache: the normalised kv latent and the roped shared key."""
    kv_BTC: torch.Tensor
    pe_BTR: torch.Tensor

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        return cls(torch.zeros(batch, max_len, cfg.kv_lora_rank, device=device, dtype=dtype),
                   torch.zeros(batch, max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype))


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, N = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads = N
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        if cfg.q_lora_rank is None:
            self.wq = nn.Linear(H, N * cfg.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(H, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = nn.Linear(cfg.q_lora_rank, N * cfg.qk_head_dim, bias=False)
        # rows: [latent C | rope key Dr]
        self.wkv_a = nn.Linear(H, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        # rows head-major: for each head [k_nope Dn | v Dv]
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, N * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(N * cfg.v_head_dim, H, bias=False)
        self.softmax_scale = cfg.qk_head_dim ** -0.5
        if cfg.rope_scaling is not None:
            mscale = yarn_get_mscale(cfg.rope_scaling.factor, cfg.rope_scaling.mscale_all_dim)
            self.softmax_scale *= mscale * mscale
        # QK-clip (MuonClip) needs each head's largest pre-softmax logit; fused attention kernels
        # never materialise the logits, so when asked we compute them once more, without grad.
        self.track_max_logit = False
        self.register_buffer("max_logit", torch.full((N,), float("-inf")), persistent=False)

    def reset_buffers(self, device) -> None:
        self.max_logit = torch.full(self.max_logit.shape, float("-inf"), device=device)

    def _queries(self, x_BSH: torch.Tensor, cos, sin):
        B, S, _ = x_BSH.shape
        q = self.wq(x_BSH) if self.cfg.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x_BSH)))
        q_BSND = q.view(B, S, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q_BSND.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = kernels.apply_rope(q_pe, cos, sin, self.cfg.rope_interleave)
        return q_nope, q_pe

    def _latent(self, x_BSH: torch.Tensor, cos, sin):
        kv_c, k_pe = self.wkv_a(x_BSH).split([self.kv_rank, self.rope_dim], dim=-1)
        k_pe = kernels.apply_rope(k_pe.unsqueeze(2), cos, sin, self.cfg.rope_interleave).squeeze(2)
        return self.kv_norm(kv_c), k_pe  # [B, S, C], [B, S, Dr]

    def forward(self, x_BSH: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[LatentCache] = None, start_pos: int = 0,
                documents: Optional[Documents] = None) -> torch.Tensor:
        """`documents`: packed documents attend within themselves only (--reset-attention-mask)."""
        B, S, _ = x_BSH.shape
        q_nope, q_pe = self._queries(x_BSH, cos, sin)
        kv_BSC, pe_BSR = self._latent(x_BSH, cos, sin)
        if cache is not None:
            return self._absorbed(q_nope, q_pe, kv_BSC, pe_BSR, cache, start_pos)

        kv = self.wkv_b(kv_BSC).view(B, S, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v_BSNV = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q_BSND = torch.cat([q_nope, q_pe], dim=-1)
        k_BSND = torch.cat([k_nope, pe_BSR.unsqueeze(2).expand(B, S, self.n_heads, self.rope_dim)], dim=-1)
        if self.track_max_logit:
            self._track_max_logit(q_BSND, k_BSND, documents)
        out = kernels.attention(q_BSND, k_BSND, v_BSNV.contiguous(), self.softmax_scale,
                                causal=True, backend=self.cfg.attention_backend, documents=documents)
        return self.wo(out.reshape(B, S, self.n_heads * self.v_dim))

    @torch.no_grad()
    def _track_max_logit(self, q_BSND: torch.Tensor, k_BSND: torch.Tensor,
                         documents: Optional[Documents] = None, budget_bytes: int = 1 << 28) -> None:
        """Running max over batches of scale * q.k per head (pairs that attend only), since last
        reset. Computed over query chunks, so no [B, N, S, S] fp32 tensor larger than `budget_bytes`."""
        B, S, N, _ = q_BSND.shape
        q, k = q_BSND.float(), k_BSND.float()
        chunk = max(1, budget_bytes // (4 * B * N * S))
        mask_BSS = documents.mask_BSS() if documents is not None else None
        head_max_N = torch.full((N,), float("-inf"), device=q.device)
        for s in range(0, S, chunk):
            logits_BNCT = torch.einsum("bsnd,btnd->bnst", q[:, s:s + chunk], k) * self.softmax_scale
            if mask_BSS is not None:
                attends = mask_BSS[:, None, s:s + chunk]
            else:
                attends = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()[s:s + chunk]
            head_max_N = torch.maximum(head_max_N, logits_BNCT.masked_fill(~attends, float("-inf")).amax(dim=(0, 2, 3)))
        self.max_logit.copy_(torch.maximum(self.max_logit, head_max_N.to(self.max_logit.dtype)))

    def _absorbed(self, q_nope, q_pe, kv_BSC, pe_BSR, cache: LatentCache, start_pos: int):
        """Attention straight against the latent cache: wkv_b folded into q (keys) and out (values)."""
        B, S = q_nope.shape[:2]
        end = start_pos + S
        cache.kv_BTC[:B, start_pos:end] = kv_BSC.to(cache.kv_BTC.dtype)
        cache.pe_BTR[:B, start_pos:end] = pe_BSR.to(cache.pe_BTR.dtype)
        kv_BTC, pe_BTR = cache.kv_BTC[:B, :end], cache.pe_BTR[:B, :end]

        w_NXC = self.wkv_b.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_rank)
        w_uk_NDC, w_uv_NVC = w_NXC.split([self.nope_dim, self.v_dim], dim=1)
        q_lat_BSNC = torch.einsum("bsnd,ndc->bsnc", q_nope, w_uk_NDC)
        scores = (torch.einsum("bsnc,btc->bsnt", q_lat_BSNC, kv_BTC)
                  + torch.einsum("bsnr,btr->bsnt", q_pe, pe_BTR)).float() * self.softmax_scale
        # query i sits at position start_pos + i and sees keys 0..start_pos + i
        causal_ST = torch.ones(S, end, dtype=torch.bool, device=scores.device).tril(start_pos)
        scores = scores.masked_fill(~causal_ST[None, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(kv_BTC.dtype)
        o_lat_BSNC = torch.einsum("bsnt,btc->bsnc", probs, kv_BTC)
        out_BSNV = torch.einsum("bsnc,nvc->bsnv", o_lat_BSNC, w_uv_NVC)
        return self.wo(out_BSNV.reshape(B, S, self.n_heads * self.v_dim).to(q_nope.dtype))
