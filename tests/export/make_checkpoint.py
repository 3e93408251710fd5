"""Write a real DeepSpeed checkpoint of the tiny MoE model for the export tests (2 CPU ranks).

    torchrun --nproc_per_node 2 tests/export/make_checkpoint.py SAVE_DIR ZERO_STAGE EP_SIZE [TOKENIZER] [--muon]

Trains 3 optimizer steps in fp32 with DeepSpeed AutoEP (expert parallel, `expert_parallel` block)
under the given ZeRO stage, saves `SAVE_DIR/global_step3` with engine.save_checkpoint, writes
megamoe_state.json per the checkpoint contract and `latest`, then dumps the logits the ENGINE
computes on a fixed input (`SAVE_DIR/reference.pt`), so the export is compared against the
trained, sharded model itself rather than a copy of it. Each rank also dumps the fp32 master of
every parameter it holds, gathered by DeepSpeed (`deepspeed.utils.safe_get_full_fp32_param`;
expert weights are this rank's experts only) into `SAVE_DIR/masters_rank{R}.pt`.

--muon: DeepSpeed's Muon optimizer (fp32, torch-based auxiliary AdamW: no FusedAdam JIT) with
the trainer's parameter groups and Muon assignment (megamoe.trainer.initialize_engine), as
ds_configs/muon.json / muonclip.json train, instead of AdamW.

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
from megamoe.distributed import end_process, init_distributed, rank, world_size
from megamoe.parallel.expert import initialize

STEPS = 3
SEED = 1234


def test_config() -> ModelConfig:
    return ModelConfig.load("tiny")  # group-limited sigmoid routing, balance and z losses on


def ds_config(zero_stage: int, ep_size: int, cfg: ModelConfig, muon: bool = False) -> dict:
    if muon:   # ds_configs/muonclip.json's optimizer in fp32; gradient clipping stays 0 under Muon
        conf = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 1000,
                "optimizer": {"type": "Muon", "params": {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.1,
                                                         "betas": [0.9, 0.95], "eps": 1e-8, "torch_adam": True,
                                                         "muon_lr": 0.02, "adam_lr": 3e-3}},
                "zero_optimization": {"stage": zero_stage}, "gradient_clipping": 0.0}
        if zero_stage == 3:
            conf["zero_optimization"]["reduce_scatter"] = False   # DeepSpeed's Muon needs it at ZeRO-3
        return conf
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 1000,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": zero_stage},
        "gradient_clipping": 1.0,
    }


def master_mismatches(sd: dict, save_dir) -> tuple[list[str], int]:
    """Compare a rebuilt native state dict with the masters the engine dumped (masters_rank*.pt):
    returns (names that differ or are missing, number of (layer, expert) blocks checked). Expert
    weights ([E_local, ...] on each EP rank) are checked against the rank's block of experts in
    gate_up_proj = cat(w1, w3) / down_proj = w2; everything else by name (AutoEP keeps ours)."""
    bad, experts_checked = [], 0
    for f in sorted(Path(save_dir).glob("masters_rank*.pt")):
        dump = torch.load(f)
        for name, t in dump["masters"].items():
            if name.endswith((".experts.w1", ".experts.w2", ".experts.w3")):
                prefix, w = name[: -len(".w1")], name[-2:]
                e_local = t.shape[0]
                lo = dump["ep_rank"] * e_local
                if w == "w2":
                    got = sd[prefix + ".down_proj"][lo:lo + e_local]
                else:
                    inter = t.shape[1]
                    rows = slice(0, inter) if w == "w1" else slice(inter, 2 * inter)
                    got = sd[prefix + ".gate_up_proj"][lo:lo + e_local, rows]
                    experts_checked += e_local if w == "w1" else 0
            else:
                got = sd.get(name)
            if got is None or got.dtype != torch.float32 or not torch.equal(got, t):
                bad.append(f"{f.name}:{name}")
    return bad, experts_checked


def main() -> None:
    argv = [a for a in sys.argv[1:] if a != "--muon"]
    muon = "--muon" in sys.argv[1:]
    save_dir, zero_stage, ep_size = Path(argv[0]), int(argv[1]), int(argv[2])
    tokenizer = argv[3] if len(argv) > 3 else None
    init_distributed()
    cfg = test_config()
    model = cfg.build(seed=SEED)
    # a non-zero selection bias, so the export has to carry it (DeepSpeed never updates it)
    gen = torch.Generator().manual_seed(7)
    for _, router in model.routers():
        router.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=gen) * 0.05)
    conf = ds_config(zero_stage, ep_size, cfg, muon)
    if muon:
        from megamoe.trainer import initialize_engine
        engine = initialize_engine(model, cfg, conf, ep_size, None, use_autoep=ep_size > 1)
    else:
        engine, *_ = initialize(model, cfg, conf, ep_size, model_parameters=model.parameters())

    data_gen = torch.Generator().manual_seed(100 + rank())
    for _ in range(STEPS):
        ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=data_gen)
        out = engine(ids[:, :-1], labels=ids[:, 1:])
        engine.backward(out.loss)
        engine.step()

    tag = f"global_step{STEPS}"
    engine.save_checkpoint(str(save_dir), tag=tag)
    # the fp32 masters as DeepSpeed itself gathers them (a collective: every rank, same order)
    from deepspeed.utils import safe_get_full_fp32_param
    masters = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}
    torch.save({"masters": masters, "ep_rank": rank() % ep_size if ep_size > 1 else 0, "ep_size": ep_size},
               save_dir / f"masters_rank{rank()}.pt")
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
    end_process(0)   # gloo threads must not meet interpreter teardown
