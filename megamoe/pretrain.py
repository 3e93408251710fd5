"""Pretrain a DeepSeek-V3-style MoE LM with DeepSpeed: arguments -> build -> loop.

    deepspeed --num_gpus 8 -m megamoe.pretrain --deepspeed-config ds_configs/zero2.json \
        --model-config small-moe --data-path 0.7 data/a_text 0.3 data/b_text --tokenizer tok.model \
        --seq-length 4096 --train-iters 10000 --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 500 \
        --lr-decay-style cosine --expert-model-parallel-size 8 --save ckpt --load ckpt \
        --save-interval 500 --eval-interval 500 --eval-iters 20 --tensorboard-dir tb --log-interval 10

One iteration = one optimizer step over the DeepSpeed config's global batch
(micro batch x gradient accumulation x data-parallel ranks). The pieces live in modules:
arguments / config checks / schedule / loss guard in megamoe.training, checkpoints in
megamoe.checkpoint, TensorBoard / FLOPs / MFU in megamoe.monitor, expert parallelism and the
routing-bias update in megamoe.parallel.
"""
from __future__ import annotations

import json
import random
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

if __name__ == "__main__" and not __package__:
    # Run as a file (`deepspeed megamoe/pretrain.py ...`): import the package from the repository
    # root rather than this directory's modules as top-level ones.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch

from megamoe import checkpoint as ckpt
from megamoe import faults
from megamoe.guard import LossGuard
from megamoe import training
from megamoe.config import ModelConfig
from megamoe.distributed import init_distributed, rank, world_size
from megamoe.parallel.balance import update_routing_bias
from megamoe.monitor import (Monitor, console_line, device_peak_flops, flops_per_token, memory_gb,
                             moe_scalars)
from megamoe.optim import GroupSpec, QKClip, describe_optimizer_groups, format_groups, muon_assignment, \
    param_groups, qk_clip_scalars

EXIT_BAD_LOSS = 1
# DeepSpeed's ZeRO calls a deprecated collective on every step; the warning says nothing to users.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated", category=FutureWarning)


