"""Rank script for tests/recipes/test_recipes_distributed.py (torchrun, 2 CPU ranks).

usage: recipes_rank.py SPEC.json OUT_DIR        (each rank writes OUT_DIR/rank{R}.json)
SPEC: {"runs": [{"name", "kind", ...}]}, each run a fresh model and engine in this process.

kinds:
  qkclip    MuonClip under ZeRO `zero` with EP `ep`: engine built as the trainer builds it
            (megamoe.trainer.initialize_engine: parameter groups + Muon assignment). One step at
            lr 0, tau set between the heads' observed max logits, QK-clip; records the fp32 masters
            and module weights before/after, the next forward's max logits, the optimizer groups,
            and the module weights after one more lr-0 step (must keep the clipped values).
  capacity  capacity_factor with EP 2 (ZeRO-1, fp32) vs the plain single-process model: every rank
            also runs the plain model on BOTH ranks' micro-batches one at a time (capacity is per
            rank-local batch, so that is the same computation), averaging their gradients as data
            parallelism does; records both losses and dropped fractions per step.
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megamoe.config import ModelConfig  # noqa: E402
from megamoe.distributed import end_process, init_distributed, rank, world_size  # noqa: E402
from megamoe.model.moe import set_aux_loss_scale  # noqa: E402
from megamoe.optim import QKClip, describe_optimizer_groups  # noqa: E402
from megamoe.trainer import initialize_engine  # noqa: E402


def model_cfg(overrides):
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=64, q_lora_rank=None,
                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
                first_k_dense_replace=1, scoring_func="sigmoid", n_group=1, topk_group=1,
                norm_topk_prob=True, routed_scaling_factor=1.0, aux_loss_alpha=0.01,
                router_z_loss_coef=0.001, bias_update_rate=0.0)
    base.update(overrides or {})
    return ModelConfig.load("tiny", **base)


def full_fp32(p):
    """The weights the optimizer updates: the fp32 master under ZeRO-1/2/3 (and ZeRO-1 bf16's
    BF16_Optimizer); the module weight itself at ZeRO-0, which keeps no master."""
    from deepspeed.utils import safe_get_full_fp32_param
    full = safe_get_full_fp32_param(p)
    if full is None:
        from megamoe.optim import _fp16_optimizer_master
        full = _fp16_optimizer_master(ENGINE[0].optimizer, p)
    return (full if full is not None else p.data).detach().clone()


ENGINE = [None]


def module_weight(p):
    """The low-precision weight the forward sees (gathered under ZeRO-3)."""
    if hasattr(p, "ds_id"):
        import deepspeed
        with deepspeed.zero.GatheredParameters([p]):
            return p.data.detach().clone()
    return p.data.detach().clone()


def max_logits_of(engine, ids):
    """[L, N] per-head max logits of one forward on `ids` (MAX over ranks), no update."""
    clip_model = engine.module
    clip_model.pop_max_logits()
    with torch.no_grad():
        engine(ids[:, :-1], labels=ids[:, 1:])
    m = clip_model.pop_max_logits().float()
    torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX)
    return m


def set_lr(engine, lr):
    for g in engine.optimizer.param_groups:
        g["lr"] = lr


def run_qkclip(run):
    cfg = model_cfg(run.get("model"))
    zero = run["zero"]
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
          "bf16": {"enabled": True},
          "optimizer": {"type": run.get("optimizer", "Muon"),
                        "params": {"lr": 0.01, "momentum": 0.95, "weight_decay": 0.1, "betas": [0.9, 0.95],
                                   "eps": 1e-8, "torch_adam": True, "adam_lr": 1e-3}},
          "zero_optimization": {"stage": zero}, "steps_per_print": 10 ** 9}
    if zero == 3:
        ds["zero_optimization"].update(reduce_scatter=False, stage3_param_persistence_threshold=run.get("persist", 0))
    if run.get("optimizer", "Muon") != "Muon":
        for k in ("momentum", "adam_lr"):
            ds["optimizer"]["params"].pop(k)
    model = cfg.build(seed=11)
    engine = initialize_engine(model, cfg, ds, run["ep"], None, use_autoep=run["ep"] > 1)
    ENGINE[0] = engine
    set_aux_loss_scale(1.0)
    res = {"groups": describe_optimizer_groups(engine)}
    clip = QKClip(engine, tau=1e9)
    gen = torch.Generator().manual_seed(5)
    ids_all = torch.randint(3, cfg.vocab_size, (2 * world_size(), 33), generator=gen)
    ids = ids_all[rank() * 2:(rank() + 1) * 2]
    engine.train()
    # one real step so the optimizer state exists and Muon's path runs
    out = engine(ids[:, :-1], labels=ids[:, 1:])
    engine.backward(out.loss)
    engine.step()
    clip.discard()
    # the step under test: lr 0, so the weights the forward saw are the weights being clipped
    set_lr(engine, 0.0)
    out = engine(ids[:, :-1], labels=ids[:, 1:])
    engine.backward(out.loss)
    engine.step()
    observed = clip.global_max_logits()
    # tau between the heads: about half of them clipped
    tau = float(observed.flatten().median())
    clip.tau = tau
    attn = engine.module.attention_modules()
    qname = "wq" if cfg.q_lora_rank is None else "wq_b"
    params = {f"{i}.{n}": getattr(a, n).weight for i, a in enumerate(attn) for n in (qname, "wkv_b", "wkv_a")}
    before = {k: full_fp32(p) for k, p in params.items()}
    with torch.no_grad():   # refill the trackers with exactly the step's logits (weights unchanged at lr 0)
        engine(ids[:, :-1], labels=ids[:, 1:])
    stats = clip.step()
    after = {k: full_fp32(p) for k, p in params.items()}
    modw = {k: module_weight(p) for k, p in params.items()}
    res.update(tau=tau, observed=observed.tolist(), stats_max=stats["max_logits"].tolist(),
               gamma=stats["gamma"].tolist(), clipped=stats["clipped"].tolist(), qname=qname,
               dims=[cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.num_attention_heads])
    res["next_max"] = max_logits_of(engine, ids_all).tolist()
    # exact-factor checks done here (tensors are large for JSON): per-row ratio after/before
    from megamoe.optim import qk_row_scales
    checks = {}
    for i, a in enumerate(attn):
        q_R, kv_R = qk_row_scales(a, stats["gamma"][i])
        for n, R in ((qname, q_R), ("wkv_b", kv_R), ("wkv_a", None)):
            k = f"{i}.{n}"
            b, f = before[k], after[k]
            exp = b if R is None else (b.float() * R.unsqueeze(1)).to(b.dtype)
            checks[k] = {"exact": bool(torch.equal(f, exp)),
                         "unscaled_rows_identical": bool(torch.equal(f[(R if R is not None else torch.ones(len(b))) == 1],
                                                                     b[(R if R is not None else torch.ones(len(b))) == 1])),
                         "module_is_master": bool(torch.equal(modw[k], f.to(modw[k].dtype))),
                         "changed": not torch.equal(f, b)}
    res["checks"] = checks
    # one more step at lr 0: the module weights must keep the clipped values (the masters have them)
    clip.discard()
    out = engine(ids[:, :-1], labels=ids[:, 1:])
    engine.backward(out.loss)
    engine.step()
    res["kept_after_next_step"] = {k: bool(torch.equal(module_weight(p), modw[k])) for k, p in params.items()}
    return res


def run_capacity(run):
    from megamoe.parallel.expert import initialize
    cfg = model_cfg({"capacity_factor": run["capacity_factor"], "num_hidden_layers": 3})
    micro, S, steps, lr = 2, 32, run["steps"], 3e-3
    ds = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
          "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                    "weight_decay": 0.0, "torch_adam": True}},
          "zero_optimization": {"stage": 1}, "steps_per_print": 10 ** 9}
    engine, _, _, _ = initialize(cfg.build(seed=3), cfg, ds, 2)
    ref = cfg.build(seed=3)
    opt = torch.optim.AdamW(ref.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    gen = torch.Generator().manual_seed(9)
    res = {"ep_loss": [], "ref_loss": [], "ep_dropped": [], "ref_dropped": []}
    engine.train()
    ref.train()
    for _ in range(steps):
        batch = torch.randint(3, cfg.vocab_size, (micro * world_size(), S + 1), generator=gen)
        mine = batch[rank() * micro:(rank() + 1) * micro]
        set_aux_loss_scale(1.0)
        out = engine(mine[:, :-1], labels=mine[:, 1:])
        engine.backward(out.loss)
        engine.step()
        res["ep_loss"].append(out.loss.item())
        res["ep_dropped"].append(out.dropped_fraction.tolist())
        # reference: both ranks' micro-batches, one forward each (capacity per micro-batch), grads averaged
        set_aux_loss_scale(1.0 / world_size())
        opt.zero_grad()
        losses, drops = [], []
        for r in range(world_size()):
            b = batch[r * micro:(r + 1) * micro]
            o = ref(b[:, :-1], labels=b[:, 1:])
            (o.loss / world_size()).backward()
            losses.append(o.loss.item())
            drops.append(o.dropped_fraction.tolist())
        opt.step()
        res["ref_loss"].append(losses[rank()])
        res["ref_dropped"].append(drops[rank()])
    return res


def main():
    spec = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    init_distributed()
    torch.manual_seed(0)
    results = {}
    for run in spec["runs"]:
        fn = {"qkclip": run_qkclip, "capacity": run_capacity}[run["kind"]]
        try:
            results[run["name"]] = fn(run)
        except Exception as e:  # recorded, so the test shows which run failed and why
            import traceback
            results[run["name"]] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    (out_dir / f"rank{rank()}.json").write_text(json.dumps(results))
    torch.distributed.barrier()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
    end_process(0)   # gloo threads must not meet interpreter teardown
