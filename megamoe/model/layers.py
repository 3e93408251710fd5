"""Building blocks: RMSNorm, the SwiGLU MLP and rotary tables (default and YaRN)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from megamoe import kernels
from megamoe.config import ModelConfig, yarn_get_mscale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [Dr/2] of the rope slice and the cos/sin attention factor.

    YaRN follows DeepSeek-V3 / transformers exactly: frequencies below the beta_slow..beta_fast
    correction range are interpolated by `factor`, those above are kept, a linear ramp between.
    """
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq, 1.0

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(rs.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rs.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency, 0: interpolate
    inv_freq = inv_freq / rs.factor * (1 - extrapolation) + inv_freq * extrapolation
    attention_factor = rs.attention_factor
    if attention_factor is None:
        attention_factor = yarn_get_mscale(rs.factor, rs.mscale) / yarn_get_mscale(rs.factor, rs.mscale_all_dim)
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin [B or 1, S, Dr/2] (fp32) for given positions; nothing learned, nothing saved."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        inv_freq, self.attention_factor = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_buffers(self, device) -> None:
        with torch.device("cpu"):   # computed, not drawn: recompute what a meta build left empty
            self.inv_freq = rope_inv_freq(self.cfg)[0].to(device)

    def forward(self, positions_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 angles (bf16 positions lose precision past a few hundred tokens)
        angles = positions_BS.float()[..., None] * self.inv_freq.float().to(positions_BS.device)
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor
