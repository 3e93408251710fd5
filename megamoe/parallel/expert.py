"""Expert parallelism through DeepSpeed AutoEP, with megamoe's own router inside every EP layer.

DeepSpeed's AutoEP (the `"expert_parallel"` block of a DeepSpeed config) runs inside
`deepspeed.initialize`: it finds each MoE block by a regex on module names, builds the
expert-parallel process groups and replaces the block with an `AutoEPMoELayer` that keeps only
this rank's slice of the routed experts and exchanges tokens with an uneven all-to-all. The user
gives only the EP size; everything else in the block is derived from the `ModelConfig`
(`expert_parallel_config`).

One routing implementation serves every path. AutoEP would build its own `TokenChoiceTopKRouter`,
which has no balance loss, no z-loss and no token accounting for aux-loss-free balancing. While
`deepspeed.initialize` runs, `initialize` below puts a factory in place of that class name in
`deepspeed.module_inject.auto_ep_layer`; the factory returns an `ExpertParallelRouter`: megamoe's
`Router` (same scoring, bias, group limit, top-k, normalisation, balance loss and z-loss,
token counts) plus the `.gate` view through which AutoEP copies the source router's weight.
AutoEP then copies the weight and the `e_score_correction_bias` buffer into it as it would into
its own router, and marks its parameters for data-parallel reduction. Doing this during
`deepspeed.initialize` (not by swapping routers afterwards) matters for ZeRO-3: the engine
partitions parameters and installs its gather hooks on the modules it finds at that point, so the
router must already be ours. DeepSpeed 0.19.8 offers no preset/adapter hook for the router class
(adapters only resolve layouts, group routing and output recorders), hence the name substitution,
restored when the call returns. It is not thread-safe, which is fine: initialize runs once per
process, before training.

After initialization every AutoEP layer is checked to hold a megamoe Router; anything else is an
error rather than a silently different routing.

Parameter names after AutoEP (what checkpoints contain, per MoE layer i):
  layers.{i}.ffn.router.weight, layers.{i}.ffn.router.e_score_correction_bias   (unchanged)
  layers.{i}.ffn.experts.w1 / w3 / w2   [E/ep, I, H], [E/ep, I, H], [E/ep, H, I]   (local experts;
      w1 = gate rows, w3 = up rows of our gate_up_proj; w2 = down_proj)
  layers.{i}.ffn.shared_experts.*                                                (unchanged)
ZeRO-1/2 checkpoints store experts one file per global expert,
`layer_{l}_expert_{e}_mp_rank_00_model_states.pt`, where l counts MoE layers (0, 1, ...), not
model layers. `native_expert_state_dict` / `autoep_expert_state_dict` convert full (all-expert)
tensors between the two naming schemes. With ep_size 1 (and use_autoep unset) the plain model
runs, so its checkpoints have the native names and an AutoEP checkpoint does not load into it
(missing gate_up_proj/down_proj keys): resume at another EP size through DeepSpeed universal
checkpoints with use_autoep=True.
"""
from __future__ import annotations

import contextlib
import copy
import re
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megamoe.config import ModelConfig
from megamoe.model import dispatch
from megamoe.model.moe import Router
from megamoe.parallel import deepspeed_compat

EP_FLAG = "--expert-model-parallel-size"

# Names inside our model that the AutoEP block points at (see megamoe/model/moe.py, transformer.py).
MOE_LAYER_PATTERN = r"layers\.\d+\.ffn"
ROUTER_NAME = "router"
EXPERTS_NAME = "experts"
SHARED_EXPERTS_NAME = "shared_experts"
EXPERT_W1 = "gate_up_proj"   # [E, 2I, H], gate rows first: AutoEP splits it into w1 (gate), w3 (up)
EXPERT_W2 = "down_proj"      # [E, H, I]

