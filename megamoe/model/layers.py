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


class _SwiGLUDown(torch.autograd.Function):
    """down(silu(gate) * up) keeping only gate and up for backward, which rebuilds silu(gate) and
    the product (an elementwise op) where autograd would keep both: 2 x intermediate fewer values
    per token, as the routed experts do (model/dispatch.py) and Megatron-Core's activation
    recompute. Backward makes autograd's ops in its order and layouts: the same numbers."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, w_HI: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up, w_HI)
        return F.linear(F.silu(gate) * up, w_HI)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up, w_HI = ctx.saved_tensors
        silu = F.silu(gate)
        dw = None
        if ctx.needs_input_grad[2]:
            dw = ((silu * up).reshape(-1, up.shape[-1]).t() @ dy.reshape(-1, dy.shape[-1])).t()
        d_act = dy @ w_HI
        d_gate = torch.ops.aten.silu_backward(d_act * up, gate) if ctx.needs_input_grad[0] else None
        d_up = d_act * silu if ctx.needs_input_grad[1] else None
        return d_gate, d_up, dw


class SwiGLUDown(nn.Linear):
    """The down projection of a SwiGLU MLP, fed gate and up rather than their product (see
    _SwiGLUDown). Its weight is nn.Linear's [hidden, intermediate], named and initialised as one,
    so checkpoints, HF names and ZeRO-3's per-module gathering are unchanged."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        # autocast covers F.linear but not the Function's backward: cast once here, differentiably
        gate, up, w = kernels.autocast_operands(gate, up, self.weight)
        return _SwiGLUDown.apply(gate, up, w)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = SwiGLUDown(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_proj(x), self.up_proj(x))


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
