"""Write a real DeepSpeed checkpoint of the tiny MoE model for the export tests (2 CPU ranks).

    torchrun --nproc_per_node 2 tests/export/make_checkpoint.py SAVE_DIR ZERO_STAGE EP_SIZE [TOKENIZER]

Trains 3 optimizer steps in fp32 with DeepSpeed AutoEP (expert parallel, `expert_parallel` block)
under the given ZeRO stage, saves `SAVE_DIR/global_step3` with engine.save_checkpoint, writes
megamoe_state.json per the checkpoint contract and `latest`, then dumps the logits the ENGINE
computes on a fixed input (`SAVE_DIR/reference.pt`), so the export is compared against the
trained, sharded model itself rather than a copy of it.

Goes through megamoe.parallel.expert.initialize, as the trainer does: AutoEP with megamoe's own
router (group-limited routing and the aux losses included) inside the expert-parallel layers.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from megamoe.config import ModelConfig
from megamoe.distributed import init_distributed, rank, world_size
from megamoe.parallel.expert import initialize

STEPS = 3
SEED = 1234


def test_config() -> ModelConfig:
    return ModelConfig.load("tiny")  # group-limited sigmoid routing, balance and z losses on


def ds_config(zero_stage: int, ep_size: int, cfg: ModelConfig) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 1000,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": zero_stage},
        "gradient_clipping": 1.0,
    }


def main() -> None:
    save_dir, zero_stage, ep_size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    tokenizer = sys.argv[4] if len(sys.argv) > 4 else None
    init_distributed()
    cfg = test_config()
    model = cfg.build(seed=SEED)
    # a non-zero selection bias, so the export has to carry it (DeepSpeed never updates it)
    gen = torch.Generator().manual_seed(7)
    for _, router in model.routers():
        router.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=gen) * 0.05)
    conf = ds_config(zero_stage, ep_size, cfg)
    engine, *_ = initialize(model, cfg, conf, ep_size, model_parameters=model.parameters())

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
