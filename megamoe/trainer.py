"""The training loop's one home: `Trainer(config).train()`.

    Trainer.__init__   model config, DeepSpeed config, resume point, data, engine, monitoring
    Trainer.train      the loop: train_step -> (skip_step | after_step) -> maybe_log ->
                       maybe_eval -> maybe_save -> stop checks
One iteration is one optimizer step over the DeepSpeed config's global batch (micro batch x
gradient accumulation x data-parallel ranks). The pieces it calls live in their modules:
the run config and its checks in megamoe.train_config, the schedule in megamoe.schedule, the bad-loss guard in megamoe.guard,
checkpoints in megamoe.checkpoint, TensorBoard / FLOPs / MFU in megamoe.monitor, expert parallelism
and the routing-bias update in megamoe.parallel.
"""
from __future__ import annotations

import json
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from megamoe import checkpoint as ckpt
from megamoe import faults
from megamoe.config import ModelConfig
from megamoe.distributed import all_reduce_host, device, init_distributed, rank, set_deterministic, to_device, \
    world_size
from megamoe.guard import LossGuard
from megamoe.monitor import (MetricsWindow, Monitor, console_line, device_peak_flops, flops_per_token, memory_gb,
                             moe_scalars)
from megamoe.monitor import mfu as model_flops_utilisation
from megamoe.optim import GroupSpec, QKClip, describe_optimizer_groups, format_groups, muon_assignment, \
    param_groups, qk_clip_scalars
from megamoe.parallel import deepspeed_compat
from megamoe.parallel.build import build_model
from megamoe.parallel.balance import expert_specialisation, update_routing_bias
from megamoe.profiler import StepProfiler
from megamoe.syncs import to_host
from megamoe.schedule import LRSchedule, flag_schedule_kept, lr_scheduler_factory
from megamoe.train_config import ConfigConflict, DataConfig, TrainConfig

EXIT_BAD_LOSS = 1


def megamoe_version() -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("megamoe")
    except PackageNotFoundError:
        return None