# Keys of a user-given "expert_parallel" block that would break the derived mapping or route
# around our router; any other key (comm_backend, async_split_plan, use_grouped_mm, ...) may be tuned.
_STRUCTURAL_KEYS = ("enabled", "autoep_size", "preset_model", "moe_layer_pattern", "router_pattern",
                    "expert_pattern", "expert_w1", "expert_w2", "expert_w3", "top_k", "score_func",
                    "route_norm", "route_scale", "routed_scaling_factor", "num_expert_groups",
                    "num_limited_groups", "has_shared_experts", "shared_experts_pattern",
                    "load_balance_coeff", "expert_activation", "score_apply")


class ExpertParallelError(ValueError):
    """An expert-parallel setting is inconsistent; the message names the flag or field to change."""


# ----------------------------------------------------------------------------------------------
# The router AutoEP builds
# ----------------------------------------------------------------------------------------------
class _GateView:
    """What AutoEPMoELayer expects at `router.gate`: `.weight` (our router's own Parameter, so
    AutoEP's copy writes straight into it), `.bias` (none) and a call giving the logits."""

    __slots__ = ("_router",)

    def __init__(self, router: Router):
        self._router = router

    @property
    def weight(self) -> nn.Parameter:
        return self._router.weight

    bias = None

    def __call__(self, x_TH: torch.Tensor) -> torch.Tensor:
        return F.linear(x_TH, self._router.weight)


class ExpertParallelRouter(Router):
    """megamoe's Router, plus the `.gate` view AutoEP uses to copy the source router's weight.

    Same parameters and buffers as Router (`weight`, `e_score_correction_bias`,
    `tokens_per_expert_acc`), so state-dict names do not change under expert parallelism.
    """

    @property
    def gate(self) -> _GateView:
        return _GateView(self)


def _router_factory(model_cfg: ModelConfig):
    """A stand-in for TokenChoiceTopKRouter(...) that builds our router from the model config,
    after checking that what AutoEP resolved from the config block matches the model."""
    expected = expected_router_settings(model_cfg)

    def build(**kwargs: Any) -> ExpertParallelRouter:
        got = {k: kwargs.get(k) for k in expected}
        mismatched = {k: (got[k], expected[k]) for k in expected
                      if not (got[k] == expected[k] or (isinstance(expected[k], float)
                                                        and abs(float(got[k]) - expected[k]) < 1e-12))}
        if mismatched:
            details = ", ".join(f"{k}: AutoEP resolved {g!r}, model config says {e!r}"
                                for k, (g, e) in mismatched.items())
            raise ExpertParallelError(
                "the expert_parallel block of the DeepSpeed config does not describe this model "
                f"({details}). Remove these keys from the block: megamoe derives it from the model config.")
        return ExpertParallelRouter(model_cfg)

    return build


def expected_router_settings(model_cfg: ModelConfig) -> dict:
    """The TokenChoiceTopKRouter arguments AutoEP should resolve from our block."""
    groups = model_cfg.n_group if model_cfg.n_group > 1 else None
    return {
        "dim": model_cfg.hidden_size,
        "num_experts": model_cfg.n_routed_experts,
        "top_k": model_cfg.num_experts_per_tok,
        "score_func": model_cfg.scoring_func,
        "route_norm": bool(model_cfg.norm_topk_prob),
        "route_scale": float(model_cfg.routed_scaling_factor),
        "num_expert_groups": groups,
        "num_limited_groups": model_cfg.topk_group if groups else None,
    }


@contextlib.contextmanager
def megamoe_router_in_autoep(model_cfg: ModelConfig) -> Iterator[None]:
    """While active, every AutoEPMoELayer built gets an ExpertParallelRouter for `model_cfg`.

    Replaces the module-level name `TokenChoiceTopKRouter` that AutoEPMoELayer.__init__ looks up
    (parallel/deepspeed_compat.py) and restores it on exit. Not thread-safe; meant to wrap one
    deepspeed.initialize call.
    """
    with deepspeed_compat.autoep_router_class(_router_factory(model_cfg)):
        yield