def log0(*a) -> None:
    if rank() == 0:
        print(*a, flush=True)


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop agrees on it across ranks at the next iteration end,
    saves a checkpoint everywhere and exits 0 (a second signal falls back to the default)."""

    def __init__(self):
        self.signum: Optional[int] = None
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.signum = signum

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.signum is not None else 0.0])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag)
        return bool(flag.item() > 0)


def consumed_per_dataset(train_it) -> list[int]:
    """Samples taken from each dataset of the blend so far (one dataset: all of them)."""
    per_ds = train_it.consumed_per_dataset()
    return per_ds if per_ds is not None else [train_it.consumed_samples]


def initialize_engine(model, cfg: ModelConfig, ds_config: dict, ep_size: int, lr_scheduler, use_autoep: bool,
                      group_spec: Optional[GroupSpec] = None):
    """deepspeed.initialize through megamoe.parallel.expert (AutoEP block + our router for ep > 1),
    with megamoe.optim's parameter groups (decay / lr multiplier per kind) and, under Muon, Muon
    exactly on the hidden matrices (router, embeddings, head, norms on the auxiliary AdamW)."""
    from megamoe.parallel.expert import initialize
    opt = ds_config["optimizer"]
    params = opt.get("params", {})
    spec = group_spec or GroupSpec(weight_decay=float(params.get("weight_decay", 0.0)))
    groups = param_groups(model, spec, float(params["lr"]), params, muon=str(opt["type"]).lower() == "muon")
    with muon_assignment():
        engine, _, _, _ = initialize(model, cfg, ds_config, ep_size, use_autoep=use_autoep,
                                     model_parameters=groups, lr_scheduler=lr_scheduler)
    return engine


@torch.no_grad()
def evaluate(engine, valid_ds, micro: int, iters: int) -> Optional[float]:
    """Mean LM loss over the first `iters` global validation batches (the same ones every time)."""
    if valid_ds is None or iters <= 0:
        return None
    from megamoe.data import DistributedBatchIterator
    it = DistributedBatchIterator(valid_ds, micro, rank(), world_size(), consumed_samples=0)
    engine.eval()
    total = torch.zeros(2)
    for _ in range(iters):
        b = next(it)
        out = engine(b["input_ids"], labels=b["labels"])
        total += torch.tensor([out.loss.float().item(), 1.0])
    engine.train()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return float(total[0] / total[1])


def main(argv: Optional[list[str]] = None) -> int:
    args = training.parse_args(argv)
    init_distributed()
    world, me = world_size(), rank()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # -- model, tokenizer, DeepSpeed config, checkpoint compatibility (all before the engine)
    cfg = ModelConfig.load(args.model_config, **training.parse_overrides(args.model_override))
    if args.tokenizer:
        from megamoe.data import load_tokenizer
        tok = load_tokenizer(args.tokenizer)
        if tok.vocab_size > cfg.vocab_size:
            raise SystemExit(f"--tokenizer {args.tokenizer} has {tok.vocab_size} tokens but the model's vocab_size "
                             f"is {cfg.vocab_size}; use --model-override vocab_size={tok.vocab_size}")
    if args.seq_length > cfg.max_position_embeddings:
        raise SystemExit(f"--seq-length {args.seq_length} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    ds_config = training.reconcile_ds_config(training.load_ds_config(args.deepspeed_config), args, world,
                                             source=args.deepspeed_config)
    stage = training.zero_stage(ds_config)
    micro, gas = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    global_batch = ds_config["train_batch_size"]
    ep = args.expert_model_parallel_size
    resume = ckpt.find_checkpoint(args.load) if args.load else None
    initial_weights = None
    if resume is not None:
        tag, state = resume
        ckpt.check_model_config(state, cfg, where=str(Path(args.load) / tag))
        ds_config.update(ckpt.check_compatible(state, ep, world, stage, where=str(Path(args.load))))
        if state.get("weights_only"):
            # converted weights (e.g. tools/convert_from_hf.py): continue pretraining from them
            # with a fresh optimizer at iteration 0, as Megatron's --finetune / torchtitan's seed load
            initial_weights, resume = (args.load, tag), None

    # -- data
    from megamoe.data import DistributedBatchIterator, build_pretraining_data
    splits = [float(x) for x in args.split.split(",")]
    if args.valid_data_path:
        train_ds, = build_pretraining_data(args.data_path, args.seq_length, args.seed, splits=(1.0,))
        valid_ds, = build_pretraining_data(args.valid_data_path, args.seq_length, args.seed, splits=(1.0,))
    else:
        train_ds, valid_ds = build_pretraining_data(args.data_path, args.seq_length, args.seed, splits=splits)[:2]
    train_iters = training.train_iters_from(args, global_batch)

    # -- engine
    from megamoe.model.moe import set_aux_loss_scale
    model = cfg.build(seed=args.seed)
    if initial_weights is not None:
        from megamoe.export import load_native_state_dict
        model.load_state_dict(load_native_state_dict(*initial_weights)[0], strict=True)
        log0(f"initial weights from {Path(initial_weights[0]) / initial_weights[1]} "
             "(weights only: fresh optimizer, iteration 0)")
    model.set_gradient_checkpointing(args.recompute_activations)
    set_aux_loss_scale(1.0 / gas)  # engine.backward divides the LM loss by GAS; the aux losses must match
    schedule = training.LRSchedule(args.lr_decay_style, ds_config["optimizer"]["params"]["lr"], args.min_lr,
                                   args.lr_warmup_iters, train_iters, args.lr_wsd_decay_iters)
    # AutoEP layers (even at ep 1) when resuming a checkpoint written with them: same parameter names
    use_autoep = ep > 1 or bool(resume is not None and resume[1].get("autoep"))
    wd = float(ds_config["optimizer"]["params"].get("weight_decay", 0.0))
    spec = GroupSpec(weight_decay=wd, no_decay=tuple(args.no_weight_decay_on), lr_mult=args.lr_mult)
    engine = initialize_engine(model, cfg, ds_config, ep, training.lr_scheduler_factory(schedule), use_autoep, spec)
    log0("optimizer groups:\n" + format_groups(describe_optimizer_groups(engine)))
    qk_clip = QKClip(engine, args.qk_clip_tau) if args.qk_clip_tau else None
    if qk_clip is not None:
        log0(f"QK-clip: tau {args.qk_clip_tau} (per-head q/k rescale after every step)")

    guard = LossGuard(args.loss_spike_factor)
    step, consumed, skipped_total = 0, 0, 0
    if resume is not None:
        ckpt.load(engine, args.load, tag, state)
        step, consumed = int(state["step"]), int(state["consumed_samples"])
        skipped_total = int(state.get("skipped_iters", 0))
        guard.load_state_dict(state.get("loss_guard", {}))
        log0(f"resumed from {Path(args.load) / tag}: iteration {step}, consumed samples {consumed}")
    train_it = DistributedBatchIterator(train_ds, micro, me, world, consumed_samples=consumed)
    if resume is not None:
        ckpt.check_data_position(state, consumed_per_dataset(train_it), where=str(Path(args.load) / tag))

    # -- monitoring
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
    fpt = flops_per_token(cfg, args.seq_length)
    peak, peak_note = device_peak_flops(dtype)
    mon = Monitor(args.tensorboard_dir, enabled=me == 0)
    n = cfg.num_params()
    log0(f"model {args.model_config}: {n['total'] / 1e6:.2f}M params, {n['active'] / 1e6:.2f}M active; "
         f"{fpt['total'] / 1e6:.2f} MFLOP/token (matmul {fpt['matmul'] / 1e6:.2f}, attention {fpt['attention'] / 1e6:.2f})")
    log0(f"world {world}, ep {ep}, ZeRO-{stage}, micro batch {micro} x GAS {gas} x {world} ranks = global batch "
         f"{global_batch} ({global_batch * args.seq_length} tokens); {train_iters} iterations; {peak_note}")
    mon.text("config", "```\n" + json.dumps({"args": vars(args), "ds_config": ds_config, "model": cfg.to_dict()},
                                            indent=2, default=str) + "\n```")
    layer_ids = [i for i, _ in training.routers_of(engine)]
    stop = StopRequest()

    def save(reason: str) -> None:
        if not args.save:
            return
        t0 = time.perf_counter()
        tag_ = ckpt.save(engine, args.save, step, {
            "consumed_samples": train_it.consumed_samples,
            "consumed_samples_per_dataset": consumed_per_dataset(train_it),
            "model_config": cfg.to_dict(), "tokenizer": args.tokenizer, "ep_size": ep, "world_size": world,
            "autoep": use_autoep,
            "zero_stage": stage, "ds_config": ds_config, "args": vars(args), "train_iters": train_iters,
            "skipped_iters": skipped_total, "loss_guard": guard.state_dict(), "reason": reason})
        log0(f"saved checkpoint {Path(args.save) / tag_} ({reason}, {time.perf_counter() - t0:.1f} s)")

    # -- loop
    win = {"loss": 0.0, "aux": 0.0, "z": 0.0, "mtp": 0.0, "n": 0, "t": time.perf_counter(), "iters": 0}
    has_mtp = cfg.num_nextn_predict_layers > 0
    track_drops = cfg.capacity_factor is not None
    qk_stats = None
    load_acc_LE, last_grad_norm, exit_code, consecutive_skips = None, None, 0, 0
    stats, mom = {}, None
    loop_start = time.perf_counter()
    while step < train_iters:
        it = step + 1
        status, sums = None, np.zeros(4)
        dropped_L = torch.zeros(len(layer_ids))
        skipped_before = engine.skipped_steps
        lr = engine.get_lr()[0]  # the lr this iteration trains at (the scheduler steps inside engine.step)
        for _ in range(gas):
            b = next(train_it)
            out = engine(b["input_ids"], labels=b["labels"])
            aux = out.aux_loss if out.aux_loss is not None else torch.zeros(())
            z = out.z_loss if out.z_loss is not None else torch.zeros(())
            mtp = out.mtp_loss if out.mtp_loss is not None else torch.zeros(())
            if track_drops and out.dropped_fraction is not None:
                dropped_L += out.dropped_fraction.detach().float().cpu()
            bad, means = guard.check(out.loss, it, extras=(aux, z, mtp))
            status = status or bad
            if status is None:
                sums += means
                engine.backward(out.loss)
            elif gas == 1:
                break  # nothing accumulated: skipping = not calling backward / step
            else:
                # Gradients of earlier micro-batches are already inside ZeRO's buffers. Poison them so
                # DeepSpeed's own grad-overflow check (bf16.check_grad_overflow) drops the whole step.
                engine.backward(out.loss * float("nan"))
            engine.step()
        step = it
        stepped = status is None or (gas > 1 and engine.skipped_steps == skipped_before)
        if status is not None and stepped and gas > 1:
            log0(f"iteration {it}: {status} loss but DeepSpeed did not skip the step (no grad-overflow check "
                 f"in this configuration); stopping")
            exit_code = EXIT_BAD_LOSS
            save("bad loss, step not skippable")
            break
        if status is not None:
            if qk_clip is not None:
                qk_clip.discard()  # no step: these forwards' logits belong to no update
            update_routing_bias(engine, 0.0)  # rate 0: drop this iteration's counts, bias unchanged
            skipped_total += 1
            consecutive_skips += 1
            policy = args.on_nan if status == "nan" else args.on_loss_spike
            msg = (f"iteration {it}: {'non-finite' if status == 'nan' else 'spiking'} loss "
                   f"{means[0]:.4f} (EMA {guard.ema})")
            if policy == "stop" or consecutive_skips > args.max_skipped_iters:
                log0(msg + "; stopping with a checkpoint of the last good state (exit 1)")
                exit_code = EXIT_BAD_LOSS
                step -= 1  # this iteration changed nothing: the checkpoint is the state before it
                save(f"stopped on {status} loss at iteration {it}")
                step += 1
                break
            log0(msg + "; iteration skipped (no optimizer step)")
            mon.scalars({"train/skipped_iters": skipped_total}, it)
        else:
            consecutive_skips = 0
            loss, aux_v, z_v, mtp_v = (sums / gas).tolist()
            guard.accept(loss)
            if qk_clip is not None:
                qk_stats = qk_clip.step()  # after the optimizer step, on the fp32 masters and the module weights
            stats = update_routing_bias(engine, cfg.bias_update_rate) if layer_ids else {}
            last_grad_norm = engine.get_global_grad_norm()
            last_grad_norm = float(last_grad_norm) if last_grad_norm is not None else None
            win["loss"] += loss
            win["aux"] += aux_v
            win["z"] += z_v
            win["mtp"] += mtp_v
            win["n"] += 1
            scal = {"train/loss": loss, "train/aux_loss": aux_v, "train/z_loss": z_v, "train/lr": lr,
                    "train/grad_norm": last_grad_norm, "train/consumed_samples": train_it.consumed_samples,
                    "train/skipped_iters": skipped_total}
            if has_mtp:
                scal["train/mtp_loss"] = mtp_v
            if qk_stats is not None:
                scal.update(qk_clip_scalars(qk_stats))
            if stats:
                counts_LE = stats["tokens_per_expert"].float().cpu()
                mom = stats["max_over_mean"].float().cpu()
                load_acc_LE = counts_LE if load_acc_LE is None else load_acc_LE + counts_LE
                # capacity dropping (capacity_factor): share of this iteration's assignments dropped,
                # per MoE layer, averaged over micro-batches and ranks (0 when dropless)
                if track_drops and torch.distributed.is_initialized():
                    torch.distributed.all_reduce(dropped_L)
                drop_frac_L = dropped_L / (gas * (world if track_drops else 1))
                bias_LE = torch.stack([r.e_score_correction_bias.float() for _, r in training.routers_of(engine)])
                routed = global_batch * args.seq_length * cfg.num_experts_per_tok
                scal.update(moe_scalars(layer_ids, mom, drop_frac_L, bias_LE, routed))
            mon.scalars(scal, it)
        win["iters"] += 1

        # -- console line, throughput, heatmap
        if it % args.log_interval == 0 or it == train_iters:
            dt = time.perf_counter() - win["t"]
            tok_s = win["iters"] * global_batch * args.seq_length / max(dt, 1e-9)
            flops_rank = tok_s * fpt["total"] / world
            mfu = flops_rank / peak if peak else None
            mem = memory_gb()
            nn_ = max(win["n"], 1)
            imb = float(mom.max()) if mom is not None else None
            extra = {}
            if has_mtp:
                extra["mtp"] = f"{win['mtp'] / nn_:.4f}"
            if track_drops and stats:
                extra["dropped"] = f"{100 * float(drop_frac_L.mean()):.2f}%"
            if qk_stats is not None:
                extra["max logit"] = f"{float(qk_stats['max_logits'].max()):.1f}"
                extra["clipped heads"] = str(int(qk_stats["clipped"].sum()))
            log0(console_line(it, train_iters, train_it.consumed_samples, lr, win["loss"] / nn_,
                              win["aux"] / nn_, win["z"] / nn_, last_grad_norm, tok_s, flops_rank / 1e12, mfu, imb,
                              mem, 1000 * dt / max(win["iters"], 1), skipped_total, extra=extra))
            mon.scalars({"perf/tokens_per_s": tok_s, "perf/tflops_per_rank": flops_rank / 1e12, "perf/mfu": mfu,
                         **{f"mem/{k}_gb": v for k, v in mem.items()}}, it)
            win = {"loss": 0.0, "aux": 0.0, "z": 0.0, "mtp": 0.0, "n": 0, "t": time.perf_counter(), "iters": 0}
        if load_acc_LE is not None and it % (args.heatmap_interval or args.eval_interval) == 0:
            mon.heatmap("moe/expert_load", load_acc_LE, layer_ids, it)
            load_acc_LE = None

        out_of_time = False
        if args.exit_duration_in_mins is not None:
            elapsed = torch.tensor([time.perf_counter() - loop_start], dtype=torch.float64)
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
            out_of_time = float(elapsed) >= 60.0 * args.exit_duration_in_mins
        if it % args.eval_interval == 0 or it == train_iters or out_of_time:
            t0 = time.perf_counter()
            val = evaluate(engine, valid_ds, micro, args.eval_iters)
            if qk_clip is not None:
                qk_clip.discard()  # evaluation forwards are not part of the next step
            if val is not None:
                log0(f"validation at iteration {it}: loss {val:.4f} | ppl {np.exp(min(val, 50)):.2f} "
                     f"({time.perf_counter() - t0:.1f} s)")
                mon.scalars({"val/loss": val, "val/ppl": float(np.exp(min(val, 50)))}, it)
            win["t"] += time.perf_counter() - t0  # keep eval time out of tokens/s
        mon.flush()

        if args.save_interval and it % args.save_interval == 0 and it != train_iters:
            t0 = time.perf_counter()
            save("interval")
            win["t"] += time.perf_counter() - t0
        faults.iteration_sleep()  # tests: time to send a signal mid-run
        if stop.agreed():
            log0(f"received signal {stop.signum or 'on another rank'}: saving and exiting")
            save("signal")
            break
        if args.exit_interval and it % args.exit_interval == 0:
            save("exit interval")
            break
        if out_of_time:
            log0(f"--exit-duration-in-mins {args.exit_duration_in_mins} reached at iteration {it}: saving and exiting")
            save("exit duration")
            break
    else:
        save("end of training")
    mon.close()
    if args.save and rank() == 0:
        print(f"checkpoints: {Path(args.save).resolve()} (latest: {ckpt.read_latest(args.save)})", flush=True)
    if args.tensorboard_dir and rank() == 0:
        print(f"tensorboard: tensorboard --logdir {Path(args.tensorboard_dir).resolve()}", flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