def log0(*a) -> None:
    if rank() == 0:
        print(*a, flush=True)


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop agrees on it across ranks at the next iteration end,
    saves a checkpoint everywhere and exits 0.

    A rank often receives one request twice: a signal to the process group (SLURM, Ctrl-C, `kill --
    -PGID`) reaches it directly and again through its launcher (torchrun and DeepSpeed's launch.py
    forward what they receive). Repeats within `GRACE_S` of the first are the same request; a signal
    after that falls back to the default action (an impatient second Ctrl-C still kills)."""
    GRACE_S = 5.0

    def __init__(self):
        self.signum: Optional[int] = None
        self.first_at = 0.0
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        now = time.monotonic()
        if self.signum is None:
            self.signum, self.first_at = signum, now
        elif now - self.first_at > self.GRACE_S:
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.signum is not None else 0.0])
        return bool(all_reduce_host(flag).numpy()[0] > 0)   # a host tensor: .numpy(), no device involved


@dataclass
class StepResult:
    status: Optional[str]               # None, "nan", "spike" or "grad" (with "unskippable " in front: applied)
    means: Any = None                   # [loss, aux, z, mtp] global means over micro-batches: a device
    #                                     tensor for an accepted step, host floats for a rejected one
    lr: float = 0.0
    grad_norm: Any = None               # DeepSpeed's global norm (a device tensor, or a float)
    dropped_L: Optional[torch.Tensor] = None    # capacity-dropped share summed over micro-batches (device)


def host_float(x) -> Optional[float]:
    """A device scalar (one host read), a float or None, as a float or None."""
    if x is None:
        return None
    return float(to_host(x)) if torch.is_tensor(x) else float(x)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model_config(config: TrainConfig) -> ModelConfig:
    """The preset (or file) with --model-override applied; with --tokenizer, the vocabulary is the
    tokenizer's, padded to --make-vocab-size-divisible-by (Megatron), unless vocab_size is
    overridden to at least the tokenizer's size."""
    overrides, data = dict(config.model.model_override), config.data
    if data.tokenizer:
        from megamoe.data import load_tokenizer
        n = load_tokenizer(data.tokenizer).vocab_size
        div = config.model.make_vocab_size_divisible_by
        if "vocab_size" not in overrides:
            overrides["vocab_size"] = -(-n // div) * div
            log0(f"vocabulary: {n} tokens in {data.tokenizer}, padded to {overrides['vocab_size']} "
                 f"(a multiple of {div})")
        elif int(overrides["vocab_size"]) < n:
            raise ConfigConflict(f"--model-override vocab_size={overrides['vocab_size']} is smaller than the "
                                 f"{n} tokens of --tokenizer {data.tokenizer}; drop the override (the vocabulary "
                                 "then comes from the tokenizer) or raise it")
    cfg = ModelConfig.load(config.model.model_config, **overrides)
    if data.seq_length > cfg.max_position_embeddings:
        raise ConfigConflict(f"--seq-length {data.seq_length} exceeds max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
    return cfg


def build_data(data: DataConfig):
    """(train, valid) datasets from --data-path / --valid-data-path / --split; valid may be None."""
    from megamoe.data import DataError, build_pretraining_data
    try:
        if data.valid_data_path:
            train_ds, = build_pretraining_data(data.data_path, data.seq_length, data.seed, splits=(1.0,))
            valid_ds, = build_pretraining_data(data.valid_data_path, data.seq_length, data.seed, splits=(1.0,))
        else:
            splits = [float(x) for x in data.split.split(",")]
            train_ds, valid_ds = (list(build_pretraining_data(data.data_path, data.seq_length, data.seed,
                                                              splits=splits)) + [None])[:2]
    except ValueError as e:   # bad weights, unreadable files, a split that does not parse
        raise DataError(f"--data-path {' '.join(data.data_path)}: {e}") from None
    if train_ds is None:
        raise DataError(f"--data-path {' '.join(data.data_path)} with --split {data.split} leaves no training "
                        "documents (an empty dataset, or a train fraction of 0); check the data or the split")
    return train_ds, valid_ds


def routers_of(module) -> list:
    """(layer_idx, router) of the model inside an engine (or the bare model); the bias update
    itself is megamoe.parallel.balance.update_routing_bias."""
    m = getattr(module, "module", module)
    return list(m.routers()) if hasattr(m, "routers") else []


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
def evaluate(engine, valid_ds, micro: int, iters: int, vocab_size: Optional[int] = None,
             eos_id: Optional[int] = None) -> Optional[float]:
    """Mean LM loss over the first `iters` global validation batches (the same ones every time)."""
    if valid_ds is None or iters <= 0:
        return None
    from megamoe.data import DistributedBatchIterator
    it = DistributedBatchIterator(valid_ds, micro, rank(), world_size(), consumed_samples=0,
                                  vocab_size=vocab_size, eos_id=eos_id)
    engine.eval()
    total = torch.zeros((), device=device(), dtype=torch.float64)
    for _ in range(iters):
        b = to_device(next(it))
        total += engine(b["input_ids"], labels=b["labels"], documents=b.get("documents")).loss.detach().double()
    engine.train()
    sums = all_reduce_host(torch.stack([to_host(total), torch.tensor(float(iters), dtype=torch.float64)])).numpy()
    return float(sums[0] / sums[1])


class Trainer:
    def __init__(self, config: TrainConfig):
        init_distributed()
        self.world, self.rank = world_size(), rank()
        self.data_changed = False
        self.config = config.resolve(self.world, device().type) if config.ds_config is None else config
        log0(self.config.describe())
        for change in self.config.adapted:
            log0(f"DeepSpeed config for the {device().type} accelerator: {change}")
        for change in set_deterministic(config.model.deterministic):
            log0(f"--deterministic: {change}")
        seed_everything(config.data.seed)
        self.profiler = StepProfiler.from_config(config.logging, self.rank, device().type)  # checks its flags first
        self.model_config = build_model_config(config)
        # --reset-attention-mask: documents end at the model's EOS token
        self.eos_id = self.model_config.eos_token_id if config.data.reset_attention_mask else None
        if config.data.reset_attention_mask:
            if self.eos_id is None:
                raise ConfigConflict("--reset-attention-mask needs the model config's eos_token_id (documents end "
                                     "at it); set it with --model-override eos_token_id=N")
            log0(f"attention within documents (--reset-attention-mask): a new document after every token {self.eos_id}")
        self.ds_config = config.ds_config
        self.stage, self.ep = config.parallel.zero_stage, config.parallel.expert_model_parallel_size
        self.micro, self.gas = config.optim.micro_batch_size, config.optim.gradient_accumulation_steps
        self.global_batch, self.train_iters = config.optim.global_batch_size, config.train_iters
        resume, initial_weights = self._resume_point()
        self.train_ds, self.valid_ds = build_data(config.data)
        self.use_autoep = self.ep > 1 or bool(resume is not None and resume[1].autoep)
        self.engine = self._build_engine(initial_weights)
        self.qk_clip = QKClip(self.engine, config.optim.qk_clip_tau) if config.optim.qk_clip_tau else None
        if self.qk_clip is not None:
            log0(f"QK-clip: tau {config.optim.qk_clip_tau} (per-head q/k rescale after every step)")
        self.guard = LossGuard(config.guard.loss_spike_factor)
        self.host_guard = not deepspeed_compat.checks_grad_overflow(self.engine)
        if self.host_guard:
            log0("loss guard: DeepSpeed does not check gradients for overflow in this configuration, so the guard "
                 "reads the loss before backward (one more host sync per iteration)")
        self.step, self.skipped_total, self.consecutive_skips, self.exit_code = 0, 0, 0, 0
        self.last_loss, self.last_val = None, None
        self.train_it = self._restore(resume)
        self._start_monitoring()
        self.stop = StopRequest()

    # -- set-up ---------------------------------------------------------------------------------
    def _resume_point(self):
        """((tag, state) to resume from or None, (dir, tag) of weights-only initial weights or None).
        Refuses a checkpoint of another model or layout, or one whose run settings changed in a way
        that would corrupt the run; prints the settings that changed and apply."""
        load, save = self.config.checkpoint.load, self.config.checkpoint.save
        ckpt.check_locations(load, save)   # every rank: each must see the directories
        resume, note = ckpt.resume_point(load) if load and Path(load).exists() else (None, None)
        if note:
            log0(f"resume: {note}")
        if resume is None:
            return None, None
        tag, state = resume
        where = str(Path(load) / tag)
        ckpt.check_model_config(state, self.model_config, where=where)
        self.ds_config.update(ckpt.check_compatible(state, self.ep, self.world, self.stage, where=str(Path(load))))
        if state.weights_only:
            # converted weights (e.g. tools/convert_from_hf.py): continue pretraining from them
            # with a fresh optimizer at iteration 0, as Megatron's --finetune / torchtitan's seed load
            return None, (load, tag)
        changes = self.config.resume_changes(state.config, where=where)
        for change in changes:
            log0(f"resume: {change} (applied)")
        # a new blend (a curriculum step, or new files allowed explicitly) serves other samples by design
        self.data_changed = any(c.startswith("data_path:") for c in changes)
        return resume, None

    def _build_engine(self, initial_weights):
        from megamoe.model.moe import set_aux_loss_scale
        config, optim = self.config, self.config.optim
        # only this rank's share, on its device (megamoe.parallel.build); whole when weights load into it
        model = build_model(self.model_config, config.data.seed, self.ds_config, self.use_autoep, device(),
                            whole=initial_weights is not None)
        if initial_weights is not None:
            model.load_state_dict(ckpt.load_native_state_dict(*initial_weights)[0], strict=True)
            log0(f"initial weights from {Path(initial_weights[0]) / initial_weights[1]} "
                 "(weights only: fresh optimizer, iteration 0)")
        model.set_gradient_checkpointing(config.model.recompute_activations)
        set_aux_loss_scale(1.0 / self.gas)  # engine.backward divides the LM loss by GAS; the aux losses must match
        schedule = LRSchedule(optim.lr_decay_style, optim.lr, optim.min_lr, optim.lr_warmup_iters, self.train_iters,
                              optim.lr_wsd_decay_iters)
        spec = GroupSpec(weight_decay=optim.weight_decay, no_decay=tuple(optim.no_weight_decay_on),
                         lr_mult=optim.lr_mult)
        # AutoEP layers (even at ep 1) when resuming a checkpoint written with them: same parameter names
        engine = initialize_engine(model, self.model_config, self.ds_config, self.ep, lr_scheduler_factory(schedule),
                                   self.use_autoep, spec)
        log0("optimizer groups:\n" + format_groups(describe_optimizer_groups(engine)))
        return engine

    def _restore(self, resume):
        """Engine, RNG and trainer state from the checkpoint (the schedule stays the flags'); the
        batch iterator at its position."""
        from megamoe.data import DistributedBatchIterator, Prefetcher
        consumed = 0
        if resume is not None:
            tag, state = resume
            load = self.config.checkpoint.load
            with flag_schedule_kept(self.engine.lr_scheduler):
                ckpt.load(self.engine, load, tag, state, trust=self.config.checkpoint.trust_checkpoint)
            self.step, consumed, self.skipped_total = state.step, state.consumed_samples, state.skipped_iters
            self.guard.load_state_dict(state.loss_guard)
            self.last_loss, self.last_val = state.train_loss, state.val_loss
            log0(f"resumed from {Path(load) / tag}: iteration {self.step}, consumed samples {consumed}")
        train_it = DistributedBatchIterator(self.train_ds, self.micro, self.rank, self.world, consumed_samples=consumed,
                                            vocab_size=self.model_config.vocab_size, eos_id=self.eos_id)
        if resume is not None and not self.data_changed:
            ckpt.check_data_position(resume[1], consumed_per_dataset(train_it), where=str(Path(load) / tag))
        return Prefetcher(train_it, to_device)

    def _start_monitoring(self):
        config, cfg = self.config, self.model_config
        dtype = torch.bfloat16 if self.ds_config.get("bf16", {}).get("enabled") else torch.float32
        self.fpt = flops_per_token(cfg, config.data.seq_length)
        self.peak, peak_note = device_peak_flops(dtype)
        self.mon = Monitor(config.logging.tensorboard_dir, enabled=self.rank == 0)
        n = cfg.num_params()
        log0(f"model {config.model.model_config}: {n['total'] / 1e6:.2f}M params, {n['active'] / 1e6:.2f}M active; "
             f"{self.fpt['total'] / 1e6:.2f} MFLOP/token (matmul {self.fpt['matmul'] / 1e6:.2f}, "
             f"attention {self.fpt['attention'] / 1e6:.2f})")
        from megamoe.kernels.attention import resolve_attention_backend
        backend, why = resolve_attention_backend(cfg.attention_backend, device(), dtype, cfg.qk_head_dim,
                                                 cfg.v_head_dim)
        log0(f"attention backend: {backend} ({why})")
        log0(f"world {self.world}, ep {self.ep}, ZeRO-{self.stage}, micro batch {self.micro} x GAS {self.gas} x "
             f"{self.world} ranks = global batch {self.global_batch} ({self.global_batch * config.data.seq_length} tokens); "
             f"{self.train_iters} iterations; {peak_note}")
        self.mon.text("config", "```\n" + json.dumps({"run": config.to_dict(), "ds_config": self.ds_config,
                                                      "model": cfg.to_dict()}, indent=2, default=str) + "\n```")
        self.layer_ids = [i for i, _ in routers_of(self.engine)]
        self.window = MetricsWindow()
        self.train_seconds = 0.0   # training wall time of this process (eval and save excluded)
        self.qk_stats, self.stats, self.load_acc_LE, self.lr = None, {}, None, None
        self.pending, self.last_logged = [], {}   # per-step device metrics until the next log step
        self.mfu_refused = False

    # -- the loop -------------------------------------------------------------------------------
    def train(self) -> int:
        loop_start = time.perf_counter()
        while self.step < self.train_iters:
            it = self.step + 1
            self.profiler.before_step(it)
            result = self.train_step(it)
            self.profiler.after_step(it)
            self.step, self.lr = it, result.lr
            if result.status is not None and self.skip_step(it, result):
                break
            if result.status is None:
                self.after_step(it, result)
            self.window.iters += 1
            self.maybe_log(it)
            out_of_time = self.out_of_time(loop_start)
            self.maybe_eval(it, force=out_of_time)
            self.mon.flush()
            self.maybe_save(it)
            faults.iteration_sleep()  # tests: time to send a signal mid-run
            if self.should_stop(it, out_of_time):
                break
        else:
            self.save("end of training")
        self.finish()
        return self.exit_code

    def train_step(self, it: int) -> StepResult:
        """Forward/backward over the GAS micro-batches and the optimizer step. The loss guard's
        verdict scales the last micro-batch's loss by 1 (good) or NaN (bad), so a bad iteration
        reaches DeepSpeed with NaN gradients and its overflow check drops the whole step: the
        host learns of it from DeepSpeed's one read and only then asks the verdict why. A finite
        loss with non-finite gradients is dropped the same way ("grad"). Without an overflow
        check in DeepSpeed (`host_guard`), the verdict is read before backward instead."""
        engine, gas = self.engine, self.gas
        result = StepResult(None, lr=engine.get_lr()[0])  # the lr this iteration trains at
        result.dropped_L = torch.zeros(len(self.layer_ids), device=device())
        skipped_before = engine.skipped_steps
        rows = []
        faults.begin_iteration(it, self.rank)
        for m in range(gas):
            b = next(self.train_it)   # on the device already (Prefetcher)
            out = engine(b["input_ids"], labels=b["labels"], documents=b.get("documents"))
            rows.append(torch.stack([(v if v is not None else out.loss.new_zeros(())).detach().float().reshape(())
                                     for v in (out.loss, out.aux_loss, out.z_loss, out.mtp_loss)]))
            if self.model_config.capacity_factor is not None and out.dropped_fraction is not None:
                result.dropped_L += out.dropped_fraction.detach().float()
            scale = faults.grad_scale(it, self.rank)
            if m == gas - 1:
                verdict = self.guard.judge(torch.stack(rows), it)
                result.means = verdict.means
                if self.host_guard:
                    result.status, result.means = verdict.read()   # one more host read per iteration
                    if result.status is not None and gas == 1:
                        break   # nothing accumulated: skipping = not calling backward / step
                scale = verdict.scale * scale
            engine.backward(out.loss * scale)
            engine.step()
        faults.begin_iteration(None, self.rank)
        stepped = not (self.host_guard and result.status is not None and gas == 1)
        result.grad_norm = engine.get_global_grad_norm() if stepped else None
        ds_skipped = engine.skipped_steps > skipped_before
        if not self.host_guard:
            if ds_skipped:   # rare: read why
                result.status, result.means = verdict.read()
                result.status = result.status or "grad"
            return result
        if result.status is None and (ds_skipped or not np.isfinite(host_float(result.grad_norm) or 0.0)):
            result.status = "grad"
        if result.status is not None and stepped and not ds_skipped:
            result.status = "unskippable " + result.status   # the update was applied: the weights are suspect
        return result

    def skip_step(self, it: int, result: StepResult) -> bool:
        """An iteration with a bad loss or non-finite gradients changed nothing. Returns True when
        the run must stop."""
        kind = result.status.split()[-1]
        what = {"nan": f"non-finite loss {result.means[0]}",
                "grad": f"non-finite gradient norm {host_float(result.grad_norm)} (loss {result.means[0]:.4f})",
                "spike": f"spiking loss {result.means[0]:.4f} (EMA {self.guard.state_dict()['ema']})"}[kind]
        if result.status.startswith("unskippable"):
            log0(f"iteration {it}: {what}, but DeepSpeed applied the update (no grad-overflow check in this "
                 "configuration), so the weights are suspect: stopping without saving them (exit 1; the last "
                 "good checkpoint stays `latest`)")
            self.exit_code = EXIT_BAD_LOSS
            return True
        if self.qk_clip is not None:
            self.qk_clip.discard()  # no step: these forwards' logits belong to no update
        update_routing_bias(self.engine, 0.0)  # rate 0: drop this iteration's counts, bias unchanged
        self.skipped_total += 1
        self.consecutive_skips += 1
        policy = self.config.guard.on_loss_spike if kind == "spike" else self.config.guard.on_nan
        if policy == "stop" or self.consecutive_skips > self.config.guard.max_skipped_iters:
            log0(f"iteration {it}: {what}; stopping with a checkpoint of the last good state (exit 1)")
            self.exit_code = EXIT_BAD_LOSS
            self.step -= 1  # this iteration changed nothing: the checkpoint is the state before it
            self.save(f"stopped on {kind} at iteration {it}")
            self.step += 1
            return True
        log0(f"iteration {it}: {what}; iteration skipped (no optimizer step)")
        self.mon.scalars({"train/skipped_iters": self.skipped_total}, it)
        return False

    def after_step(self, it: int, result: StepResult) -> None:
        """Bookkeeping of an optimizer step: QK-clip, routing bias, metrics. Device values wait
        in `pending` for the next log step (`flush_metrics`): no host read here."""
        self.consecutive_skips = 0
        means = result.means
        self.last_loss = means[0]
        self.guard.accept(means[0])
        if self.qk_clip is not None:
            self.qk_stats = self.qk_clip.step()  # after the optimizer step, on the fp32 masters and the module weights
        self.stats = update_routing_bias(self.engine, self.model_config.bias_update_rate) if self.layer_ids else {}
        values = {"train/loss": means[0], "train/aux_loss": means[1], "train/z_loss": means[2],
                  "train/grad_norm": result.grad_norm}
        if self.model_config.num_nextn_predict_layers > 0:
            values["train/mtp_loss"] = means[3]
        if self.qk_stats is not None:
            values.update(qk_clip_scalars(self.qk_stats))
        if self.stats:
            values.update(self._moe_scalars(result.dropped_L))
        self.pending.append((it, values))
        self.mon.scalars({"train/lr": result.lr, "train/consumed_samples": self.train_it.consumed_samples,
                          "train/skipped_iters": self.skipped_total}, it)

    def _moe_scalars(self, dropped_L: torch.Tensor) -> dict:
        counts_LE = self.stats["tokens_per_expert"].float()
        self.load_acc_LE = counts_LE if self.load_acc_LE is None else self.load_acc_LE + counts_LE
        # capacity dropping (capacity_factor): share of this iteration's assignments dropped,
        # per MoE layer, averaged over micro-batches and ranks (0 when dropless)
        track_drops = self.model_config.capacity_factor is not None
        if track_drops and self.world > 1:
            torch.distributed.all_reduce(dropped_L)   # a device tensor: the default group
        drop_frac_L = dropped_L / (self.gas * (self.world if track_drops else 1))
        bias_LE = torch.stack([r.e_score_correction_bias.float() for _, r in routers_of(self.engine)])
        routed = self.global_batch * self.config.data.seq_length * self.model_config.num_experts_per_tok
        return moe_scalars(self.layer_ids, self.stats["max_over_mean"].float(), drop_frac_L, bias_LE, routed,
                           self.stats["load_entropy"], self.stats["rerouted_fraction"])

    def flush_metrics(self) -> dict:
        """The pending steps' metrics to the host in one copy, then to TensorBoard and the console
        window. Returns the last step's values (empty when none was pending)."""
        if not self.pending:
            return {}
        at = [(i, k) for i, (_, vals) in enumerate(self.pending) for k, v in vals.items() if torch.is_tensor(v)]
        if at:
            dev = device()
            stacked = torch.stack([self.pending[i][1][k].detach().reshape(()).to(dev, torch.float64) for i, k in at])
            for (i, k), x in zip(at, to_host(stacked).tolist()):
                self.pending[i][1][k] = x
        for it, vals in self.pending:
            self.mon.scalars(vals, it)
            self.window.add(loss=vals["train/loss"], aux=vals["train/aux_loss"], z=vals["train/z_loss"],
                            mtp=vals.get("train/mtp_loss", 0.0))
        last = self.pending[-1][1]
        self.pending = []
        self.last_logged = last
        return last

    def maybe_log(self, it: int) -> None:
        """Console line and throughput scalars every --log-interval (the one host read of the
        window's metrics); the expert-load heatmap."""
        config = self.config
        if it % config.logging.log_interval == 0 or it == self.train_iters:
            if self.layer_ids and self.pending:   # over the window: token-id -> expert mutual information
                spec_L = expert_specialisation(self.engine)
                self.pending[-1][1].update({"moe/specialisation_mean": spec_L.mean(),
                                            **{f"moe/specialisation/layer_{li}": spec_L[i]
                                               for i, li in enumerate(self.layer_ids)}})
            last = self.flush_metrics() or self.last_logged
            win = self.window
            dt = win.elapsed()
            tok_s = win.iters * self.global_batch * config.data.seq_length / max(dt, 1e-9)
            flops_rank = tok_s * self.fpt["total"] / self.world
            mfu = model_flops_utilisation(flops_rank, self.peak)
            if mfu is None and self.peak and not self.mfu_refused:
                self.mfu_refused = True
                log0(f"MFU not reported: {flops_rank / 1e9:.1f} GFLOP/s per rank exceeds the measured peak "
                     f"{self.peak / 1e9:.1f} GFLOP/s, which therefore does not stand for this step's kernels")
            mem = memory_gb()
            means = win.means()
            log0(console_line(it, self.train_iters, self.train_it.consumed_samples, self.lr, means["loss"],
                              means["aux"], means["z"], last.get("train/grad_norm"), tok_s, flops_rank / 1e12, mfu,
                              last.get("moe/max_over_mean_max"), mem,
                              1000 * dt / max(win.iters, 1), self.skipped_total, extra=self._console_extra(means, last)))
            self.train_seconds += dt
            self.mon.scalars({"perf/tokens_per_s": tok_s, "perf/tflops_per_rank": flops_rank / 1e12, "perf/mfu": mfu,
                              "perf/train_seconds": self.train_seconds,
                              **{f"mem/{k}_gb": v for k, v in mem.items()}}, it)
            self.window = MetricsWindow()
        if self.load_acc_LE is not None and it % (config.logging.heatmap_interval or config.logging.eval_interval) == 0:
            self.mon.heatmap("moe/expert_load", to_host(self.load_acc_LE), self.layer_ids, it)
            self.load_acc_LE = None

    def _console_extra(self, means: dict, last: dict) -> dict:
        extra = {}
        if self.model_config.num_nextn_predict_layers > 0:
            extra["mtp"] = f"{means['mtp']:.4f}"
        drops = [v for k, v in last.items() if k.startswith("moe/dropped_fraction/layer_")]
        if self.model_config.capacity_factor is not None and drops:
            extra["dropped"] = f"{100 * sum(drops) / len(drops):.2f}%"
        if "qk_clip/max_logit" in last:
            extra["max logit"] = f"{last['qk_clip/max_logit']:.1f}"
            extra["clipped heads"] = str(last["qk_clip/clipped_heads"])
        return extra

    def out_of_time(self, loop_start: float) -> bool:
        """--exit-duration-in-mins reached on any rank (agreed across ranks)."""
        if self.config.checkpoint.exit_duration_in_mins is None:
            return False
        elapsed = all_reduce_host(torch.tensor([time.perf_counter() - loop_start], dtype=torch.float64),
                             op=torch.distributed.ReduceOp.MAX)
        return float(elapsed) >= 60.0 * self.config.checkpoint.exit_duration_in_mins

    def maybe_eval(self, it: int, force: bool = False) -> None:
        if not (it % self.config.logging.eval_interval == 0 or it == self.train_iters or force):
            return
        t0 = time.perf_counter()
        val = evaluate(self.engine, self.valid_ds, self.micro, self.config.logging.eval_iters,
                       self.model_config.vocab_size, self.eos_id)
        if self.qk_clip is not None:
            self.qk_clip.discard()  # evaluation forwards are not part of the next step
        if val is not None:
            self.last_val = val
            log0(f"validation at iteration {it}: loss {val:.4f} | ppl {np.exp(min(val, 50)):.2f} "
                 f"({time.perf_counter() - t0:.1f} s)")
            self.mon.scalars({"val/loss": val, "val/ppl": float(np.exp(min(val, 50)))}, it)
        self.window.exclude(time.perf_counter() - t0)  # keep eval time out of tokens/s

    def maybe_save(self, it: int) -> None:
        if self.config.checkpoint.save_interval and it % self.config.checkpoint.save_interval == 0 and it != self.train_iters:
            t0 = time.perf_counter()
            self.save("interval")
            self.window.exclude(time.perf_counter() - t0)

    def should_stop(self, it: int, out_of_time: bool) -> bool:
        """Signals, --exit-interval and --exit-duration-in-mins: save, then leave the loop."""
        if self.stop.agreed():
            log0(f"received signal {self.stop.signum or 'on another rank'}: saving and exiting")
            self.save("signal")
            return True
        if self.config.checkpoint.exit_interval and it % self.config.checkpoint.exit_interval == 0:
            self.save("exit interval")
            return True
        if out_of_time:
            log0(f"--exit-duration-in-mins {self.config.checkpoint.exit_duration_in_mins} reached at iteration {it}: "
                 "saving and exiting")
            self.save("exit duration")
            return True
        return False

    def save(self, reason: str) -> None:
        config = self.config
        if not config.checkpoint.save:
            return
        t0 = time.perf_counter()
        tag = ckpt.save(self.engine, config.checkpoint.save, ckpt.TrainerState(
            step=self.step, model_config=self.model_config.to_dict(), consumed_samples=self.train_it.consumed_samples,
            consumed_samples_per_dataset=consumed_per_dataset(self.train_it), tokenizer=config.data.tokenizer,
            ep_size=self.ep, world_size=self.world, zero_stage=self.stage, autoep=self.use_autoep,
            ds_config=self.ds_config, config=self.config.to_dict(), train_iters=self.train_iters,
            skipped_iters=self.skipped_total, loss_guard=self.guard.state_dict(), train_loss=host_float(self.last_loss),
            val_loss=self.last_val, command=list(sys.argv), megamoe_version=megamoe_version(), reason=reason))
        log0(f"saved checkpoint {Path(config.checkpoint.save) / tag} ({reason}, {time.perf_counter() - t0:.1f} s)")

    def finish(self) -> None:
        self.profiler.close()   # a run that stopped inside the profiled window still writes it
        self.flush_metrics()   # the steps since the last log line still reach TensorBoard
        self.mon.close()
        if self.config.checkpoint.save and self.rank == 0:
            print(f"checkpoints: {Path(self.config.checkpoint.save).resolve()} (latest: {ckpt.read_latest(self.config.checkpoint.save)})",
                  flush=True)
        if self.config.logging.tensorboard_dir and self.rank == 0:
            print(f"tensorboard: tensorboard --logdir {Path(self.config.logging.tensorboard_dir).resolve()}", flush=True)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
