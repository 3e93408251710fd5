"""The run configuration: `TrainConfig`, typed sections built from Megatron-style flags and
reconciled with the DeepSpeed JSON in one function (`TrainConfig.resolve`).

Who owns what (so nothing is set in two places):
* the DeepSpeed config owns batch sizes, precision, ZeRO stage, optimizer and clipping;
* the command line owns the model, data, schedule (--lr, --min-lr, --lr-warmup-iters,
  --lr-decay-style), length of training, checkpointing, logging and expert parallelism, and the
  parameter groups (--no-weight-decay-on, --lr-mult; rules in megamoe.optim);
* QK-clip's tau comes from --qk-clip-tau or the config's trainer-owned `"qk_clip": {"tau": ...}`
  block (ds_configs/muonclip.json), which is removed before DeepSpeed sees the config.
A flag that duplicates a config value (--micro-batch-size, --global-batch-size, --bf16,
--clip-grad, --weight-decay, --lr when the config's optimizer has an lr) must agree with it:
a contradiction is a `ConfigConflict`, never a silent override. After `resolve` every field holds
the value the run uses (the batch triple, lr, clipping, precision, optimizer, ZeRO stage).

Resume: the config is saved in every checkpoint and `resume_changes` compares it with this run's,
field by field, by each field's `resume` policy:
* "apply"  may change (length, schedule, intervals, logging, guards, batch size, the weights of
  the same data files for a curriculum): applied, printed;
* "refuse" would silently corrupt the run (data, split, seed, sequence length, tokenizer,
  optimizer, precision, parameter groups): an error listing every difference, unless named in
  --allow-resume-change;
* "ignore" is checked elsewhere (the model by checkpoint.check_model_config, the layout by
  checkpoint.check_compatible) or is a location (--save, --load).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megamoe.optim import DEFAULT_NO_DECAY, KINDS
from megamoe.schedule import DECAY_STYLES


class ConfigConflict(ValueError):
    """A command-line argument contradicts the DeepSpeed config (or the config is unusable)."""


def _f(default: Any = None, resume: str = "apply", factory=None):
    meta = {"resume": resume}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSection:
    model_config: str = _f("", "ignore")          # checkpoint.check_model_config compares the model itself
    model_override: dict = _f(resume="ignore", factory=dict)
    make_vocab_size_divisible_by: int = _f(128, "ignore")   # the model it gives is compared
    recompute_activations: bool = _f(False)
    deterministic: bool = _f(False)                 # megamoe.distributed.set_deterministic


@dataclass
class DataConfig:
    data_path: list = _f(resume="refuse", factory=list)
    split: str = _f("99,1", "refuse")
    valid_data_path: Optional[list] = _f(None)
    tokenizer: Optional[str] = _f(None, "refuse")
    seq_length: int = _f(0, "refuse")
    seed: int = _f(1234, "refuse")                # the data order and the initial weights
    reset_attention_mask: bool = _f(False)


@dataclass
class OptimConfig:
    """Optimization and schedule. The batch triple, lr, weight decay, clipping, precision and the
    optimizer type hold the resolved values (flag or DeepSpeed config) after `resolve`."""
    train_iters: Optional[int] = _f(None)
    train_tokens: Optional[int] = _f(None)
    lr: Optional[float] = _f(None)
    min_lr: float = _f(0.0)
    lr_warmup_iters: int = _f(0)
    lr_decay_style: str = _f("cosine")
    lr_wsd_decay_iters: Optional[int] = _f(None)
    optimizer: Optional[str] = _f(None, "refuse")  # Adam moments do not load into Muon, nor back
    weight_decay: Optional[float] = _f(None)
    clip_grad: Optional[float] = _f(None)
    qk_clip_tau: Optional[float] = _f(None)
    no_weight_decay_on: list = _f(resume="refuse", factory=lambda: list(DEFAULT_NO_DECAY))  # the optimizer's groups
    lr_mult: dict = _f(resume="refuse", factory=dict)                                        # likewise
    micro_batch_size: Optional[int] = _f(None)
    gradient_accumulation_steps: Optional[int] = _f(None)
    global_batch_size: Optional[int] = _f(None)
    bf16: Optional[bool] = _f(None, "refuse")


@dataclass
class ParallelConfig:
    deepspeed_config: str = _f("", "ignore")       # its contents are the fields above
    expert_model_parallel_size: int = _f(1, "ignore")   # layout: checkpoint.check_compatible
    world_size: Optional[int] = _f(None, "ignore")
    zero_stage: Optional[int] = _f(None, "ignore")


@dataclass
class CheckpointConfig:
    save: Optional[str] = _f(None, "ignore")
    save_interval: Optional[int] = _f(None)
    load: Optional[str] = _f(None, "ignore")
    exit_interval: Optional[int] = _f(None)
    exit_duration_in_mins: Optional[float] = _f(None)
    allow_resume_change: list = _f(resume="ignore", factory=list)
    trust_checkpoint: bool = _f(False, "ignore")


@dataclass
class LoggingConfig:
    log_interval: int = _f(10)
    eval_interval: int = _f(1000)
    eval_iters: int = _f(10)
    tensorboard_dir: Optional[str] = _f(None)
    heatmap_interval: Optional[int] = _f(None)
    profile: bool = _f(False, "ignore")                     # megamoe.profiler
    profile_step_start: int = _f(10, "ignore")
    profile_step_end: int = _f(12, "ignore")
    profile_ranks: list = _f(resume="ignore", factory=lambda: [0])
    profile_dir: Optional[str] = _f(None, "ignore")


@dataclass
class GuardConfig:
    on_nan: str = _f("stop")
    loss_spike_factor: float = _f(0.0)
    on_loss_spike: str = _f("skip")
    max_skipped_iters: int = _f(10)


# The schedule `make demo` trains with and bench/quality.py compares at (both read it from here).
# WSD beat cosine to 2e-4 for small-moe and small-dense alike at the demo's 300 iterations: over
# three seeds, 0.04-0.07 nats lower held-out loss and half the seed-to-seed spread (README,
# "Does the MoE help?").
DEMO_SCHEDULE_FLAGS = ("--lr", "2e-3", "--min-lr", "2e-5", "--lr-warmup-iters", "10", "--lr-decay-style", "wsd")


SECTIONS = {"model": ModelSection, "data": DataConfig, "optim": OptimConfig, "parallel": ParallelConfig,
            "checkpoint": CheckpointConfig, "logging": LoggingConfig, "guard": GuardConfig}


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    ds_config: Optional[dict] = None   # the reconciled DeepSpeed config (what the engine gets), after resolve
    adapted: list = field(default_factory=list)   # changes made to it for the accelerator

    @classmethod
    def from_flags(cls, args: argparse.Namespace) -> "TrainConfig":
        """Each flag's value goes to the section field of the same name (Megatron's flag names)."""
        flags = vars(args)
        return cls(**{name: sec(**{f.name: flags[f.name] for f in dataclasses.fields(sec) if f.name in flags})
                      for name, sec in SECTIONS.items()})

    def resolve(self, world_size: int, device_type: str = "cpu") -> "TrainConfig":
        """Load the DeepSpeed JSON, reconcile it with the flags (raises ConfigConflict) and adapt it
        to the accelerator (`adapted`: what was changed, for the start-up log)."""
        path = self.parallel.deepspeed_config
        self.ds_config = reconcile_ds_config(load_ds_config(path), self, world_size, source=path)
        self.adapted = adapt_to_accelerator(self.ds_config, device_type)
        return self

    @property
    def train_iters(self) -> int:
        o = self.optim
        if o.train_iters is not None:
            return int(o.train_iters)
        return max(1, math.ceil(o.train_tokens / (o.global_batch_size * self.data.seq_length)))

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def describe(self) -> str:
        """The run's settings, one section per line group (printed at start)."""
        lines = []
        for name in SECTIONS:
            sec = getattr(self, name)
            lines.append(f"  {name}: " + ", ".join(f"{f.name}={getattr(sec, f.name)!r}"
                                                   for f in dataclasses.fields(sec)))
        return "run config:\n" + "\n".join(lines)

    def resume_changes(self, saved: dict, where: str = "") -> list[str]:
        """Compare with a checkpoint's saved config. Returns the applied changes ("field: old -> new");
        raises ConfigConflict naming every refused one."""
        applied, refused = [], []
        allowed = set(self.checkpoint.allow_resume_change)
        for name, sec in SECTIONS.items():
            old = saved.get(name)
            if not isinstance(old, dict):
                continue   # a checkpoint without a saved config (weights-only, older): nothing to compare
            for f in dataclasses.fields(sec):
                new = getattr(getattr(self, name), f.name)
                if f.name not in old or _same(old[f.name], new) or f.metadata["resume"] == "ignore":
                    continue
                change = f"{f.name}: {old[f.name]!r} -> {new!r}"
                policy = f.metadata["resume"]
                if f.name == "data_path" and _same_files(old[f.name], new):
                    policy, change = "apply", change + " (blend weights only: a curriculum step)"
                (refused if policy == "refuse" and f.name not in allowed else applied).append(change)
        if refused:
            raise ConfigConflict(
                f"resuming {where} with settings that would silently change the run: {'; '.join(refused)}. Resume "
                f"with the checkpoint's values, or accept the change explicitly with --allow-resume-change "
                f"{' '.join(c.split(':')[0] for c in refused)}")
        return applied