# ----------------------------------------------------------------------------------------------
# The config block
# ----------------------------------------------------------------------------------------------
def check_ep_size(model_cfg: ModelConfig, ep_size: int, world_size: Optional[int] = None) -> None:
    """Clear errors for an EP size the model or the world cannot take."""
    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1:
        raise ExpertParallelError(f"{EP_FLAG} must be a positive integer, got {ep_size!r}")
    if ep_size > 1 and not model_cfg.is_moe:
        raise ExpertParallelError(
            f"{EP_FLAG}={ep_size} but the model has no routed experts (n_routed_experts=0): "
            f"expert parallelism needs an MoE model; use {EP_FLAG} 1 for dense models")
    if model_cfg.is_moe and model_cfg.n_routed_experts % ep_size:
        divisors = [d for d in range(1, model_cfg.n_routed_experts + 1) if model_cfg.n_routed_experts % d == 0]
        raise ExpertParallelError(
            f"{EP_FLAG}={ep_size} does not divide n_routed_experts={model_cfg.n_routed_experts}: "
            f"every rank must own the same number of experts; choose one of {divisors}")
    if world_size is not None and world_size % ep_size:
        raise ExpertParallelError(
            f"{EP_FLAG}={ep_size} does not divide the world size {world_size}: ranks form groups of "
            f"{EP_FLAG} ranks that together hold all experts; choose a divisor of {world_size}")


def expert_parallel_config(model_cfg: ModelConfig, ep_size: int) -> dict:
    """The DeepSpeed `"expert_parallel"` block for `model_cfg` at expert-parallel size `ep_size`.

    Schema: deepspeed/module_inject/auto_ep_config.py (parse_autoep_config). A custom preset
    (moe_layer_pattern set, no preset_model) because our module names are megamoe's, not HF's.
    No load_balance_coeff: the balancing bias lives in our router (megamoe.parallel.balance).
    """
    check_ep_size(model_cfg, ep_size)
    if not model_cfg.is_moe:
        raise ExpertParallelError("expert_parallel_config: the model has no routed experts (n_routed_experts=0)")
    s = expected_router_settings(model_cfg)
    block = {
        "enabled": True,
        "autoep_size": ep_size,
        "moe_layer_pattern": MOE_LAYER_PATTERN,   # dense layers match too but have no `experts` child
        "router_pattern": ROUTER_NAME,
        "expert_pattern": EXPERTS_NAME,
        "expert_w1": EXPERT_W1,
        "expert_w2": EXPERT_W2,
        "expert_w3": None,                        # fused gate+up in expert_w1
        "expert_activation": "swiglu",
        "top_k": s["top_k"],
        "score_func": s["score_func"],
        "score_apply": "post",                    # weights multiply expert outputs, as in MoE.forward
        "route_norm": s["route_norm"],
        "route_scale": s["route_scale"],
        "routed_scaling_factor": s["route_scale"],
        "has_shared_experts": model_cfg.n_shared_experts > 0,
        "use_grouped_mm": True,
    }
    if model_cfg.n_shared_experts > 0:
        block["shared_experts_pattern"] = SHARED_EXPERTS_NAME
    if s["num_expert_groups"] is not None:
        block["num_expert_groups"] = s["num_expert_groups"]
        block["num_limited_groups"] = s["num_limited_groups"]
    return block


def accelerator_tuning() -> dict:
    """AutoEP keys that pay off on CUDA only (a user's block still wins):
    async_split_plan: the all-to-all sizes are copied to the host on a side stream right after
        routing, and the host waits on an event just before the all-to-all, instead of stalling
        the stream at the split plan;
    gate_up_impl fused: gate and up projections as one grouped GEMM (torch._grouped_mm, sm_90+;
        older GPUs take DeepSpeed's Triton grouped GEMM, which does not fuse them);
    combine_impl fused_weighted_sum (with Triton): the weighted sum over each token's K expert
        outputs in one Triton kernel, fp32 in registers, where the default scatters the rows into
        a zero-filled [T*K, H] buffer and multiplies it into an fp32 [T, K, H] one (0.8 GB per
        layer at V2-Lite's micro batch 4). DeepSpeed writes the kernel to keep the eager
        product's fp32 rounding (no FMA contraction); not yet run on a GPU here. (CPU tokens get
        the default's sum, bit for bit, from megamoe's Combine: deepspeed_compat.autoep_gathers_on_cpu.)"""
    import torch

    from megamoe.distributed import device
    dev = device()
    if dev.type != "cuda":
        return {}
    tuning = {"async_split_plan": True}
    if torch.cuda.get_device_capability(dev) >= (9, 0):
        tuning["gate_up_impl"] = "fused"
    from deepspeed.ops.triton_ops import autoep_fused_token_ops
    if autoep_fused_token_ops.is_available():
        tuning["combine_impl"] = "fused_weighted_sum"
    return tuning


