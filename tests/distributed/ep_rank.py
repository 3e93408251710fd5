"""Rank script for tests/distributed/test_expert_parallel.py (launched by torchrun or plain python).

usage: ep_rank.py SPEC.json OUT_DIR
SPEC: {"runs": [{"name", "kind", ...}, ...]}; every run builds a fresh model and engine in this
process (one launch, many engines: a launch plus DeepSpeed import costs seconds). Each rank writes
OUT_DIR/rank{R}.json: {run name: result}.

kinds:
  train    fixed data, N optimizer steps, records the global mean loss / aux / z per step, the
           bias after each step and the balance stats (update_routing_bias every step)
  skewed   router skewed toward experts 0 and 1 (skew_router), lr 0: only the bias moves; records
           max/mean load per update; checks the bias is in the state dict and in checkpoints
  init     builds as the trainer does (megamoe.parallel.build), records what the rank held before
           deepspeed.initialize, saves the whole initial model as OUT_DIR/{name}.pt (rank 0)
  routers  checks the router objects inside AutoEP layers, then that an engine built without
           megamoe's initialize (DeepSpeed's own router) is refused by verify_megamoe_routers
"""
import json
import os
import sys

import torch

from megamoe.config import ModelConfig
from megamoe.distributed import end_process, init_distributed, rank, world_size
from megamoe.model.moe import Router, set_aux_loss_scale
from megamoe.parallel import balance, expert
from megamoe.parallel.build import build_model


def model_cfg(overrides):
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=2, max_position_embeddings=64, q_lora_rank=None,
                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
                first_k_dense_replace=1, scoring_func="sigmoid", n_group=2, topk_group=1,
                norm_topk_prob=True, routed_scaling_factor=1.0, aux_loss_alpha=0.01,
                router_z_loss_coef=0.001, bias_update_rate=0.01)
    base.update(overrides or {})
    return ModelConfig.load("tiny", **base)


def ds_config(run, micro):
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": run.get("gas", 1),
        "gradient_clipping": run.get("clip", 0.0),
        "optimizer": {"type": "AdamW", "params": {"lr": run.get("lr", 3e-3), "betas": [0.9, 0.95],
                                                  "eps": 1e-8, "weight_decay": 0.1, "torch_adam": True}},
        "zero_optimization": {"stage": run["zero"]},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if run["zero"] in (1, 2):
        cfg["zero_optimization"].update(overlap_comm=False, contiguous_gradients=True,
                                        reduce_bucket_size=5e7, allgather_bucket_size=5e7)
    return cfg


def global_batches(cfg, steps, global_batch, seq, seed, vocab_subset=None, distinct=None):
    """`steps` global batches cycling over `distinct` random ones (few: so the loss can fall)."""
    gen = torch.Generator().manual_seed(seed)
    hi = vocab_subset if vocab_subset else cfg.vocab_size
    pool = [torch.randint(3, hi, (global_batch, seq + 1), generator=gen) for _ in range(distinct or steps)]
    return [pool[i % len(pool)] for i in range(steps)]


def all_mean(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    if world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.item() / world_size()


def skew_router(model, ids, strength, experts=(0, 1)):
    """Add `strength` x the mean direction of each MoE layer's input to the router rows of
    `experts`, so nearly every token picks them (max/mean load ~4 of 8 experts): a skewed start
    that balancing must undo, with diverse tokens so that a balanced state exists."""
    xs = {}
    hooks = [model.layers[i].ffn_norm.register_forward_hook(lambda m, a, o, k=i: xs.__setitem__(k, o.detach()))
             for i, _ in model.routers()]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    for i, r in model.routers():
        u_H = xs[i].reshape(-1, xs[i].shape[-1]).mean(0)
        for e in experts:
            r.weight.data[e] += strength * u_H / u_H.norm() ** 2


def build(run, cfg, micro, skew_ids=None):
    if skew_ids is None:   # as the trainer builds: this rank's share only (megamoe.parallel.build)
        model = build_model(cfg, run.get("seed", 1234), ds_config(run, micro), uses_autoep(run), "cpu")
    else:                  # whole, to skew the router before DeepSpeed sees it
        model = cfg.build(seed=run.get("seed", 1234))
        skew_router(model, skew_ids, run["skew"])
    kwargs = {}
    if run.get("eager_params"):   # as the trainer does: a list taken before AutoEP replaces layers
        kwargs["model_parameters"] = list(model.parameters())
    engine, _, _, _ = expert.initialize(model, cfg, ds_config(run, micro), run["ep"],
                                        use_autoep=run.get("use_autoep"), **kwargs)
    return engine


def uses_autoep(run) -> bool:
    return run["ep"] > 1 or bool(run.get("use_autoep"))


def full_native_state(engine) -> dict:
    """Every rank's share put together: ZeRO-3 partitions gathered, AutoEP expert slices
    concatenated in expert order, native names (what a whole model's state_dict holds)."""
    import deepspeed
    import torch.distributed as dist
    module = engine.module
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(params, enabled=bool(params)):
        named = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        local = {k: v.detach().clone() for k, v in named.items() if k in module.state_dict()}
    layout = expert.ep_layout(engine)
    shared = [None] * dist.get_world_size()
    dist.all_gather_object(shared, (layout["ep_rank"], {k: v for k, v in local.items() if ".experts.w" in k}))
    slices = dict(sorted(dict(shared).items()))   # ep_rank -> that rank's expert slices
    for k in local:
        if ".experts.w" in k:
            local[k] = torch.cat([part[k] for part in slices.values()])
    return expert.native_expert_state_dict(local)


def run_init(run, out_dir):
    """Build as the trainer does, record what this rank held before deepspeed.initialize, then
    save the whole initial model (rank 0) for the test to compare with a one-process build."""
    cfg = model_cfg(run.get("model"))
    conf = ds_config(run, 1)
    model = build_model(cfg, run["seed"], conf, uses_autoep(run), "cpu")
    experts = [p for n, p in model.named_parameters() if ".experts." in n and "shared" not in n]
    res = {"experts_on_meta": all(p.is_meta for p in experts),
           "partitioned": all(getattr(p, "ds_numel", 0) > p.data.numel() == 0
                              for p in model.parameters() if not p.is_meta),
           "held_numel": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0 if p.is_meta else p.numel()
                             for p in model.parameters())}
    engine, _, _, _ = expert.initialize(model, cfg, conf, run["ep"], use_autoep=uses_autoep(run))
    res["local_experts"] = expert.ep_layout(engine)["local_experts"]
    sd = full_native_state(engine)
    if rank() == 0:
        torch.save(sd, os.path.join(out_dir, f"{run['name']}.pt"))
    return res