def _same_files(old: list, new: list) -> bool:
    """Two --data-path values naming the same files (in order), whatever their weights."""
    from megamoe.data.dataset import parse_data_path
    try:
        return parse_data_path(old)[1] == parse_data_path(new)[1]
    except ValueError:
        return False


def _same(a, b) -> bool:
    # JSON turns tuples into lists; floats written and read back compare exactly
    return json.loads(json.dumps(a, default=str)) == json.loads(json.dumps(b, default=str))


def refusable_fields() -> list[str]:
    return [f.name for sec in SECTIONS.values() for f in dataclasses.fields(sec) if f.metadata["resume"] == "refuse"]


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------
def _model_and_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model-config", required=True, help="preset name (tiny, small-moe, ...) or a .json/.yaml file")
    g.add_argument("--model-override", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override ModelConfig fields, e.g. vocab_size=8192 (JSON values)")
    g.add_argument("--data-path", nargs="+", required=True, metavar="[W] PREFIX",
                   help="Megatron data path: PREFIX or W1 PREFIX1 W2 PREFIX2 ...")
    g.add_argument("--split", default="99,1", help="train,valid document split of each data path (Megatron)")
    g.add_argument("--valid-data-path", nargs="+", default=None,
                   help="separate validation data (then --split is not applied to --data-path)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer file/dir; recorded in checkpoints; the model's vocab_size becomes its size, "
                        "padded (Megatron)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the tokenizer's vocabulary to a multiple of this (aligned embedding and head GEMMs)")
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="packed documents attend within themselves only (a new one after every EOS token of the "
                        "model config); default: across the packed sequence, as DeepSeek-V3 trains")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--recompute-activations", action="store_true", help="activation checkpointing per block")
    g.add_argument("--deterministic", action="store_true",
                   help="bitwise-reproducible GPU runs: torch's deterministic algorithms, cuBLAS workspace config, "
                        "FlashAttention's deterministic backward, SDPA's math kernel on CUDA (slower)")


