"""Initial values that do not depend on where a parameter lives.

Every parameter draws from its own generator, seeded by (seed, parameter name), and every routed
expert from its own, seeded by (seed, name, expert id). So a rank can build just its share, the
dense weights once and only the experts of its EP slice, and still hold exactly what the same
slice of a whole model built in one process would hold: the same seed gives the same model at
every world size, ZeRO stage and EP size (torchtitan and Megatron-Core seed per parameter or per
rank for the same reason; a single generator walked through the whole model, as before, ties a
parameter's values to every parameter drawn before it).

Values are drawn on the device the parameter is built on (a CUDA generator on GPUs: drawing
billions of values on the host would take minutes), so a CPU-built and a GPU-built model differ,
as torch's CPU and CUDA generators do; any layout on one device type agrees.

  build_on_meta(cfg)                   the module tree with no storage (shapes only)
  materialize(model, seed, device)     storage on `device`, initial values, buffers
  initial_values(cfg, name, ...)       one parameter's (or one expert slice's) values
"""
from __future__ import annotations

import hashlib
import math
import re
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn

from megamoe.config import ModelConfig

# Output projections (attention wo, every down_proj) start smaller, by 1/sqrt(2 * num_layers), as
# GPT-2 and DeepSeek do: the residual stream adds one of each per layer.
_OUTPUT_PROJECTIONS = ("wo.weight", "down_proj.weight", "down_proj")
_ROUTED_EXPERT_LEAVES = (".experts.gate_up_proj", ".experts.down_proj")


def is_routed_expert(name: str) -> bool:
    """`name` is a routed-experts tensor [E, ...] (not a shared expert's)."""
    return name.endswith(_ROUTED_EXPERT_LEAVES)


def seed_of(seed: int, name: str, expert: Optional[int] = None) -> int:
    """A 63-bit generator seed for one parameter (or one expert of it); a hash, not Python's
    salted hash(), so every process and every run agrees."""
    key = f"{seed}/{name}" if expert is None else f"{seed}/{name}/{expert}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def _normal(shape, std: float, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.empty(shape, device=device).normal_(0.0, std, generator=gen)


def initial_values(cfg: ModelConfig, name: str, shape, seed: int, device="cpu",
                   experts: Optional[range] = None) -> torch.Tensor:
    """fp32 values of parameter `name` (native names, as `Transformer.named_parameters`): norms 1,
    matrices N(0, initializer_range), output projections scaled down. For a routed-experts tensor
    `shape` is the slice's and `experts` the global expert ids it holds (default: all)."""
    device = torch.device(device)
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device)
    std = cfg.initializer_range
    if name.endswith(_OUTPUT_PROJECTIONS):
        std /= math.sqrt(2 * cfg.num_hidden_layers)
    if not is_routed_expert(name):
        return _normal(shape, std, seed_of(seed, name), device)
    experts = range(shape[0]) if experts is None else experts
    if len(experts) != shape[0]:
        raise ValueError(f"{name}: {len(experts)} expert ids for a slice of {shape[0]} experts")
    out = torch.empty(shape, device=device)
    for i, e in enumerate(experts):
        out[i] = _normal(shape[1:], std, seed_of(seed, name, e), device)
    return out


def build_on_meta(cfg: ModelConfig) -> nn.Module:
    """The Transformer with every parameter and buffer on the meta device: no memory, no time."""
    from megamoe.model.transformer import Transformer
    with torch.device("meta"):
        return Transformer(cfg)


@torch.no_grad()
def materialize(model: nn.Module, seed: int, device="cpu", dtype: Optional[torch.dtype] = None,
                defer_experts_of: Optional[str] = None,
                partition: Optional[Callable[[list[nn.Parameter]], None]] = None) -> nn.Module:
    """Give every meta parameter of `model` storage on `device` (in `dtype`, default fp32) and its
    initial values, and rebuild the buffers there, one block (embedding, layer, head, ...) at a
    time. Tied weights stay tied.
    `defer_experts_of`: the routed experts of MoE blocks whose name fully matches this regex stay
    on meta; expert parallelism builds only this rank's slice of them later
    (`megamoe.parallel.expert.initialize`, through the `ExpertSlices` left on the module).
    `partition(params)`: called with each block's new parameters once they hold their values
    (ZeRO-3 partitions them there, so a rank never holds more than one whole block)."""
    device = torch.device(device)
    defer = re.compile(defer_experts_of) if defer_experts_of is not None else None
    built: dict[int, nn.Parameter] = {}
    for prefix, block in _blocks(model):
        new = []
        for module_name, module in block.named_modules(prefix=prefix):
            for leaf, p in list(module._parameters.items()):
                if p is None or not p.is_meta:
                    continue
                name = f"{module_name}.{leaf}"
                if defer is not None and is_routed_expert(name) and defer.fullmatch(module_name.rpartition(".")[0]):
                    module.expert_slices = ExpertSlices(model.cfg, module_name, seed, device, dtype or p.dtype)
                    continue
                if id(p) not in built:
                    values = initial_values(model.cfg, name, p.shape, seed, device)
                    built[id(p)] = nn.Parameter(values.to(dtype or p.dtype), requires_grad=p.requires_grad)
                    new.append(built[id(p)])
                module._parameters[leaf] = built[id(p)]
            if hasattr(module, "reset_buffers"):
                module.reset_buffers(device)
        if partition is not None and new:
            partition(new)
    return model


def _blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of the model's children, each layer of a ModuleList on its own."""
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            yield from ((f"{name}.{i}", layer) for i, layer in enumerate(child))
        else:
            yield name, child


class ExpertSlices:
    """What an expert-parallel layer needs to build its local experts from a meta `GroupedExperts`:
    (gate_up_proj [n, 2I, H], down_proj [n, H, I]) for global experts start..end-1, equal to the
    same rows of the whole model's tensors, on the device and in the dtype of the rest."""

    def __init__(self, cfg: ModelConfig, prefix: str, seed: int, device: torch.device, dtype: torch.dtype):
        self.cfg, self.prefix, self.seed, self.device, self.dtype = cfg, prefix, seed, device, dtype

    def build(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        H, I, n = self.cfg.hidden_size, self.cfg.moe_intermediate_size, end - start
        ids = range(start, end)
        values = (initial_values(self.cfg, f"{self.prefix}.gate_up_proj", (n, 2 * I, H), self.seed, self.device, ids),
                  initial_values(self.cfg, f"{self.prefix}.down_proj", (n, H, I), self.seed, self.device, ids))
        return tuple(v.to(self.dtype) for v in values)