def micro_batches(batch, micro, gas):
    """This rank's micro-batches of one global batch: rows [rank*micro*gas, (rank+1)*micro*gas)."""
    per_rank = micro * gas
    mine = batch[rank() * per_rank:(rank() + 1) * per_rank]
    return [mine[i * micro:(i + 1) * micro] for i in range(gas)]


def run_train(run):
    cfg = model_cfg(run.get("model"))
    gas = run.get("gas", 1)
    G, S = run["global_batch"], run["seq"]
    micro = G // (world_size() * gas)
    engine = build(run, cfg, micro)
    set_aux_loss_scale(1.0 / gas)
    res = {"loss": [], "aux": [], "z": [], "bias": [], "grad_norm": [], "tokens_per_expert": [], "max_over_mean": [],
           "layout": expert.ep_layout(engine), "n_autoep_layers": len(expert.autoep_layers(engine)),
           "param_names": sorted(n for n, _ in engine.module.named_parameters())}
    engine.train()
    for batch in global_batches(cfg, run["steps"], G, S, run.get("data_seed", 7), distinct=2):
        losses, auxes, zs = [], [], []
        for mb in micro_batches(batch, micro, gas):
            out = engine(mb[:, :-1], labels=mb[:, 1:])
            engine.backward(out.loss)
            engine.step()
            losses.append(out.loss.item())
            auxes.append(out.aux_loss.item())
            zs.append(out.z_loss.item())
        # one optimizer step done (engine.step applies it at the accumulation boundary)
        stats = balance.update_routing_bias(engine, run.get("rate", cfg.bias_update_rate))
        norm = engine.get_global_grad_norm()
        res["grad_norm"].append(float(norm) if norm is not None else None)
        res["loss"].append(all_mean(sum(losses) / gas))
        res["aux"].append(all_mean(sum(auxes) / gas))
        res["z"].append(all_mean(sum(zs) / gas))
        res["bias"].append(balance.routing_bias_state(engine).tolist())
        res["tokens_per_expert"].append(stats["tokens_per_expert"].tolist())
        res["max_over_mean"].append(stats["max_over_mean"].tolist())
    return res