def _schedule_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training length and schedule")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-tokens", type=int, default=None, help="alternative to --train-iters")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (or the config's optimizer lr)")
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-style", choices=DECAY_STYLES, default="cosine")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                   help="WSD: length of the final linear decay (default: 20%% of --train-iters)")


def _deepspeed_flags(p: argparse.ArgumentParser) -> None:
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


def _checkpoint_and_logging_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--load", default=None, help="resume from this directory's `latest` (no-op when empty)")
    g.add_argument("--exit-interval", type=int, default=None, help="save and exit 0 after this iteration")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="evaluate, save and exit 0 once the training loop has run this long (wall clock, "
                        "start-up excluded; agreed across ranks)")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="load --load files that name classes beyond DeepSpeed's checkpoint classes (unpickling "
                        "can run code; see megamoe/checkpoint/pickles.py)")
    g.add_argument("--allow-resume-change", nargs="*", default=[], metavar="FIELD", choices=refusable_fields(),
                   help="resume although these settings differ from the checkpoint's (refused otherwise: "
                        f"{', '.join(refusable_fields())})")

    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--heatmap-interval", type=int, default=None,
                   help="expert-load heatmap image every N iterations (default: --eval-interval)")
    g.add_argument("--profile", action="store_true",
                   help="torch.profiler over iterations [--profile-step-start, --profile-step-end): a Chrome "
                        "trace and an op table per rank (megamoe/profiler.py)")
    g.add_argument("--profile-step-start", type=int, default=10)
    g.add_argument("--profile-step-end", type=int, default=12)
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[0], metavar="RANK")
    g.add_argument("--profile-dir", default=None, help="default: <--tensorboard-dir>/profile, else profile/")

    g = p.add_argument_group("bad losses")
    g.add_argument("--on-nan", choices=("skip", "stop"), default="stop",
                   help="non-finite loss: skip the iteration's update, or save a checkpoint and exit 1")
    g.add_argument("--loss-spike-factor", type=float, default=0.0,
                   help="a loss above F x its running mean is a spike (0: off)")
    g.add_argument("--on-loss-spike", choices=("skip", "stop"), default="skip")
    g.add_argument("--max-skipped-iters", type=int, default=10,
                   help="stop (with a checkpoint) after this many consecutive skipped iterations")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megamoe.pretrain",
        description="Pretrain a DeepSeek-V3-style MoE LM with DeepSpeed. Batch sizes, precision, ZeRO stage, "
                    "optimizer and clipping come from --deepspeed-config; everything else from these flags "
                    "(Megatron-LM names).")
    for add in (_model_and_data_flags, _schedule_flags, _deepspeed_flags, _checkpoint_and_logging_flags):
        add(p)
    return p


