"""Training-loop pieces behind megamoe/pretrain.py: arguments, DeepSpeed-config reconciliation,
the learning-rate schedule and the routing-bias fallback (the bad-loss guard is megamoe/guard.py).

Who owns what (so nothing is set in two places):
* the DeepSpeed config owns batch sizes, precision, ZeRO stage, optimizer and clipping;
* the command line owns the model, data, schedule (--lr, --min-lr, --lr-warmup-iters,
  --lr-decay-style), length of training, checkpointing, logging and expert parallelism, and the
  parameter groups (--no-weight-decay-on, --lr-mult; rules in megamoe.optim);
* QK-clip's tau comes from --qk-clip-tau or the config's trainer-owned `"qk_clip": {"tau": ...}`
  block (ds_configs/muonclip.json), which is removed before DeepSpeed sees the config.
A flag that duplicates a config value (--micro-batch-size, --global-batch-size, --bf16,
--clip-grad, --weight-decay, --lr when the config's optimizer has an lr) must agree with it:
a contradiction is a `ConfigConflict`, never a silent override.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path
from typing import Any, Optional

from megamoe.optim import DEFAULT_NO_DECAY, KINDS

DECAY_STYLES = ("cosine", "wsd", "constant")


class ConfigConflict(ValueError):
    """A command-line argument contradicts the DeepSpeed config (or the config is unusable)."""


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megamoe.pretrain",
        description="Pretrain a DeepSeek-V3-style MoE LM with DeepSpeed. Batch sizes, precision, ZeRO stage, "
                    "optimizer and clipping come from --deepspeed-config; everything else from these flags "
                    "(Megatron-LM names).")
    g = p.add_argument_group("model and data")
    g.add_argument("--model-config", required=True, help="preset name (tiny, small-moe, ...) or a .json/.yaml file")
    g.add_argument("--model-override", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override ModelConfig fields, e.g. vocab_size=8192 (JSON values)")
    g.add_argument("--data-path", nargs="+", required=True, metavar="[W] PREFIX",
                   help="Megatron data path: PREFIX or W1 PREFIX1 W2 PREFIX2 ...")
    g.add_argument("--split", default="99,1", help="train,valid document split of each data path (Megatron)")
    g.add_argument("--valid-data-path", nargs="+", default=None,
                   help="separate validation data (then --split is not applied to --data-path)")
    g.add_argument("--tokenizer", default=None, help="tokenizer file/dir; recorded in checkpoints, vocab checked")
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--recompute-activations", action="store_true", help="activation checkpointing per block")

    g = p.add_argument_group("training length and schedule")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-tokens", type=int, default=None, help="alternative to --train-iters")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (or the config's optimizer lr)")
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-style", choices=DECAY_STYLES, default="cosine")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                   help="WSD: length of the final linear decay (default: 20%% of --train-iters)")

    g = p.add_argument_group("DeepSpeed (cross-checked against the config, never overriding it)")
    g.add_argument("--deepspeed-config", "--deepspeed_config", "--deepspeed", dest="deepspeed_config", required=True,
                   metavar="JSON", help="DeepSpeed config (ds_configs/*.json)")
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--bf16", action="store_true", default=None)
    g.add_argument("--clip-grad", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--qk-clip-tau", type=float, default=None,
                   help="MuonClip QK-clip: after every step rescale the q/k weights of attention heads whose max "
                        "pre-softmax logit exceeded TAU (Kimi K2 uses 100); or the config's qk_clip.tau")
    g.add_argument("--no-weight-decay-on", nargs="*", default=list(DEFAULT_NO_DECAY), metavar="KIND",
                   choices=list(KINDS),
                   help=f"parameter kinds without weight decay (kinds: {', '.join(KINDS)}; default: "
                        f"{' '.join(DEFAULT_NO_DECAY)}; give none to decay everything)")
    g.add_argument("--lr-mult", nargs="*", default=[], metavar="KIND=FACTOR",
                   help="per-kind learning-rate multiplier, e.g. embedding=0.5 router=0.1 (kinds as above)")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--load", default=None, help="resume from this directory's `latest` (no-op when empty)")
    g.add_argument("--exit-interval", type=int, default=None, help="save and exit 0 after this iteration")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="evaluate, save and exit 0 once the training loop has run this long (wall clock, "
                        "start-up excluded; agreed across ranks)")

    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--heatmap-interval", type=int, default=None,
                   help="expert-load heatmap image every N iterations (default: --eval-interval)")

    g = p.add_argument_group("bad losses")
    g.add_argument("--on-nan", choices=("skip", "stop"), default="stop",
                   help="non-finite loss: skip the iteration's update, or save a checkpoint and exit 1")
    g.add_argument("--loss-spike-factor", type=float, default=0.0,
                   help="a loss above F x its running mean is a spike (0: off)")
    g.add_argument("--on-loss-spike", choices=("skip", "stop"), default="skip")
    g.add_argument("--max-skipped-iters", type=int, default=10,
                   help="stop (with a checkpoint) after this many consecutive skipped iterations")
    return p


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if (args.train_iters is None) == (args.train_tokens is None):
        p.error("give exactly one of --train-iters / --train-tokens")
    if args.save_interval is not None and not args.save:
        p.error("--save-interval needs --save")
    if args.expert_model_parallel_size < 1:
        p.error("--expert-model-parallel-size must be >= 1")
    for name in ("seq_length", "log_interval", "eval_interval"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    try:
        args.lr_mult = parse_lr_mult(args.lr_mult)
    except ValueError as e:
        p.error(str(e))
    if args.qk_clip_tau is not None and not (0 < args.qk_clip_tau < float("inf")):
        p.error(f"--qk-clip-tau must be a positive number, got {args.qk_clip_tau}")
    return args


def parse_lr_mult(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or k not in KINDS:
            raise ValueError(f"--lr-mult expects KIND=FACTOR with KIND one of {', '.join(KINDS)}; got {item!r}")
        try:
            f = float(v)
        except ValueError:
            raise ValueError(f"--lr-mult {item!r}: {v!r} is not a number") from None
        if not (f >= 0 and math.isfinite(f)):
            raise ValueError(f"--lr-mult {item!r}: the factor must be a finite number >= 0")
        out[k] = f
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--model-override expects FIELD=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


# ----------------------------------------------------------------------------------------------
# DeepSpeed config
# ----------------------------------------------------------------------------------------------
def load_ds_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigConflict(f"--deepspeed-config {p}: file not found (see ds_configs/)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigConflict(f"{p}: invalid JSON at line {e.lineno}: {e.msg}") from None


def reconcile_ds_config(ds: dict, args: argparse.Namespace, world_size: int, source: str = "ds config") -> dict:
    """A copy of `ds` with the batch triple resolved and the lr filled in; raises ConfigConflict
    on any contradiction with the arguments. The returned dict is what the engine gets."""
    ds = copy.deepcopy(ds)

    def conflict(msg: str):
        raise ConfigConflict(f"{source}: {msg}")

    # -- batch sizes: DeepSpeed's triple train_batch = micro * GAS * data-parallel world
    micro = ds.get("train_micro_batch_size_per_gpu")
    gas = ds.get("gradient_accumulation_steps")
    tbs = ds.get("train_batch_size")
    if micro is None and tbs is not None and gas is not None:
        micro = tbs // (gas * world_size)
    if micro is None:
        conflict("set train_micro_batch_size_per_gpu (batch sizes come from the DeepSpeed config)")
    if gas is None:
        gas = (tbs // (micro * world_size)) if tbs is not None else 1
    if tbs is not None and tbs != micro * gas * world_size:
        conflict(f"train_batch_size {tbs} != train_micro_batch_size_per_gpu {micro} x gradient_accumulation_steps "
                 f"{gas} x world size {world_size}")
    tbs = micro * gas * world_size
    if args.micro_batch_size is not None and args.micro_batch_size != micro:
        conflict(f"--micro-batch-size {args.micro_batch_size} contradicts train_micro_batch_size_per_gpu {micro}")
    if args.global_batch_size is not None and args.global_batch_size != tbs:
        conflict(f"--global-batch-size {args.global_batch_size} contradicts the config's global batch {tbs} "
                 f"(= micro {micro} x GAS {gas} x world {world_size})")
    ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"] = micro, gas, tbs

    # -- precision
    if ds.get("fp16", {}).get("enabled"):
        import torch
        if not torch.cuda.is_available():
            conflict("fp16 is not supported by DeepSpeed's CPU accelerator; use bf16")
    bf16 = bool(ds.get("bf16", {}).get("enabled", False))
    if args.bf16 and not bf16:
        conflict("--bf16 given but bf16.enabled is not true")

    # -- clipping / weight decay / lr
    clip = float(ds.get("gradient_clipping", 0.0))
    if args.clip_grad is not None and not math.isclose(args.clip_grad, clip):
        conflict(f"--clip-grad {args.clip_grad} contradicts gradient_clipping {clip}")
    opt = ds.get("optimizer")
    if not opt or "type" not in opt:
        conflict("needs an 'optimizer' block with a 'type' (see ds_configs/)")
    params = opt.setdefault("params", {})
    if args.weight_decay is not None and "weight_decay" in params and not math.isclose(
            args.weight_decay, params["weight_decay"]):
        conflict(f"--weight-decay {args.weight_decay} contradicts optimizer.params.weight_decay {params['weight_decay']}")
    if args.weight_decay is not None:
        params["weight_decay"] = args.weight_decay
    if "lr" in params and args.lr is not None and not math.isclose(args.lr, params["lr"]):
        conflict(f"--lr {args.lr} contradicts optimizer.params.lr {params['lr']}")
    if args.lr is None and "lr" not in params:
        conflict("no learning rate: pass --lr (or set optimizer.params.lr)")
    params["lr"] = float(args.lr if args.lr is not None else params["lr"])
    if args.min_lr > params["lr"]:
        conflict(f"--min-lr {args.min_lr} is above the peak lr {params['lr']}")

    # -- Muon: clipping and ZeRO-3 traps
    if str(opt["type"]).lower() == "muon":
        if clip > 0:
            conflict(f"optimizer Muon with gradient_clipping {clip} is refused: DeepSpeed's ZeRO and bf16 "
                     "optimizers orthogonalise Muon's gradients (Newton-Schulz) BEFORE the clipping norm is "
                     "taken, so the norm is that of the orthogonalised updates (~sqrt(min(rows, cols)) per "
                     "matrix) and clipping at 1.0 silently shrinks every update tens of times. Set "
                     "gradient_clipping to 0 (Muon's updates are norm-bounded already; QK-clip via "
                     "--qk-clip-tau bounds the attention logits), or use AdamW if you need clipping.")
        zero = ds.get("zero_optimization", {})
        if int(zero.get("stage", 0)) == 3 and zero.get("reduce_scatter", True):
            conflict('optimizer Muon under ZeRO-3 needs "reduce_scatter": false in zero_optimization '
                     "(DeepSpeed gathers whole Muon gradients for Newton-Schulz)")

    # -- QK-clip (trainer-owned block, never seen by DeepSpeed)
    qk = ds.pop("qk_clip", None)
    if qk is not None:
        if not isinstance(qk, dict) or "tau" not in qk:
            conflict('"qk_clip" must be {"tau": <max attention logit>}')
        tau = float(qk["tau"])
        if getattr(args, "qk_clip_tau", None) is not None and not math.isclose(args.qk_clip_tau, tau):
            conflict(f"--qk-clip-tau {args.qk_clip_tau} contradicts qk_clip.tau {tau}")
        if not (tau > 0 and math.isfinite(tau)):
            conflict(f"qk_clip.tau must be a positive number, got {qk['tau']!r}")
        args.qk_clip_tau = tau

    # -- schedule: the trainer's (one formula for cosine/wsd/constant, resumable with the engine)
    if "scheduler" in ds:
        conflict("has a 'scheduler' block; the schedule comes from --lr-decay-style/--lr-warmup-iters/--min-lr "
                 "(remove the block)")
    # -- expert parallelism
    ep = args.expert_model_parallel_size
    if world_size % ep:
        conflict(f"--expert-model-parallel-size {ep} does not divide the world size {world_size}")
    block = ds.get("expert_parallel")
    if block and block.get("enabled", True) and int(block.get("autoep_size", 1)) != ep:
        conflict(f"expert_parallel.autoep_size {block.get('autoep_size')} contradicts "
                 f"--expert-model-parallel-size {ep} (drop the block: it is derived from the model config)")
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def train_iters_from(args, global_batch: int) -> int:
    if args.train_iters is not None:
        return int(args.train_iters)
    return max(1, math.ceil(args.train_tokens / (global_batch * args.seq_length)))


# ----------------------------------------------------------------------------------------------
# Learning-rate schedule
# ----------------------------------------------------------------------------------------------
class LRSchedule:
    """lr multiplier after `n` completed optimizer steps (so iteration n+1 trains at base * f(n)).

    Linear warmup from lr/warmup (never 0: DeepSpeed's WarmupDecayLR/WarmupCosineLR train the
    first step at warmup_min_lr, 0 by default), then
      cosine:   lr -> min_lr along a half cosine until train_iters;
      wsd:      constant lr, then a linear decay to min_lr over the last `wsd_decay_iters`;
      constant: lr.
    DeepSpeed ships no WSD and no absolute min_lr for cosine, so the three styles share this
    one formula, run by a torch LambdaLR that DeepSpeed steps and checkpoints with the engine.
    Picklable (a plain object), so LambdaLR.state_dict() carries it.
    """

    def __init__(self, style: str, lr: float, min_lr: float, warmup_iters: int, train_iters: int,
                 wsd_decay_iters: Optional[int] = None):
        if style not in DECAY_STYLES:
            raise ValueError(f"--lr-decay-style must be one of {DECAY_STYLES}, got {style!r}")
        self.style, self.lr, self.min_lr = style, float(lr), float(min_lr)
        self.warmup, self.total = int(warmup_iters), int(train_iters)
        self.wsd_decay = int(wsd_decay_iters if wsd_decay_iters is not None else max(1, round(0.2 * train_iters)))

    def __call__(self, n: int) -> float:
        it = n + 1  # the iteration this lr is used for (1-based)
        if self.warmup > 0 and it <= self.warmup:
            return it / self.warmup
        if self.style == "constant":
            return 1.0
        floor = self.min_lr / self.lr if self.lr > 0 else 0.0
        if self.style == "cosine":
            span = max(1, self.total - self.warmup)
            t = min(1.0, (it - self.warmup) / span)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        # wsd
        start = self.total - self.wsd_decay
        if it <= start:
            return 1.0
        t = min(1.0, (it - start) / self.wsd_decay)
        return 1.0 + (floor - 1.0) * t


def lr_scheduler_factory(schedule: LRSchedule):
    """What deepspeed.initialize(lr_scheduler=...) takes: a callable on the engine's optimizer."""
    def make(optimizer):
        import torch
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return make


# ----------------------------------------------------------------------------------------------
# Routers
# ----------------------------------------------------------------------------------------------
def routers_of(module) -> list:
    """(layer_idx, router) of the model inside an engine (or the bare model); the bias update
    itself is megamoe.parallel.balance.update_routing_bias."""
    m = getattr(module, "module", module)
    return list(m.routers()) if hasattr(m, "routers") else []


# ----------------------------------------------------------------------------------------------
# Bad losses
# ----------------------------------------------------------------------------------------------
