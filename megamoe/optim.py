"""Optimizer recipes: parameter groups (weight decay, Muon vs AdamW, lr multipliers) and MuonClip's QK-clip.

Parameter groups
----------------
Every trainable parameter gets one *kind* from its name and shape (`param_kind`):

  embedding  embed_tokens.weight (also the LM head when tied)       AdamW, no decay by default
  lm_head    lm_head.weight (untied)                                AdamW, decayed
  router     ...router.weight (the [E, H] gate)                     AdamW, decayed
  norm       1-D weights of RMSNorms (attn_norm, q_norm, ..., norm)  AdamW, no decay by default
  bias       any ...bias                                             AdamW, no decay by default
  vector     any other 1-D parameter                                 AdamW, no decay
  matrix     hidden matrices: attention/MLP projections, MTP eh_proj, Muon (under optimizer "Muon"),
             and the routed experts' stacked [E, out, in] weights    decayed
             (one matrix per expert: Muon's Newton-Schulz is batched over the leading dim)

`param_groups` builds one optimizer group per kind present, named after it, with its own
`weight_decay` and `lr` (= base lr x the kind's multiplier); DeepSpeed's LambdaLR schedule scales
every group's lr by the same factor, so multipliers hold through warmup and decay. The groups
are a list of dicts handed to deepspeed.initialize(model_parameters=...): DeepSpeed remaps them
through AutoEP's module replacement (a replaced expert weight joins the group its source was in)
and splits expert parameters into their own expert-data-parallel groups, keeping each group's
settings.

Muon vs AdamW: DeepSpeed tags `param.use_muon` itself (any >= 2-D parameter whose name lacks
"embed"/"lm_head" -> Muon, which would put the router on Muon), from `deepspeed.initialize` and
again after AutoEP creates the expert parameters. `muon_assignment()` wraps that tagging so the
tag follows `param_kind` instead: Muon exactly for kind "matrix".

QK-clip (MuonClip, Kimi K2)
---------------------------
Muon lets attention logits grow; K2 caps them per head after every optimizer step. Each MLA
records, during the forward, the largest pre-softmax logit S_h = scale * q_h.k_h of each head h
(`model.set_track_max_logit`). After the step, with gamma_h = tau / S_h for the heads over tau
(S_h all-reduced with MAX over all ranks, so every rank clips identically):

  q_nope rows of head h (in wq or wq_b)   x sqrt(gamma_h)
  q_rope rows of head h                   x gamma_h
  k_nope rows of head h (in wkv_b)        x sqrt(gamma_h)
  v rows of wkv_b, wkv_a (latent + the shared rope key), wq_a, q_norm: untouched

so head h's logits for the same input become exactly gamma_h x the old ones (<= tau) while its
values and every head under tau stay bit-identical. The rescale must reach the weights the
optimizer updates, not only the module's:

  ZeRO-1/2 and DeepSpeed's bf16 optimizer: each rank scales the fp32 master fragment it owns
      (`param._hp_mapping.hp_fragment`, a view into the flat fp32 partition, covering the
      flattened-parameter range `lp_fragment_address`), then the module weight is rebuilt from
      the masters (`get_full_hp_param`: one all-reduce over the param's data-parallel group) and
      cast into the low-precision parameter the next forward reads.
  ZeRO-3: each rank scales its fp32 partition (`_z3_optimizer.get_local_fp32_param`, the flat
      range [rank * n, (rank + 1) * n) of the parameter) and copies it into its low-precision
      partition `param.ds_tensor`, which the next forward all-gathers. Persistent parameters
      (small ones ZeRO-3 keeps whole on every rank) are also rebuilt whole from the masters.
  ZeRO-0 with bf16 (DeepSpeed's FP16_Optimizer holding flat fp32 masters per group): the
      master slice of the parameter, then the module weight from it.
  No master copy (plain model, ZeRO-0 fp32): the parameter itself, scaled in fp32, rounded once.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn as nn

KINDS = ("matrix", "embedding", "lm_head", "router", "norm", "bias", "vector")
DEFAULT_NO_DECAY = ("norm", "bias", "embedding")
MUON_KINDS = ("matrix",)


def param_kind(name: str, param: torch.Tensor) -> str:
    """The kind of a parameter (see the module docstring), from its name and layer shape."""
    shape = tuple(getattr(param, "ds_shape", None) or param.shape)  # ZeRO-3 params are flat placeholders
    leaf = name.rsplit(".", 1)[-1]
    if "embed_tokens" in name:
        return "embedding"
    if name.startswith("lm_head") or ".lm_head." in name:
        return "lm_head"
    if name.endswith("router.weight"):
        return "router"
    if leaf == "bias":
        return "bias"
    if len(shape) <= 1:
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        return "norm" if "norm" in module else "vector"
    return "matrix"


@dataclass
class GroupSpec:
    """How the kinds become optimizer groups. `lr_mult` maps kind -> multiplier (default 1)."""
    weight_decay: float = 0.0
    no_decay: tuple = DEFAULT_NO_DECAY
    lr_mult: dict = field(default_factory=dict)

    def __post_init__(self):
        bad = [k for k in (*self.no_decay, *self.lr_mult) if k not in KINDS]
        if bad:
            raise ValueError(f"unknown parameter kind(s) {bad}; the kinds are {list(KINDS)}")
        for k, v in self.lr_mult.items():
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise ValueError(f"lr multiplier for {k!r} must be a finite number >= 0, got {v!r}")


def param_groups(model: nn.Module, spec: GroupSpec, base_lr: float, optimizer_params: Optional[dict] = None,
                 muon: bool = False) -> list[dict]:
    """One group per kind present: {"name", "params", "weight_decay", "lr"} (matrix first, so
    `engine.get_lr()[0]` is the hidden matrices' lr). Under Muon the base lr of each half honours
    the config's `muon_lr` / `adam_lr` when set."""
    optimizer_params = optimizer_params or {}
    by_kind: dict[str, list] = {k: [] for k in KINDS}
    for name, p in model.named_parameters():
        if p.requires_grad:
            by_kind[param_kind(name, p)].append(p)
    groups = []
    for kind in KINDS:
        if not by_kind[kind]:
            continue
        base = base_lr
        if muon:
            base = optimizer_params.get("muon_lr" if kind in MUON_KINDS else "adam_lr", base_lr)
        groups.append({"name": kind, "params": by_kind[kind],
                       "weight_decay": 0.0 if kind in spec.no_decay else float(spec.weight_decay),
                       "lr": float(base) * float(spec.lr_mult.get(kind, 1.0))})
    return groups


@contextlib.contextmanager
def muon_assignment() -> Iterator[None]:
    """While active, DeepSpeed's Muon tagging (`deepspeed.set_optimizer_flags`, called by
    deepspeed.initialize and again by the engine after AutoEP builds expert parameters) puts
    exactly the "matrix" kind on Muon; everything else (router, embeddings, head, norms) goes to
    the auxiliary AdamW. Restores DeepSpeed's function on exit."""
    from megamoe.parallel import deepspeed_compat

    def retag(model):
        for name, p in model.named_parameters():
            if hasattr(p, "use_muon"):  # tagged: the optimizer is Muon
                p.use_muon = param_kind(name, p) in MUON_KINDS
                if not p.use_muon:
                    p.muon_num_heads, p.muon_head_dim = None, None

    with deepspeed_compat.optimizer_flags_hook(retag):
        yield


def describe_optimizer_groups(engine) -> list[dict]:
    """What the engine's optimizer actually holds: per group {"name", "lr", "weight_decay",
    "use_muon", "params": [parameter names]} (for logs and tests; works for ZeRO 0-3)."""
    opt = engine.optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    groups = getattr(opt, "optimizer", opt).param_groups
    for attr in ("bit16_groups", "fp16_groups", "bf16_groups"):  # ZeRO-1/2, ZeRO-3, bf16 optimizer
        held = getattr(opt, attr, None)
        if held is not None and len(held) == len(groups):
            break
    else:
        held = [g["params"] for g in groups]
    return [{"name": g.get("name"), "lr": g.get("lr"), "weight_decay": g.get("weight_decay"),
             "use_muon": bool(g.get("use_muon", False)), "params": [names.get(id(p), "?") for p in ps]}
            for g, ps in zip(groups, held)]


def format_groups(described: list[dict]) -> str:
    lines = []
    for g in described:
        lines.append(f"  {g['name']}: {len(g['params'])} tensors, {'Muon' if g['use_muon'] else 'AdamW'}, "
                     f"lr {g['lr']:.3e}, weight decay {g['weight_decay']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# QK-clip
# ----------------------------------------------------------------------------------------------
def _unwrap(m: nn.Module) -> nn.Module:
    return getattr(m, "module", m)


def qk_row_scales(attn: nn.Module, gamma_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row factors (fp32) for the q projection [N*(Dn+Dr)] and wkv_b [N*(Dn+Dv)] of one MLA."""
    N, Dn, Dr, Dv = attn.n_heads, attn.nope_dim, attn.rope_dim, attn.v_dim
    g = gamma_N.float().reshape(N, 1)
    root = torch.sqrt(g)
    q_R = torch.cat([root.expand(N, Dn), g.expand(N, Dr)], dim=1).reshape(-1)
    kv_R = torch.cat([root.expand(N, Dn), torch.ones(N, Dv)], dim=1).reshape(-1)
    return q_R, kv_R


def _flat_scale(row_scale_R: torch.Tensor, cols: int, start: int, numel: int, device) -> torch.Tensor:
    """Factors for the flat range [start, start+numel) of a row-major [R, cols] matrix (1 past the end)."""
    idx = torch.arange(start, start + numel, device=device) // cols
    valid = idx < row_scale_R.numel()
    out = torch.ones(numel, dtype=torch.float32, device=device)
    out[valid] = row_scale_R.to(device)[idx[valid]]
    return out


@torch.no_grad()
def scale_rows_everywhere(param: nn.Parameter, row_scale_R: torch.Tensor, optimizer=None) -> None:
    """param[r, :] *= row_scale_R[r], applied to the optimizer's fp32 master copy (the part this
    rank owns) and to the low-precision weights the next forward reads. Collective for ZeRO
    params (every rank of the param's group must call it for the same params in the same order).
    `optimizer`: the engine's optimizer, needed to find ZeRO-0 bf16 masters (FP16_Optimizer)."""
    if hasattr(param, "ds_id"):                                   # ZeRO-3
        opt = param._z3_optimizer
        shape = tuple(param.ds_shape)
        local = opt.get_local_fp32_param(param)
        if local is None:  # frozen
            return
        r = opt._get_param_partition_rank(param)
        scaled = local * _flat_scale(row_scale_R, shape[1], r * local.numel(), local.numel(), local.device)
        opt.set_local_hp_param(scaled, param)
        param.ds_tensor.data.copy_(scaled.view_as(param.ds_tensor).to(param.ds_tensor.dtype))
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        if param.ds_status == ZeroParamStatus.AVAILABLE and param.data.numel() == param.ds_numel:
            full = opt._fp32_state_allgather(param, scaled)  # persistent param: whole on every rank
            param.data.copy_(full.view(param.data.shape).to(param.dtype))
        return
    if hasattr(param, "_hp_mapping"):                             # ZeRO-1/2, bf16 optimizer
        mapping = param._hp_mapping
        if mapping is not None:
            addr = mapping.lp_fragment_address
            hp = mapping.get_hp_fragment()
            hp.data.mul_(_flat_scale(row_scale_R, param.shape[1], addr.start, addr.numel, hp.device))
        full = param.get_full_hp_param()                          # all-reduce of the owners' masters
        param.data.copy_(full.to(param.dtype))
        return
    master = _fp16_optimizer_master(optimizer, param) if optimizer is not None else None
    if master is not None:                                        # ZeRO-0 bf16: FP16_Optimizer masters
        master.mul_(row_scale_R.to(master.device).unsqueeze(1))
        param.data.copy_(master.to(param.dtype))
        return
    # no master copy (plain model, ZeRO-0 fp32): the weight itself, scaled in fp32 and rounded once
    param.data.copy_((param.data.float() * row_scale_R.to(param.device).unsqueeze(1)).to(param.dtype))


def _fp16_optimizer_master(optimizer, param) -> Optional[torch.Tensor]:
    """The fp32 master of `param` in DeepSpeed's FP16_Optimizer (ZeRO-0 with bf16: one flat fp32
    copy per group, params packed in order) or FP16_UnfusedOptimizer (one fp32 copy per param)."""
    groups = getattr(optimizer, "fp16_groups", None)
    if groups is None:
        return None
    for gi, params in enumerate(groups):
        off = 0
        for j, p in enumerate(params):
            if p is param:
                if hasattr(optimizer, "fp32_groups_flat"):
                    return optimizer.fp32_groups_flat[gi].data.narrow(0, off, p.numel()).view(p.shape)
                if hasattr(optimizer, "fp32_groups"):
                    return optimizer.fp32_groups[gi][j].data
                return None
            off += p.numel()
    return None


class QKClip:
    """MuonClip's QK-clip for every MLA of a megamoe Transformer (plain or inside an engine).

        clip = QKClip(engine, tau=100.0)   # turns on max-logit tracking
        ... forward/backward, engine.step() ...
        stats = clip.step()                 # after every optimizer step
        clip.discard()                      # after forwards that were not trained on (eval, skipped step)
    """

    def __init__(self, engine_or_model: nn.Module, tau: float):
        if not (tau > 0 and math.isfinite(tau)):
            raise ValueError(f"QK-clip tau must be a positive finite number, got {tau!r}")
        self.tau = float(tau)
        self.model = _unwrap(engine_or_model)
        self.optimizer = getattr(engine_or_model, "optimizer", None)  # None for a bare model
        if not hasattr(self.model, "attention_modules"):
            raise TypeError("QKClip needs a megamoe Transformer (attention_modules / pop_max_logits)")
        self.model.set_track_max_logit(True)

    def discard(self) -> None:
        self.model.pop_max_logits()

    def global_max_logits(self) -> torch.Tensor:
        """[L_attn, N] max logits since the last call, MAX-reduced over all ranks."""
        import torch.distributed as dist

        from megamoe.distributed import all_reduce_host
        from megamoe.syncs import to_host
        m = to_host(self.model.pop_max_logits().float())   # QK-clip's one host read per step
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            all_reduce_host(m, op=dist.ReduceOp.MAX)
        return m

    @torch.no_grad()
    def step(self) -> dict:
        """Clip after an optimizer step. Returns {"max_logits" [L,N], "gamma" [L,N],
        "clipped" [L,N] bool} (identical on every rank)."""
        max_LN = self.global_max_logits()
        gamma_LN = torch.where(max_LN > self.tau, self.tau / max_LN, torch.ones_like(max_LN))
        clipped_LN = gamma_LN < 1.0
        clipped_layers = clipped_LN.numpy().any(axis=1)   # host tensors: no device read
        for li, attn in enumerate(self.model.attention_modules()):
            if not clipped_layers[li]:
                continue
            q_R, kv_R = qk_row_scales(attn, gamma_LN[li])
            wq = attn.wq if getattr(attn, "wq", None) is not None else attn.wq_b
            scale_rows_everywhere(wq.weight, q_R, self.optimizer)
            scale_rows_everywhere(attn.wkv_b.weight, kv_R, self.optimizer)
        return {"max_logits": max_LN, "gamma": gamma_LN, "clipped": clipped_LN}


def qk_clip_scalars(stats: dict) -> dict[str, float]:
    """TensorBoard scalars of one QK-clip step: global and per-layer max logit, clipped head counts."""
    m, c = stats["max_logits"].numpy(), stats["clipped"].numpy()   # host tensors (global_max_logits)
    out = {"qk_clip/max_logit": float(m.max()), "qk_clip/clipped_heads": int(c.sum())}
    for li in range(m.shape[0]):
        out[f"qk_clip/max_logit/layer_{li}"] = float(m[li].max())
        out[f"qk_clip/clipped_heads/layer_{li}"] = int(c[li].sum())
    return out