def _merge_user_block(derived: dict, user: Optional[dict]) -> dict:
    if not user:
        return derived
    conflicts = {k: (user[k], derived.get(k)) for k in _STRUCTURAL_KEYS
                 if k in user and user[k] != derived.get(k)}
    if conflicts:
        details = ", ".join(f"{k}={u!r} (derived: {d!r})" for k, (u, d) in conflicts.items())
        raise ExpertParallelError(
            f"ds_config['expert_parallel'] sets {details}. megamoe derives these from the model config "
            f"and {EP_FLAG}; remove them from the DeepSpeed config (tuning keys such as comm_backend or "
            "async_split_plan may stay).")
    merged = dict(derived)
    merged.update(user)
    return merged


# ----------------------------------------------------------------------------------------------
# deepspeed.initialize with EP
# ----------------------------------------------------------------------------------------------
def _unwrap(engine_or_model: nn.Module) -> nn.Module:
    return getattr(engine_or_model, "module", engine_or_model)


def autoep_layers(engine_or_model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, AutoEPMoELayer) pairs of a model or engine (empty without AutoEP)."""
    try:
        from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
    except ImportError:
        return []
    return [(n, m) for n, m in _unwrap(engine_or_model).named_modules() if isinstance(m, AutoEPMoELayer)]


def verify_megamoe_routers(engine_or_model: nn.Module, model_cfg: Optional[ModelConfig] = None) -> int:
    """Raise unless every AutoEP layer routes with a megamoe Router; returns the layer count."""
    layers = autoep_layers(engine_or_model)
    for name, layer in layers:
        if not isinstance(layer.router, Router):
            raise ExpertParallelError(
                f"AutoEP layer '{name}' routes with {type(layer.router).__module__}."
                f"{type(layer.router).__name__}, not megamoe's Router: the balance loss, z-loss and "
                "bias balancing would be missing. Build the engine with megamoe.parallel.expert.initialize.")
    if model_cfg is not None and layers and len(layers) != len(model_cfg.moe_layer_indices):
        raise ExpertParallelError(
            f"AutoEP replaced {len(layers)} MoE layers but the model config has "
            f"{len(model_cfg.moe_layer_indices)} (layers {model_cfg.moe_layer_indices})")
    return len(layers)


def _broadcast_router_biases(model: nn.Module) -> None:
    """DeepSpeed broadcasts parameters from rank 0 at init, not buffers: make the selection bias
    (a buffer) identical everywhere too, so every rank routes the same way from step 0."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for m in model.modules():
        if isinstance(m, Router):
            dist.broadcast(m.e_score_correction_bias, src=0)


def _local_expert_weights(experts_source: nn.Module, start: int, end: int):
    """This rank's (w1 gate, w2 down, w3 up) for AutoEP, built from the ExpertSlices that
    `materialize` left on routed experts it kept on the meta device; None for built experts."""
    slices = getattr(experts_source, "expert_slices", None)
    if slices is None or not experts_source.gate_up_proj.is_meta:
        return None
    gate_up, down = slices.build(start, end)
    gate, up = gate_up.chunk(2, dim=1)   # gate rows first, as AutoEP splits gate_up_proj
    return gate.contiguous(), down, up.contiguous()


