"""Monitoring: model FLOPs per token, device peak and MFU, TensorBoard scalars and the
experts x layers load heatmap, memory, and the Megatron-style console line.

FLOPs per token (training = forward + backward = 3 x forward, each multiply-add = 2 FLOPs):
  * matmuls: 6 x (active matmul parameters): attention projections of MLA as they are
    computed in training (q_a/q_b or q, kv_a, kv_b, o), dense MLPs, the shared experts, the
    router, only the `num_experts_per_tok` routed experts a token visits, and the LM head (a
    matmul even when tied; the input embedding is a lookup and norm weights are no matmul, so
    neither is counted); each MTP depth adds its eh_proj, block and another pass of the LM head.
    tests/train/test_training_units.py checks this against torch's FlopCounterMode;
  * attention: per layer and token, QK^T costs 2*h*qk_head_dim*S' and PV 2*h*v_head_dim*S'
    forward, where S' = (S+1)/2 is the mean number of keys a query attends to under the causal
    mask; x3 for training: 6 * h * (qk_head_dim + v_head_dim) * (S+1)/2.
MFU = achieved model FLOP/s / peak. Peak: the bf16 dense tensor-core peak of known GPUs; on CPU,
a torch.matmul timing in this process at the training dtype (said so in the log).
"""
from __future__ import annotations

import os
import platform
import resource
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from megamoe.config import ModelConfig

# Dense bf16 tensor-core peak FLOP/s (no sparsity), by substring of torch.cuda.get_device_name().
GPU_BF16_PEAK = [
    ("GB200", 2.5e15), ("B200", 2.25e15), ("B100", 1.75e15),
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("H20", 148e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("A10G", 70e12), ("A10", 125e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("MI300X", 1307e12), ("MI250X", 383e12),
]


def flops_per_token(cfg: ModelConfig, seq_length: int) -> dict[str, float]:
    """Training FLOPs per token: {"matmul", "attention", "total"} (see module docstring)."""
    n = cfg.num_params()
    dense_active = n["active"] - n["embedding"] - n["norm"]   # drops the input embedding lookup ...
    if cfg.tie_word_embeddings:
        dense_active += cfg.vocab_size * cfg.hidden_size  # ... but a tied LM head is still a matmul
    matmul = 6.0 * (dense_active + n["mtp_matmul"])
    h = cfg.num_attention_heads
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    attn = layers * 6.0 * h * (cfg.qk_head_dim + cfg.v_head_dim) * (seq_length + 1) / 2
    return {"matmul": matmul, "attention": attn, "total": matmul + attn}


def measure_cpu_matmul_peak(dtype=torch.bfloat16, n: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of a square torch.matmul at `dtype` on this process's threads (best of a few runs)."""
    # A private generator: the trainer measures this after restoring a checkpoint's RNG state, and
    # drawing from the global one would shift every later random number (router jitter, dropout).
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.matmul(a, b)  # warm-up
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        dt = time.perf_counter() - t0
        best = max(best, 2 * n ** 3 / dt)
        if time.perf_counter() > deadline:
            return best


def faster_cpu_precision() -> str:
    """"bf16" where this CPU's bf16 matmul outruns fp32 (AMX, or AVX512-BF16: 4.5x fp32 on a Zen 5
    EPYC), else "fp32": without either, bf16 matmuls run a hundred times slower, and a bf16 demo
    that takes minutes would take hours."""
    bf16 = measure_cpu_matmul_peak(torch.bfloat16, 512, 0.2)
    fp32 = measure_cpu_matmul_peak(torch.float32, 512, 0.2)
    return "bf16" if bf16 > fp32 else "fp32"


def device_name() -> str:
    """The GPU's name, or the CPU's model (cpu_name): what a timing was measured on (the same
    code's CPU timings differ by more than its changes do from one host to another)."""
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        return torch.cuda.get_device_name()
    return cpu_name()


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def device_peak_flops(dtype=torch.bfloat16) -> tuple[Optional[float], str]:
    """(peak FLOP/s per rank, how it was obtained)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in GPU_BF16_PEAK:
            if key in name:
                return peak, f"{name}: bf16 dense peak {peak / 1e12:.0f} TFLOP/s from the spec table"
        return None, f"{name}: not in the peak table (monitor.GPU_BF16_PEAK); MFU not reported"
    peak = measure_cpu_matmul_peak(dtype)
    return peak, (f"CPU: measured {str(dtype).replace('torch.', '')} matmul peak {peak / 1e9:.1f} GFLOP/s "
                  f"per rank ({torch.get_num_threads()} thread(s)); MFU is relative to it")


def mfu(achieved_flops: float, peak_flops: Optional[float]) -> Optional[float]:
    """achieved / peak, or None when there is no peak or the step beat it: then the measured peak
    does not stand for the step's kernels (e.g. a CPU without AMX, whose bf16 matmul is emulated
    and slower than the fp32 work the step also does), and a ratio above 1 would mean nothing."""
    if not peak_flops or achieved_flops > peak_flops:
        return None
    return achieved_flops / peak_flops


def memory_gb() -> dict[str, float]:
    if torch.cuda.is_available():
        return {"allocated": torch.cuda.memory_allocated() / 2 ** 30,
                "max_allocated": torch.cuda.max_memory_allocated() / 2 ** 30}
    rss = 0.0
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30
    except OSError:
        pass
    return {"rss": rss, "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def heatmap_figure(load_LE, layer_ids: list[int], title: str = "expert load / mean"):
    """A matplotlib figure of experts (x) by MoE layers (y), colour = tokens / mean tokens."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rel = load_LE / load_LE.mean(-1, keepdim=True).clamp_min(1e-9)
    L, E = rel.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.25 * E + 2), max(2.5, 0.35 * L + 1.5)))
    im = ax.imshow(rel.numpy(), aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(L), [str(i) for i in layer_ids])
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def moe_scalars(layer_ids: list[int], max_over_mean_L: torch.Tensor, dropped_fraction_L: torch.Tensor,
                bias_LE: torch.Tensor, routed_per_layer: float, load_entropy_L: Optional[torch.Tensor] = None,
                rerouted_L: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """TensorBoard scalars of one optimizer step's expert load (all ranks' tokens):
    max/mean load per layer, capacity-dropped share per layer and in tokens, routing-bias size,
    and what the routing does: load entropy / log E per layer (1 = all experts equally used) and
    the share of (token, slot) picks the aux-loss-free bias changed (balance.update_routing_bias).
    `routed_per_layer` = (token, slot) assignments per MoE layer in the step. Values stay 0-d
    tensors on their device (the trainer reads them once per log interval)."""
    out = {"moe/max_over_mean_max": max_over_mean_L.max(),
           "moe/dropped_tokens": (dropped_fraction_L * routed_per_layer).sum(),
           "moe/dropped_fraction_max": dropped_fraction_L.max(),
           "moe/bias_abs_mean": bias_LE.abs().mean(),
           "moe/bias_abs_max": bias_LE.abs().max()}
    for i, li in enumerate(layer_ids):
        out[f"moe/max_over_mean/layer_{li}"] = max_over_mean_L[i]
        out[f"moe/dropped_fraction/layer_{li}"] = dropped_fraction_L[i]
    for name, per_layer in (("load_entropy", load_entropy_L), ("rerouted_fraction", rerouted_L)):
        if per_layer is not None and per_layer.numel():
            out[f"moe/{name}_mean"] = per_layer.mean()
            out.update({f"moe/{name}/layer_{li}": per_layer[i] for i, li in enumerate(layer_ids)})
    return out


def read_scalars(tb_dir, tag: str) -> dict[int, float]:
    """{step: value} of one scalar across a run's TensorBoard event files (later files win)."""
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out: dict[int, float] = {}
    for f in sorted(Path(tb_dir).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars(tag)})
    return out


