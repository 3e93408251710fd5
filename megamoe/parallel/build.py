"""Build the model where it lives: each rank makes only its share, on its device.

The model is laid out on the meta device (no memory), then materialised block by block
(megamoe.model.init): dense weights on this rank's device; under ZeRO-3 each block is partitioned
as soon as it holds its values (what `deepspeed.zero.Init` does to a model built inside it);
with expert parallelism the routed experts stay on meta until AutoEP asks for this rank's slice
(megamoe.parallel.expert.initialize), so no rank ever holds every expert. The initial values
depend only on the seed and the parameter's name (and expert id), so every layout starts from
the same model.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from megamoe.config import ModelConfig
from megamoe.parallel.expert import MOE_LAYER_PATTERN


def build_model(cfg: ModelConfig, seed: int, ds_config: dict, use_autoep: bool, device,
                whole: bool = False) -> nn.Module:
    """This rank's share of the model for `deepspeed.initialize` through `expert.initialize`.
    `whole`: every parameter built on `device` (to load a state dict into it first)."""
    dtype, partition = None, None
    if not whole and int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3:
        from megamoe.parallel.deepspeed_compat import zero3_partitioner
        dtype, partition = zero3_partitioner(ds_config)
    defer: Optional[str] = MOE_LAYER_PATTERN if use_autoep and not whole else None
    return cfg.build(seed=seed, device=device, dtype=dtype, defer_experts_of=defer, partition=partition)