def recomputing_experts(grouped: type) -> type:
    """AutoEP's GroupedExperts (`grouped`), computing through megamoe.model.dispatch.SortedExperts:
    same parameters (w1, w2, w3), same results, but backward keeps the expert-ordered input and
    [gate | up] per routed copy and recomputes silu(gate) * up, where autograd over AutoEP's
    grouped GEMMs keeps gate, up, silu(gate) and the product too (V2-Lite: 2H + 2I instead of
    2H + 4I saved values per copy with the combine's copy of the output; megamoe.plan counts it).
    DeepSpeed's Triton grouped GEMM (chosen on GPUs older than Hopper, where torch._grouped_mm
    falls back to a loop) and activations other than SwiGLU run DeepSpeed's own forward."""

    class RecomputingGroupedExperts(grouped):
        def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
            if self.use_triton_grouped_mm or self.activation != "swiglu":
                return super().forward(x, num_tokens_per_expert)
            offs = num_tokens_per_expert.cumsum(0, dtype=torch.int32)
            w1, w2, w3 = (w.to(x.dtype) for w in (self.w1, self.w2, self.w3))   # as AutoEP casts
            return dispatch.SortedExperts.apply(x, w1, w2, w3, num_tokens_per_expert, offs)

    return RecomputingGroupedExperts


def _check_storage(model: nn.Module, use_autoep: bool) -> None:
    """Only routed experts that AutoEP will slice may still be on the meta device."""
    pattern = re.compile(MOE_LAYER_PATTERN)
    for name, p in model.named_parameters():
        if not p.is_meta:
            continue
        prefix = name.rpartition(".")[0]
        if not (use_autoep and _is_experts(prefix) and pattern.fullmatch(prefix.rpartition(".")[0])):
            raise ExpertParallelError(
                f"parameter {name} has no storage (meta device): build the model with ModelConfig.build(seed, "
                f"device) and leave only the routed experts of expert-parallel layers on meta "
                f"(defer_experts_of=MOE_LAYER_PATTERN, with use_autoep)")


def initialize(model: nn.Module, model_cfg: ModelConfig, ds_config: dict, ep_size: int,
               use_autoep: Optional[bool] = None, **deepspeed_initialize_kwargs):
    """deepspeed.initialize with expert parallelism derived from the model config.

    ep_size > 1 (MoE model): adds the `"expert_parallel"` block (merged with any tuning keys the
    user put in ds_config) and runs our router inside every AutoEP layer. ep_size == 1: the plain
    model (data parallel only), unless `use_autoep=True` asks for AutoEP layers at size 1 (same
    parameter names as ep > 1). Returns deepspeed.initialize's (engine, optimizer, dataloader,
    lr_scheduler). Needs torch.distributed initialised (megamoe.distributed.init_distributed).
    """
    import deepspeed
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    check_ep_size(model_cfg, ep_size, world)
    if use_autoep is None:
        use_autoep = ep_size > 1
    if use_autoep and not model_cfg.is_moe:
        raise ExpertParallelError("use_autoep=True but the model has no routed experts")
    _check_storage(model, use_autoep)
    ds_config = copy.deepcopy(ds_config)
    user_block = ds_config.pop("expert_parallel", None)
    if user_block and user_block.get("enabled", True) and not use_autoep:
        raise ExpertParallelError(
            f"ds_config has an enabled 'expert_parallel' block but {EP_FLAG}={ep_size}: set the EP size "
            f"with {EP_FLAG} and leave the block out (megamoe derives it)")
    if use_autoep:
        derived = {**expert_parallel_config(model_cfg, ep_size), **accelerator_tuning()}
        ds_config["expert_parallel"] = _merge_user_block(derived, user_block)
        with megamoe_router_in_autoep(model_cfg), \
                deepspeed_compat.autoep_local_experts(_local_expert_weights, recomputing_experts):
            out = deepspeed.initialize(model=model, config=ds_config, **deepspeed_initialize_kwargs)
        deepspeed_compat.autoep_gathers_on_cpu()   # CPU tokens move by row gathers, as on CUDA
        n = verify_megamoe_routers(out[0], model_cfg)
        if n == 0:
            raise ExpertParallelError(
                f"AutoEP found no MoE layer matching '{MOE_LAYER_PATTERN}' with '{ROUTER_NAME}' and "
                f"'{EXPERTS_NAME}' children; is this a megamoe Transformer?")
    else:
        out = deepspeed.initialize(model=model, config=ds_config, **deepspeed_initialize_kwargs)
    _broadcast_router_biases(_unwrap(out[0]))
    deepspeed_compat.sync_free_zero_step(out[0])   # no host read per parameter group in the step
    return out