class MetricsWindow:
    """Losses and timing since the last console line: means over accepted optimizer steps, wall
    time over every iteration (skipped ones included), evaluation and save time excluded."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.n = 0        # accepted optimizer steps
        self.iters = 0    # iterations, skipped ones included
        self.t0 = time.perf_counter()

    def add(self, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1

    def means(self) -> dict[str, float]:
        n = max(self.n, 1)
        return {k: v / n for k, v in {"loss": 0.0, "aux": 0.0, "z": 0.0, "mtp": 0.0, **self.sums}.items()}

    def exclude(self, seconds: float) -> None:
        self.t0 += seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


class Monitor:
    """Rank 0 writes TensorBoard; every rank may call (others are no-ops)."""

    def __init__(self, tensorboard_dir: Optional[str], enabled: bool):
        self.writer = None
        self.no_figures = False
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=tensorboard_dir)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None:
                self.writer.add_scalar(k, float(v), step)

    def heatmap(self, tag: str, load_LE, layer_ids, step: int) -> None:
        if self.writer is None or self.no_figures:
            return
        try:
            import matplotlib.pyplot as plt
        except ImportError as e:   # a minimal environment (e.g. a GPU box without it): scalars still go out
            self.no_figures = True
            warnings.warn(f"matplotlib is not importable ({e}): the {tag} heatmap is skipped; the per-layer "
                          "load scalars are still written")
            return
        fig = heatmap_figure(load_LE, layer_ids)
        self.writer.add_figure(tag, fig, step)
        plt.close(fig)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def console_line(it: int, total: int, consumed: int, lr: float, loss: float, aux: float, z: float,
                 grad_norm: Optional[float], tokens_per_s: float, tflops: float, mfu: Optional[float],
                 imbalance: Optional[float], mem: dict, ms_per_iter: float, skipped: int,
                 extra: Optional[dict] = None) -> str:
    """One Megatron-style line; `extra` adds "key value" fields (MTP loss, dropped share, QK-clip)."""
    parts = [f"iteration {it:>6}/{total}", f"consumed samples {consumed:>9}", f"ms/it {ms_per_iter:8.1f}",
             f"lr {lr:.3e}", f"loss {loss:.4f}", f"aux {aux:.2e}", f"z {z:.2e}",
             f"grad norm {grad_norm:.3f}" if grad_norm is not None else "grad norm n/a",
             f"tokens/s {tokens_per_s:,.0f}", f"TFLOP/s {tflops:.3f}",
             f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU n/a"]
    for k, v in (extra or {}).items():
        parts.append(f"{k} {v}")
    if imbalance is not None:
        parts.append(f"max/mean load {imbalance:.2f}")
    parts.append(" ".join(f"{k} {v:.2f}GB" for k, v in mem.items()))
    if skipped:
        parts.append(f"skipped {skipped}")
    return " | ".join(parts)