def parse_args(argv: Optional[list[str]] = None) -> TrainConfig:
    """The flags as a TrainConfig (not yet reconciled with the DeepSpeed config: `resolve`)."""
    p = build_parser()
    args = p.parse_args(argv)
    if (args.train_iters is None) == (args.train_tokens is None):
        p.error("give exactly one of --train-iters / --train-tokens")
    if args.save_interval is not None and not args.save:
        p.error("--save-interval needs --save")
    if args.expert_model_parallel_size < 1:
        p.error("--expert-model-parallel-size must be >= 1")
    for name in ("seq_length", "log_interval", "eval_interval", "make_vocab_size_divisible_by"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    try:
        args.lr_mult = parse_lr_mult(args.lr_mult)
        args.model_override = parse_overrides(args.model_override)
    except ValueError as e:
        p.error(str(e))
    if args.qk_clip_tau is not None and not (0 < args.qk_clip_tau < float("inf")):
        p.error(f"--qk-clip-tau must be a positive number, got {args.qk_clip_tau}")
    return TrainConfig.from_flags(args)


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


def ds_config_at_precision(path, precision: str, out_dir) -> Path:
    """A copy of the DeepSpeed config at `path` with bf16 on ("bf16") or off ("fp32"), written
    to out_dir (the CPU demo and benchmarks run fp32 where the CPU has no fast bf16)."""
    ds = load_ds_config(str(path))
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    out = Path(out_dir) / f"{Path(path).stem}_{precision}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(ds, indent=2))
    return out


def reconcile_ds_config(ds: dict, cfg: TrainConfig, world_size: int, source: str = "ds config") -> dict:
    """A copy of `ds` with the batch triple resolved and the lr filled in, and `cfg`'s optimization
    fields set to the values the run uses; raises ConfigConflict on any contradiction."""
    ds = copy.deepcopy(ds)

    def conflict(msg: str):
        raise ConfigConflict(f"{source}: {msg}")

    _reconcile_batch(ds, cfg.optim, world_size, conflict)
    _reconcile_optimizer(ds, cfg.optim, conflict)
    _reconcile_qk_clip(ds, cfg.optim, conflict)
    if "scheduler" in ds:
        conflict("has a 'scheduler' block; the schedule comes from --lr-decay-style/--lr-warmup-iters/--min-lr "
                 "(remove the block)")
    ep = cfg.parallel.expert_model_parallel_size
    if world_size % ep:
        conflict(f"--expert-model-parallel-size {ep} does not divide the world size {world_size}")
    block = ds.get("expert_parallel")
    if block and block.get("enabled", True) and int(block.get("autoep_size", 1)) != ep:
        conflict(f"expert_parallel.autoep_size {block.get('autoep_size')} contradicts "
                 f"--expert-model-parallel-size {ep} (drop the block: it is derived from the model config)")
    cfg.parallel.world_size, cfg.parallel.zero_stage = world_size, zero_stage(ds)
    return ds


def _int_field(ds: dict, key: str, conflict) -> Optional[int]:
    v = ds.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        conflict(f"{key} must be an integer, got {v!r}")
    return v


def _reconcile_batch(ds: dict, o: OptimConfig, world_size: int, conflict) -> None:
    """DeepSpeed's triple: train_batch = micro * GAS * data-parallel world."""
    micro, gas, tbs = (_int_field(ds, k, conflict) for k in
                       ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"))
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
    if o.micro_batch_size is not None and o.micro_batch_size != micro:
        conflict(f"--micro-batch-size {o.micro_batch_size} contradicts train_micro_batch_size_per_gpu {micro}")
    if o.global_batch_size is not None and o.global_batch_size != tbs:
        conflict(f"--global-batch-size {o.global_batch_size} contradicts the config's global batch {tbs} "
                 f"(= micro {micro} x GAS {gas} x world {world_size})")
    ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"] = micro, gas, tbs
    o.micro_batch_size, o.gradient_accumulation_steps, o.global_batch_size = micro, gas, tbs


def _reconcile_optimizer(ds: dict, o: OptimConfig, conflict) -> None:
    """Precision, clipping, weight decay, lr; Muon's clipping and ZeRO-3 traps."""
    if ds.get("fp16", {}).get("enabled"):
        import torch
        if not torch.cuda.is_available():
            conflict("fp16 is not supported by DeepSpeed's CPU accelerator; use bf16")
    bf16 = bool(ds.get("bf16", {}).get("enabled", False))
    if o.bf16 and not bf16:
        conflict("--bf16 given but bf16.enabled is not true")
    clip = float(ds.get("gradient_clipping", 0.0))
    if o.clip_grad is not None and not math.isclose(o.clip_grad, clip):
        conflict(f"--clip-grad {o.clip_grad} contradicts gradient_clipping {clip}")
    opt = ds.get("optimizer")
    if not opt or "type" not in opt:
        conflict("needs an 'optimizer' block with a 'type' (see ds_configs/)")
    params = opt.setdefault("params", {})
    if o.weight_decay is not None and "weight_decay" in params and not math.isclose(
            o.weight_decay, params["weight_decay"]):
        conflict(f"--weight-decay {o.weight_decay} contradicts optimizer.params.weight_decay {params['weight_decay']}")
    if o.weight_decay is not None:
        params["weight_decay"] = o.weight_decay
    if "lr" in params and o.lr is not None and not math.isclose(o.lr, params["lr"]):
        conflict(f"--lr {o.lr} contradicts optimizer.params.lr {params['lr']}")
    if o.lr is None and "lr" not in params:
        conflict("no learning rate: pass --lr (or set optimizer.params.lr)")
    params["lr"] = float(o.lr if o.lr is not None else params["lr"])
    if o.min_lr > params["lr"]:
        conflict(f"--min-lr {o.min_lr} is above the peak lr {params['lr']}")
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
    o.bf16, o.clip_grad, o.lr = bf16, clip, params["lr"]
    o.weight_decay = float(params.get("weight_decay", 0.0))
    o.optimizer = str(opt["type"]).lower()


def _reconcile_qk_clip(ds: dict, o: OptimConfig, conflict) -> None:
    """The trainer-owned "qk_clip" block, removed before DeepSpeed sees the config."""
    qk = ds.pop("qk_clip", None)
    if qk is None:
        return
    if not isinstance(qk, dict) or "tau" not in qk:
        conflict('"qk_clip" must be {"tau": <max attention logit>}')
    tau = float(qk["tau"])
    if o.qk_clip_tau is not None and not math.isclose(o.qk_clip_tau, tau):
        conflict(f"--qk-clip-tau {o.qk_clip_tau} contradicts qk_clip.tau {tau}")
    if not (tau > 0 and math.isfinite(tau)):
        conflict(f"qk_clip.tau must be a positive number, got {qk['tau']!r}")
    o.qk_clip_tau = tau


def adapt_to_accelerator(ds: dict, device_type: str) -> list[str]:
    """The shipped configs are what a GPU run should use; on the CPU accelerator, turn off (in
    place) what needs CUDA: communication overlap (CUDA streams) and pinned offload buffers.
    Returns the changes, for the start-up log."""
    if device_type != "cpu":
        return []
    changes = []
    zero = ds.get("zero_optimization") or {}
    if zero.get("overlap_comm"):
        zero["overlap_comm"] = False
        changes.append("zero_optimization.overlap_comm: true -> false (no CUDA streams to overlap on the CPU)")
    for key in ("offload_optimizer", "offload_param"):
        off = zero.get(key)
        if isinstance(off, dict) and off.get("pin_memory"):
            off["pin_memory"] = False
            changes.append(f"zero_optimization.{key}.pin_memory: true -> false (pinned memory is for GPU copies)")
    return changes


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