def ep_layout(engine_or_model: nn.Module) -> dict:
    """How experts are laid out on this rank, for logs and the checkpoint EP guard:
    {"autoep": bool, "ep_size": int, "ep_rank": int, "experts_per_rank": int, "n_experts": int,
     "local_experts": [global expert ids on this rank], "moe_layers": [module names]}."""
    layers = autoep_layers(engine_or_model)
    if layers:
        _, first = layers[0]
        start = first.ep_rank * first.num_local_experts
        return {"autoep": True, "ep_size": first.ep_size, "ep_rank": first.ep_rank,
                "experts_per_rank": first.num_local_experts, "n_experts": first.num_experts,
                "local_experts": list(range(start, start + first.num_local_experts)),
                "moe_layers": [n for n, _ in layers]}
    model = _unwrap(engine_or_model)
    routers = [(n, m) for n, m in model.named_modules() if isinstance(m, Router)]
    n_exp = routers[0][1].n_experts if routers else 0
    return {"autoep": False, "ep_size": 1, "ep_rank": 0, "experts_per_rank": n_exp, "n_experts": n_exp,
            "local_experts": list(range(n_exp)), "moe_layers": [n.rsplit(".", 1)[0] for n, _ in routers]}


# ----------------------------------------------------------------------------------------------
# Expert weight names: native (MoE/GroupedExperts) <-> AutoEP (GroupedExperts w1/w2/w3)
# ----------------------------------------------------------------------------------------------
def _is_experts(prefix: str) -> bool:
    """`prefix` names a routed-experts module (its last component is `experts`, so not
    `shared_experts`)."""
    return prefix.rpartition(".")[2] == "experts"


def native_expert_state_dict(state_dict: dict) -> dict:
    """AutoEP expert names -> megamoe's native ones, for full (all-expert) tensors, e.g. from a
    universal checkpoint or gathered from every EP rank: `...experts.w1` [E, I, H] (gate) and
    `...experts.w3` [E, I, H] (up) -> `...experts.gate_up_proj` [E, 2I, H]; `...experts.w2`
    [E, H, I] -> `...experts.down_proj`. Other keys pass through unchanged."""
    out = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if not _is_experts(prefix) or leaf not in ("w1", "w2", "w3"):
            out[key] = value
            continue
        if leaf == "w1":
            up = state_dict.get(f"{prefix}.w3")
            if up is None:
                raise KeyError(f"{key} has no matching {prefix}.w3 (the up projection): cannot build gate_up_proj")
            if up.shape != value.shape:
                raise ValueError(f"{key} {tuple(value.shape)} and {prefix}.w3 {tuple(up.shape)} differ in shape")
            out[f"{prefix}.{EXPERT_W1}"] = torch.cat([value, up], dim=1)
        elif leaf == "w2":
            out[f"{prefix}.{EXPERT_W2}"] = value
        elif f"{prefix}.w1" not in state_dict:
            raise KeyError(f"{key} has no matching {prefix}.w1 (the gate projection)")
    return out


def autoep_expert_state_dict(state_dict: dict) -> dict:
    """The inverse of native_expert_state_dict (full tensors, all experts)."""
    out = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if _is_experts(prefix) and leaf == EXPERT_W1:
            gate, up = value.chunk(2, dim=1)   # gate rows first
            out[f"{prefix}.w1"], out[f"{prefix}.w3"] = gate.contiguous(), up.contiguous()
        elif _is_experts(prefix) and leaf == EXPERT_W2:
            out[f"{prefix}.w2"] = value
        else:
            out[key] = value
    return out