def run_skewed(run, out_dir):
    cfg = model_cfg(run.get("model"))
    G, S = run["global_batch"], run["seq"]
    micro = G // world_size()
    run = dict(run, lr=0.0)
    batches = global_batches(cfg, run["steps"], G, S, run.get("data_seed", 7), distinct=1)
    engine = build(run, cfg, micro, skew_ids=batches[0][:, :-1])
    set_aux_loss_scale(1.0)
    res = {"max_over_mean": [], "bias": []}
    engine.train()
    for batch in batches:
        (mb,) = micro_batches(batch, micro, 1)
        out = engine(mb[:, :-1], labels=mb[:, 1:])
        engine.backward(out.loss)
        engine.step()
        stats = balance.update_routing_bias(engine, run["rate"])
        res["max_over_mean"].append(stats["max_over_mean"].tolist())
        res["bias"].append(balance.routing_bias_state(engine).tolist())
    sd = engine.module.state_dict()
    bias_keys = sorted(k for k in sd if k.endswith("router.e_score_correction_bias"))
    res["bias_keys"] = bias_keys
    final = balance.routing_bias_state(engine)
    res["state_dict_bias_matches"] = bool(torch.equal(torch.stack([sd[k].float() for k in bias_keys]), final))
    # Checkpoint round trip: the bias comes back from the engine's own checkpoint files.
    ckpt = os.path.join(out_dir, "ckpt")
    engine.save_checkpoint(ckpt, tag="global_step1")
    for _, r in balance.routers(engine):
        r.e_score_correction_bias.fill_(123.0)
    engine.load_checkpoint(ckpt, tag="global_step1", load_optimizer_states=False,
                           load_lr_scheduler_states=False)
    res["checkpoint_bias_restored"] = bool(torch.equal(balance.routing_bias_state(engine), final))
    if rank() == 0:
        res["checkpoint_files"] = sorted(os.listdir(os.path.join(ckpt, "global_step1")))
    return res


def run_routers(run):
    import deepspeed

    cfg = model_cfg(run.get("model"))
    S = run["seq"]
    model = cfg.build(seed=5)
    ref_bias = {i: torch.linspace(-0.1, 0.1, cfg.n_routed_experts) * (i + 1) for i, _ in model.routers()}
    for i, r in model.routers():
        r.e_score_correction_bias.copy_(ref_bias[i])
    engine, _, _, _ = expert.initialize(model, cfg, ds_config(dict(run, zero=run.get("zero", 2)), 1), run["ep"])
    res = {"n_verified": expert.verify_megamoe_routers(engine, cfg)}
    import deepspeed.moe.ep_kernels as ep_kernels
    res["cpu_gathers"] = getattr(ep_kernels, "_megamoe_cpu_gathers", False)
    layers = expert.autoep_layers(engine)
    res["router_types"] = [type(l.router).__name__ for _, l in layers]
    res["router_is_megamoe"] = all(isinstance(l.router, Router) for _, l in layers)
    res["routers_are_model_routers"] = [l.router is r for (_, l), (_, r) in zip(layers, engine.module.routers())]
    res["bias_is_models"] = all(torch.equal(r.e_score_correction_bias.cpu(), ref_bias[i])
                                for i, r in engine.module.routers())
    res["router_names"] = [n for n, _ in balance.routers(engine)]
    ids = torch.randint(3, cfg.vocab_size, (1, S + 1), generator=torch.Generator().manual_seed(0))
    engine.train()
    out = engine(ids[:, :-1], labels=ids[:, 1:])
    res["seq_len_seen"] = [r.seq_len for _, r in engine.module.routers()]
    res["counts_per_layer"] = [r.tokens_per_expert_acc.sum().item() for _, r in engine.module.routers()]
    res["aux_positive"] = bool(out.aux_loss.item() > 0 and out.z_loss.item() > 0)
    engine.backward(out.loss)
    from deepspeed.utils import safe_get_full_grad
    grads = [safe_get_full_grad(r.weight) for _, r in engine.module.routers()]
    res["router_grad_nonzero"] = [g is not None and bool(g.abs().sum() > 0) for g in grads]
    res["layout"] = expert.ep_layout(engine)
    # DeepSpeed's own router: what a plain deepspeed.initialize with the same block gives.
    model2 = cfg.build(seed=5)
    conf = ds_config(dict(run, zero=2), 1)
    conf["expert_parallel"] = expert.expert_parallel_config(cfg, run["ep"])
    engine2, _, _, _ = deepspeed.initialize(model=model2, config=conf)
    try:
        expert.verify_megamoe_routers(engine2)
        res["foreign_router_error"] = None
    except expert.ExpertParallelError as e:
        res["foreign_router_error"] = str(e)
    return res


def main():
    spec = json.load(open(sys.argv[1]))
    out_dir = sys.argv[2]
    init_distributed()
    torch.use_deterministic_algorithms(False)
    results = {}
    for run in spec["runs"]:
        torch.manual_seed(0)
        print(f"[ep_rank {rank()}] run {run['name']}", file=sys.stderr, flush=True)
        if run["kind"] == "train":
            results[run["name"]] = run_train(run)
        elif run["kind"] == "skewed":
            results[run["name"]] = run_skewed(run, out_dir)
        elif run["kind"] == "init":
            results[run["name"]] = run_init(run, out_dir)
        elif run["kind"] == "routers":
            results[run["name"]] = run_routers(run)
        else:
            raise ValueError(f"unknown run kind {run['kind']!r}")
    tmp = os.path.join(out_dir, f".rank{rank()}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f)
    os.replace(tmp, os.path.join(out_dir, f"rank{rank()}.json"))


if __name__ == "__main__":
    main()
    end_process(0)   # gloo threads must not meet interpreter teardown
