"""Will it fit? Per-GPU memory of a training configuration, before launching it.

DeepSpeed's estimators cover dense models under ZeRO; this one adds what megamoe trains: routed
experts split by expert parallelism (and partitioned over the expert-data-parallel group, not the
whole world), MTP depths, the chunked LM-head loss, MLA's activations, recompute.

Counts come from the model itself (a build on the meta device, so every parameter is counted
exactly); bytes follow what DeepSpeed 0.19.8 allocates:
  weights      model dtype (bf16/fp16: 2 B, fp32: 4 B); ZeRO-3 partitions them, keeps parameters
               under its persistence threshold whole, and gathers the module in use plus its
               prefetch bucket (at most stage3_max_live_parameters)
  gradients    the gradient dtype (the model's unless data_types.grad_accum_dtype says otherwise);
               ZeRO-2/3 keep only this rank's partition plus the reduce bucket(s)
  optimizer    fp32 master partition (4 B) + AdamW m and v (8 B) or Muon momentum (4 B) on the
               hidden matrices; ZeRO-1+ partition it; offload_optimizer moves it to the host
  activations  what autograd saves per token for each block kind (the formulas below, checked
               against the tensors autograd really saves in tests/test_plan.py), times the micro
               batch's tokens; with recompute only each layer's input; in backward one layer's
               gradients (and, with recompute, its activations rebuilt)
  loss         the chunked LM head + cross-entropy: the fp32 weight gradient it accumulates per
               head call (1 + MTP depths), the hidden-state gradient, one chunk of logits
  comm         ZeRO's reduce/all-gather buckets and one MoE layer's all-to-all send/receive buffers
Expert parallelism assumes balanced routing (each rank receives micro x seq x top-k tokens per
MoE layer on average); a skewed router needs headroom, as does the CUDA allocator's
fragmentation (10% is reserved for it by default, --reserve).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from megamoe.config import ModelConfig

GIB = 2 ** 30
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def _int_or(value, default: int) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


# ----------------------------------------------------------------------------------------------
# the run being planned
# ----------------------------------------------------------------------------------------------
@dataclass
class Setup:
    """Everything the plan depends on besides the model; `from_ds_config` reads a DeepSpeed config."""
    gpus: int = 8
    gpu_gib: float = 80.0
    ep: int = 1
    micro_batch: int = 1
    seq_length: int = 4096
    recompute: bool = False
    zero_stage: int = 2
    dtype: str = "bf16"                 # model (and activation) dtype
    grad_dtype: str = "bf16"
    optimizer: str = "adamw"            # adamw | muon
    fused_optimizer: bool = True        # fused AdamW steps in place; the foreach one makes temporaries
    offload_optimizer: bool = False
    reduce_bucket: int = 50_000_000     # elements
    allgather_bucket: int = 50_000_000
    prefetch_bucket: int = 50_000_000   # ZeRO-3: elements gathered ahead of use
    max_live_parameters: int = 1_000_000_000
    persistence_threshold: int = 100_000   # ZeRO-3 keeps smaller parameters whole on every rank
    overlap_comm: bool = True
    device: str = "cuda"                # cuda: FlashAttention and the Triton loss kernel | cpu: SDPA's flash
                                        # kernel on padded head dims and the PyTorch loss chunk
    kernels: str = "auto"               # the target's MEGAMOE_KERNELS: auto | triton | reference (auto:
                                        # Triton on cuda); decides the norms and the CPU experts' padding;
                                        # this process's setting is not read
    reserve: float = 0.10               # share of GPU memory kept free for the allocator

    @classmethod
    def from_ds_config(cls, ds: dict, **kw) -> "Setup":
        zero = ds.get("zero_optimization", {}) or {}
        dtype = "bf16" if (ds.get("bf16") or ds.get("bfloat16") or {}).get("enabled") else \
            "fp16" if (ds.get("fp16") or {}).get("enabled") else "fp32"
        grad = str((ds.get("data_types") or {}).get("grad_accum_dtype") or dtype).replace("float32", "fp32")
        opt = str((ds.get("optimizer") or {}).get("type", "adamw")).lower()
        fused = bool(((ds.get("optimizer") or {}).get("params") or {}).get("fused", False))
        offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
        read = dict(zero_stage=int(zero.get("stage", 0)), dtype=dtype, grad_dtype=grad if grad in _BYTES else dtype,
                    optimizer="muon" if opt == "muon" else "adamw", fused_optimizer=fused, offload_optimizer=offload,
                    reduce_bucket=int(float(zero.get("reduce_bucket_size", 5e8))),
                    allgather_bucket=int(float(zero.get("allgather_bucket_size", 5e8))),
                    prefetch_bucket=int(float(zero.get("stage3_prefetch_bucket_size", 5e7))),
                    max_live_parameters=int(float(zero.get("stage3_max_live_parameters", 1e9))),
                    persistence_threshold=int(float(zero.get("stage3_param_persistence_threshold", 1e5))),
                    overlap_comm=bool(zero.get("overlap_comm", zero.get("stage", 0) == 3)),
                    micro_batch=_int_or(ds.get("train_micro_batch_size_per_gpu"), 1))
        return cls(**{**read, **kw})   # the caller's values win (e.g. --micro-batch)

    def check(self) -> None:
        if self.gpus < 1 or self.ep < 1 or self.gpus % self.ep:
            raise ValueError(f"--ep {self.ep} must divide --gpus {self.gpus}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage {self.zero_stage}: use 0-3")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device {self.device!r}: use cuda or cpu")


# ----------------------------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------------------------
@dataclass
class Params:
    """Parameter counts from a meta build: dense (on every rank before ZeRO), routed experts that
    expert parallelism splits, Muon's share; per parameter and per module, for ZeRO-3's persistent
    small parameters and its gathered working set."""
    dense: int
    experts: int
    muon_dense: int
    muon_experts: int
    numels: list[tuple[int, bool]]    # (numel, split by EP) per parameter
    modules: list[tuple[int, bool]]   # (numel of its own parameters, split by EP) per module

    @classmethod
    def of(cls, cfg: ModelConfig, ep: int) -> "Params":
        from megamoe.model.init import is_routed_expert
        from megamoe.optim import param_kind
        from megamoe.parallel.expert import MOE_LAYER_PATTERN
        pattern = re.compile(MOE_LAYER_PATTERN)
        model = cfg.build(device="meta")
        c = dict(dense=0, experts=0, muon_dense=0, muon_experts=0)
        numels, modules = [], []
        for module_name, module in model.named_modules():
            own = [(f"{module_name}.{leaf}", p) for leaf, p in module._parameters.items() if p is not None]
            split = ep > 1 and any(is_routed_expert(n) for n, _ in own) and bool(pattern.fullmatch(module_name.rpartition(".")[0]))
            for name, p in own:
                where = "experts" if split else "dense"
                c[where] += p.numel()
                c[f"muon_{where}"] += p.numel() if param_kind(name, p) == "matrix" else 0
                numels.append((p.numel(), split))
            if own:
                modules.append((sum(p.numel() for _, p in own), split))
        return cls(numels=numels, modules=modules, **c)


# ----------------------------------------------------------------------------------------------
# activations: elements saved for backward per token, per block kind
# ----------------------------------------------------------------------------------------------
def norm_copies(s: Setup) -> tuple[int, int]:
    """(copies in the activation dtype, fp32 copies) of its width an RMSNorm leaves saved, its
    input and output included. The Triton kernel keeps its input (and an fp32 rstd, counted apart)
    and the layer that reads it keeps its output: (2, 0). The PyTorch reference's autograd keeps
    the input upcast to fp32 and the fp32 normalised values, and the reader its output: (1, 2)."""
    triton = s.kernels == "triton" or (s.kernels == "auto" and s.device == "cuda")
    return (2, 0) if triton else (1, 2)


def attention_saved(cfg: ModelConfig, device: str, n: tuple[int, int] = (1, 2)) -> tuple[float, float]:
    """(elements in the activation dtype, fp32 elements) MLA saves per token, its norm included,
    each norm as `n` copies of its width (norm_copies): the block input's norm, the q low-rank
    output's and the kv latent's, the rope key, q and k [N, dqk], v and the output [N, dv], three
    rstd and the flash kernels' log-sum-exp [N] (fp32). On CPUs SDPA's flash kernel gets q, k and v
    padded to one head dim D (kernels/attention.py) and saves them and its output at D; the output
    projection saves its own [N, dv] copy of the sliced output. No backend keeps an [N, S] row."""
    H, N = cfg.hidden_size, cfg.num_attention_heads
    dqk, dv, C = cfg.qk_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    widths = H + (cfg.q_lora_rank or 0) + C
    elems = n[0] * widths + cfg.qk_rope_head_dim
    if device == "cpu" and dqk != dv:
        elems += 4 * N * max(dqk, dv) + N * dv
    else:
        elems += 2 * N * dqk + 2 * N * dv
    return elems, n[1] * widths + 3.0 + N   # the norms' fp32 copies, their rstd, the log-sum-exp


def mlp_saved(H: int, I: int) -> int:
    """A SwiGLU MLP: its gate and up outputs; backward rebuilds silu(gate) and the product
    (layers.SwiGLUDown)."""
    return 2 * I


def ffn_saved(cfg: ModelConfig, moe: bool, ep: int = 1, n: tuple[int, int] = (1, 2)) -> tuple[float, float]:
    """(activation-dtype elements, fp32 elements) per token of the FFN half of a block, its norm
    and input included (`n` copies: norm_copies). MoE: each of the top-k copies of the token, the
    shared experts, the router's logits and scores (fp32) and its int64 indices/permutation
    (counted as 2 fp32 each).
    Per copy the gate/up output, from which backward recomputes the rest (model/dispatch.py), and
    the expert output kept for the weighted combine; at EP > 1 also the input in expert order that
    AutoEP's all-to-all delivers (at EP 1 the gather from the token's row is redone in backward).
    (DeepSpeed's own experts, which AutoEP runs on pre-Hopper GPUs, keep silu and the product too:
    2I more per copy.)"""
    H = cfg.hidden_size
    elems, fp32 = n[0] * H, n[1] * H + 1.0
    if not moe:
        return elems + mlp_saved(H, cfg.intermediate_size), fp32
    K, I, E = cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.n_routed_experts
    per_copy = H + 2 * I if ep == 1 else 2 * H + 2 * I
    elems += K * per_copy + mlp_saved(H, I * cfg.n_shared_experts) * (cfg.n_shared_experts > 0)
    fp32 += 2 * E + 2 * K + 2 * 3 * K
    return elems, fp32


def block_saved_bytes(cfg: ModelConfig, moe: bool, setup: Setup) -> float:
    """Bytes one block saves per token."""
    a = _BYTES[setup.dtype]
    n = norm_copies(setup)
    ae, af = attention_saved(cfg, setup.device, n)
    fe, ff = ffn_saved(cfg, moe, setup.ep, n)
    return a * (ae + fe) + 4 * (af + ff)


# ----------------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------------
@dataclass
class Plan:
    setup: Setup
    params: Params
    parts: dict[str, float] = field(default_factory=dict)   # name -> bytes per GPU (peak composition)
    flops_per_token: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def usable(self) -> float:
        return self.setup.gpu_gib * GIB * (1 - self.setup.reserve)

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    def tokens_per_second(self, mfu: float, peak_flops: float) -> float:
        """Per GPU, at `mfu` of `peak_flops`."""
        return mfu * peak_flops / self.flops_per_token


def _state_bytes(s: Setup, p: Params) -> dict[str, float]:
    w, g = _BYTES[s.dtype], _BYTES[s.grad_dtype]
    dp, edp = s.gpus, s.gpus // s.ep
    dense, experts = p.dense, p.experts / s.ep               # on this rank before ZeRO
    shard = dense / dp + experts / edp                        # this rank's ZeRO partition
    if s.zero_stage < 3:
        weights = (dense + experts) * w
    else:   # partitions + small parameters kept whole + the gathered working set
        persistent = sum(n / s.ep if split else n for n, split in p.numels if n < s.persistence_threshold)
        largest = max(n / s.ep if split else n for n, split in p.modules)
        gathered = min(s.max_live_parameters, largest + s.prefetch_bucket, dense + experts)
        weights = (shard + persistent + gathered) * w
    grads = (dense + experts) * g if s.zero_stage < 2 else shard * g
    muon = p.muon_dense / dp + p.muon_experts / s.ep / edp if s.zero_stage >= 1 else p.muon_dense + p.muon_experts / s.ep
    held = shard if s.zero_stage >= 1 else dense + experts
    master = 4 * held if (s.zero_stage >= 1 or w != 4) else 0
    moments = 4 * muon + 8 * (held - muon) if s.optimizer == "muon" else 8 * held
    optimizer = 0.0 if s.offload_optimizer else master + moments
    return {"weights": weights, "gradients": grads, "optimizer states": optimizer}


def _activation_bytes(cfg: ModelConfig, s: Setup) -> tuple[float, float]:
    """(what the forward leaves saved for backward: with recompute each layer's input only;
    the backward working set: one layer's gradients and its SwiGLUs' rebuilt products, plus with
    recompute its activations rebuilt)."""
    tokens = s.micro_batch * s.seq_length
    kinds = [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)] + [cfg.is_moe] * cfg.num_nextn_predict_layers
    per_block = [block_saved_bytes(cfg, moe, s) for moe in kinds]
    a, H = _BYTES[s.dtype], cfg.hidden_size
    saved = tokens * (len(kinds) * H * a if s.recompute else sum(per_block))
    saved += sum(kinds) * _cpu_expert_padding(cfg, s) * 2 * cfg.moe_intermediate_size * a
    # norms whose reader keeps nothing (the fused loss saves gradients, not its input; MTP's
    # torch.cat keeps nothing either): their output is not saved
    n_a, n_f = norm_copies(s)
    norm = (n_a - 1) * H * a + n_f * H * 4 + 4
    saved += tokens * norm                                                              # the final norm
    saved += tokens * cfg.num_nextn_predict_layers * (3 * norm + 2 * H * a)   # MTP: 3 norms, the concat
    # backward also rebuilds each SwiGLU's silu(gate) and product (MLPs and routed experts alike)
    rebuilt = [2 * a * (cfg.intermediate_size if not moe else cfg.moe_intermediate_size
                        * (cfg.n_shared_experts + cfg.num_experts_per_tok)) for moe in kinds]
    work = max(b + r for b, r in zip(per_block, rebuilt)) + (max(per_block) if s.recompute else 0)
    return saved, tokens * work


def _cpu_expert_padding(cfg: ModelConfig, s: Setup) -> float:
    """Rows one MoE layer's saved [gate | up] gains on CPUs in bf16, where each expert's rows are
    padded to a multiple of kernels.expert_row_block (dispatch.PaddedRows), at the mean row count:
    up to the block below it, half a block on average above it. 0 on GPUs and in fp32."""
    import torch

    from megamoe.kernels import row_block
    B = row_block(s.device, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[s.dtype],
                  s.kernels)
    if B == 1 or not cfg.is_moe:
        return 0.0
    local = cfg.n_routed_experts / s.ep
    mean = s.micro_batch * s.seq_length * cfg.num_experts_per_tok / local   # this rank's pairs per local expert
    return local * (B - mean if mean < B else (B - 1) / 2)


def _loss_bytes(cfg: ModelConfig, s: Setup) -> tuple[float, float]:
    """(saved until backward: per head call the weight gradient and the hidden-state gradient, in
    the model dtype; while a head call runs: one chunk's logits (in the model dtype, plus the fp32
    log-sum-exp pass of the PyTorch path; the Triton kernel works in place) and, for a 16-bit
    model, the fp32 weight-gradient sum before its cast)."""
    from megamoe.kernels.reference import device_lm_chunk
    tokens, a, V, H = s.micro_batch * s.seq_length, _BYTES[s.dtype], cfg.vocab_size, cfg.hidden_size
    heads = 1 + cfg.num_nextn_predict_layers
    chunk = min(tokens, device_lm_chunk(V, s.device))
    building = 4 * V * H if a != 4 else 0
    return heads * (a * V * H + tokens * H * a), chunk * V * (a if s.device == "cuda" else a + 4) + building


def _comm_bytes(cfg: ModelConfig, s: Setup) -> float:
    g, w = _BYTES[s.grad_dtype], _BYTES[s.dtype]
    tokens = s.micro_batch * s.seq_length
    comm = 0.0
    if s.zero_stage >= 1:
        comm += min(s.reduce_bucket, 1e12) * g * (2 if s.overlap_comm else 1)
    if s.ep > 1 and cfg.is_moe:   # one MoE layer's dispatch and combine: send + receive
        comm += 2 * 2 * tokens * cfg.num_experts_per_tok * cfg.hidden_size * w
    return comm


def plan(cfg: ModelConfig, setup: Setup) -> Plan:
    """The per-GPU peak: the states, the buffers, and the largest of the three moments that add to
    them (the loss chunk at the end of the forward, the start of the backward, the optimizer step:
    the fp32 gradient partition, and AdamW's temporaries of the same size unless it is fused)."""
    from megamoe.monitor import flops_per_token
    from megamoe.parallel.expert import check_ep_size
    setup.check()
    check_ep_size(cfg, setup.ep, setup.gpus)
    p = Params.of(cfg, setup.ep)
    parts = _state_bytes(setup, p)
    saved, backward = _activation_bytes(cfg, setup)
    loss_saved, loss_chunk = _loss_bytes(cfg, setup)
    shard = p.dense / setup.gpus + p.experts / setup.ep / (setup.gpus // setup.ep)
    step = 0.0 if setup.offload_optimizer else (1 if setup.fused_optimizer else 2) * 4 * shard
    moments = {"loss chunk": loss_chunk, "backward": backward, "optimizer step": step - saved - loss_saved}
    peak_at = max(moments, key=moments.get)
    parts.update({"activations": saved, "loss (chunked LM head)": loss_saved,
                  f"transient ({peak_at})": moments[peak_at],
                  "communication buffers": _comm_bytes(cfg, setup)})
    return Plan(setup, p, parts, flops_per_token(cfg, setup.seq_length)["total"])


def largest_micro_batch(cfg: ModelConfig, setup: Setup, limit: int = 4096) -> int:
    """The largest micro batch that fits (0: not even 1)."""
    import dataclasses
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if plan(cfg, dataclasses.replace(setup, micro_batch=mid)).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo


def format_plan(cfg_name: str, pl: Plan, largest: int, mfu: float, peak_flops: float) -> str:
    s, p = pl.setup, pl.params
    lines = [f"{cfg_name}: {(p.dense + p.experts) / 1e9:.2f}B parameters ({p.experts / 1e9:.2f}B in "
             f"routed experts split over EP); {s.gpus} GPUs x {s.gpu_gib:g} GiB, EP {s.ep}, ZeRO-{s.zero_stage}, "
             f"{s.dtype}, {s.optimizer}{' (offloaded)' if s.offload_optimizer else ''}, micro batch {s.micro_batch} "
             f"x {s.seq_length} tokens, recompute {'on' if s.recompute else 'off'}",
             f"{'per GPU':<28}{'GiB':>10}"]
    lines += [f"  {k:<26}{v / GIB:>10.2f}" for k, v in pl.parts.items()]
    verdict = "fits" if pl.fits else "does NOT fit"
    lines.append(f"  {'total':<26}{pl.total / GIB:>10.2f}   {verdict} in {pl.usable / GIB:.1f} GiB "
                 f"({s.gpu_gib:g} GiB less {s.reserve:.0%} reserve)")
    lines.append(f"largest micro batch that fits: {largest}" + ("" if largest else " (none: shard further, "
                 "raise EP, ZeRO-3, recompute, or offload the optimizer)"))
    tps = pl.tokens_per_second(mfu, peak_flops)
    lines.append(f"training FLOPs per token {pl.flops_per_token / 1e9:.2f} GFLOP; at {mfu:.0%} MFU of "
                 f"{peak_flops / 1e12:.0f} TFLOP/s: {tps:,.0f} tokens/s per GPU, {tps * s.gpus:,.0f} per job")
    return "\n".join(lines)
