"""Write a real DeepSpeed checkpoint of the tiny MoE model for the export tests (2 CPU ranks).

    torchrun --nproc_per_node 2 tests/export/make_checkpoint.py SAVE_DIR ZERO_STAGE EP_SIZE [TOKENIZER]

Trains 3 optimizer steps in fp32 with DeepSpeed AutoEP (expert parallel, `expert_parallel` block)
under the given ZeRO stage, saves `SAVE_DIR/global_step3` with engine.save_checkpoint, writes
megamoe_state.json per the checkpoint contract and `latest`, then dumps the logits the ENGINE
computes on a fixed input (`SAVE_DIR/reference.pt`), so the export is compared against the
trained, sharded model itself rather than a copy of it.

Uses megamoe.parallel.expert.initialize when it exists; until then a local AutoEP config with the
project's module names (the router is DeepSpeed's TokenChoiceTopKRouter, given the few attributes
our Transformer.forward reads).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from megamoe.config import ModelConfig
from megamoe.distributed import init_distributed, rank, world_size

STEPS = 3
SEED = 1234


def test_config() -> ModelConfig:
    # n_group=1: DeepSpeed's own router (used until parallel/expert.py installs ours) scores groups
    # differently from DeepSeek-V3's top-2 sum unless told, so keep group-limited routing off here.
    return ModelConfig.load("tiny", n_group=1, topk_group=1, aux_loss_alpha=0.0, router_z_loss_coef=0.0)


def ds_config(zero_stage: int, ep_size: int, cfg: ModelConfig) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 1000,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": zero_stage},
        "gradient_clipping": 1.0,
        "expert_parallel": {
            "enabled": True, "autoep_size": ep_size, "use_grouped_mm": True,
            "moe_layer_pattern": r"layers\.\d+\.ffn", "router_pattern": "router", "expert_pattern": "experts",
            "expert_w1": "gate_up_proj", "expert_w2": "down_proj", "expert_w3": None,
            "top_k": cfg.num_experts_per_tok, "score_func": cfg.scoring_func, "route_norm": cfg.norm_topk_prob,
            "route_scale": cfg.routed_scaling_factor,
            "has_shared_experts": cfg.n_shared_experts > 0, "shared_experts_pattern": "shared_experts",
        },
    }


class _LMHeadThroughModule:
    """Stand-in for `torch.nn.functional` inside megamoe.model.transformer (ZeRO-3 workaround).

    Transformer.forward computes logits as F.linear(h, lm_head.weight), outside lm_head's own
    forward, so ZeRO-3 never re-gathers that weight for backward ("size of tensor a (0) must
    match ... 64"). Routing that one call through the lm_head module fixes it; the model should
    call self.lm_head(h) itself (reported to the model owner)."""

    def __init__(self, model):
        import torch.nn.functional as F
        self._F, self._model = F, model

    def __getattr__(self, name):
        return getattr(self._F, name)

    def linear(self, x, w, b=None):
        head = self._model.lm_head
        if head is not None and w is head.weight and b is None:
            return head(x)
        return self._F.linear(x, w, b)


def main() -> None:
    save_dir, zero_stage, ep_size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    tokenizer = sys.argv[4] if len(sys.argv) > 4 else None
    init_distributed()
    import deepspeed

    cfg = test_config()
    model = cfg.build(seed=SEED)
    # a non-zero selection bias, so the export has to carry it (DeepSpeed never updates it)
    gen = torch.Generator().manual_seed(7)
    for _, router in model.routers():
        router.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=gen) * 0.05)
    conf = ds_config(zero_stage, ep_size, cfg)
    if zero_stage == 3:
        import megamoe.model.transformer as tmod
        tmod.F = _LMHeadThroughModule(model)
    try:
        from megamoe.parallel import expert as ep_mod  # noqa: F401
        engine, *_ = ep_mod.initialize(model, cfg, conf, ep_size)
    except (ImportError, AttributeError):
        engine, *_ = deepspeed.initialize(model=model, config=conf, model_parameters=model.parameters())
        for layer in engine.module.layers:
            r = getattr(layer.ffn, "router", None)
            if r is not None and not hasattr(r, "last_tokens_per_expert"):
                r.last_tokens_per_expert = torch.zeros(cfg.n_routed_experts, dtype=torch.int32)
                r.last_aux_loss = torch.zeros(())
                r.last_z_loss = torch.zeros(())

    data_gen = torch.Generator().manual_seed(100 + rank())
    for _ in range(STEPS):
        ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=data_gen)
        out = engine(ids[:, :-1], labels=ids[:, 1:])
        engine.backward(out.loss)
        engine.step()

    tag = f"global_step{STEPS}"
    engine.save_checkpoint(str(save_dir), tag=tag)
    # the engine's own logits on a fixed input (same input on every rank: EP needs all ranks)
    engine.eval()
    probe = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(999))
    with torch.no_grad():
        logits = engine(probe).logits.float()
    torch.distributed.barrier()
    if rank() == 0:
        state = {"format": "megamoe-checkpoint-v1", "step": STEPS, "consumed_samples": STEPS * 2 * world_size(),
                 "consumed_samples_per_dataset": [STEPS * 2 * world_size()], "model_config": cfg.to_dict(),
                 "tokenizer": tokenizer, "ep_size": ep_size, "world_size": world_size(),
                 "zero_stage": zero_stage, "ds_config": conf, "args": {}}
        (save_dir / tag / "megamoe_state.json").write_text(json.dumps(state, indent=2))
        torch.save({"input_ids": probe, "logits": logits}, save_dir / "reference.pt")
        tmp = save_dir / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, save_dir / "latest")
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
