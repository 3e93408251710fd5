"""One-GPU acceptance check of megamoe's GPU path: `make gpu-check` (at most ~8 minutes on an H200).

    python bench/gpu_check.py [--out runs/gpu_check.json]     # on a CUDA machine
    python bench/gpu_check.py --cpu                            # the same script at tiny shapes (in make test)

Four parts; every check is a row of the table and of the JSON report, and any failed row makes
the exit status 1:
  kernels     Triton RMSNorm / RoPE / router / fused LM-head loss vs the PyTorch reference
              (float64 oracle), forward and backward, bf16 and fp32, at DeepSeek-V3 shapes:
              RMSNorm at 7168 and on a strided latent slice, RoPE with 128 heads, routers 256
              experts top-8 groups 8/4 (sigmoid) and 64 experts top-6 (softmax) over T=16384
              tokens with a NaN row, the loss at vocabulary 129,280; and the loss's time at its
              default chunk against one chunk.
  attention   every attention backend that can run, qk 192 / v 128, S=4096, forward and
              backward: agreement with the fp32 eager oracle and time; and forward over packed
              documents (FlashAttention's varlen kernels) against the masked oracle.
  syncs       host syncs of one MoE layer (megamoe.syncs.HostSyncCounter, and on CUDA also
              torch.cuda.set_sync_debug_mode), and of steady-state training iterations.
  end_to_end  DeepSeek-V2-Lite cut to 4 layers, 1 rank, DeepSpeed ZeRO-2 bf16, micro batch
              4 x 4096: 40 iterations with an eval and a save, a resume for 10 more, and a
              straight 50-iteration run to compare against: loss falls, resumed losses match,
              tokens/s, MFU against a bf16 matmul peak measured in this run, peak memory, and
              that peak against the memory planner's figure for the same setup (within 15%).
Without CUDA (and without --cpu) it says so and exits 0. --cpu interprets the Triton kernels
(TRITON_INTERPRET=1) and shrinks every shape, so the script itself is exercised in CI.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]   # megamoe itself comes from the install (or make gpu-check's PYTHONPATH)
ZERO2 = ROOT / "ds_configs" / "zero2.json"    # the config the training runs use, and the planner plans

FULL = dict(T=16384, hidden=7168, latent=512, rope=64, heads=128, B=1, S=4096, attn_heads=16, e2e_seq=4096,
            e2e_micro=4, e2e_iters=50, e2e_save=40, e2e_layers=4, preset="deepseek-v2-lite", peak_n=8192,
            lr="3e-4", warmup="5", ce_tokens=2048, ce_hidden=1024, ce_vocab=129280)
TINY = dict(T=64, hidden=96, latent=48, rope=16, heads=4, B=1, S=64, attn_heads=2, e2e_seq=32,
            e2e_micro=4, e2e_iters=16, e2e_save=12, e2e_layers=3, preset="tiny", peak_n=256, lr="3e-3", warmup="2",
            ce_tokens=64, ce_hidden=32, ce_vocab=1000)
TOL = {"float32": 1e-4, "bfloat16": 2e-2}   # max |err| / max |oracle|, per output and gradient
RESUME_TOL = {"cuda": 2e-2, "cpu": 0.0}     # |resumed loss - straight-run loss| per iteration


def row(part: str, name: str, ok: bool, **detail) -> dict:
    return {"part": part, "name": name, "ok": bool(ok), **detail}


def rel_err(got, want) -> float:
    import torch
    if got is None or want is None:
        return 0.0 if got is None and want is None else float("inf")
    got, want = got.detach().double(), want.detach().double()
    finite = torch.isfinite(want)
    if not torch.equal(finite, torch.isfinite(got)):
        return float("inf")
    return float((got - want)[finite].abs().max() / want[finite].abs().max().clamp_min(1e-30))


def compare(part: str, name: str, fn: Callable, ref: Callable, inputs: list, dtype) -> dict:
    """fn(inputs in dtype) vs ref(inputs in float64): outputs and input gradients."""
    import torch

    def run(f, cast):
        xs = [x.detach().to(cast).requires_grad_(x.is_floating_point()) if torch.is_tensor(x) else x
              for x in inputs]
        out = f(*xs)
        outs = out if isinstance(out, tuple) else (out,)
        floats = [o for o in outs if o.is_floating_point()]
        g = torch.Generator(device=floats[0].device).manual_seed(0)
        loss = sum((o.float() * torch.randn(o.shape, generator=g, device=o.device)).nan_to_num().sum()
                   for o in floats if o.requires_grad)
        if torch.is_tensor(loss):
            loss.backward()
        grads = [x.grad for x in xs if torch.is_tensor(x) and x.requires_grad]
        return outs, grads

    got, got_g = run(fn, dtype)
    # the oracle sees the same (rounded) input values, computed in float64
    inputs = [x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x for x in inputs]
    want, want_g = run(ref, torch.float64)
    errs = {}
    for i, (a, b) in enumerate(zip(got, want)):
        errs[f"out{i}"] = (0.0 if torch.equal(a.cpu(), b.cpu()) else float("inf")) if not a.is_floating_point() \
            else rel_err(a, b)
    for i, (a, b) in enumerate(zip(got_g, want_g)):
        errs[f"grad{i}"] = rel_err(a, b)
    tol = TOL[str(dtype).replace("torch.", "")]
    worst = max(errs.values())
    return row(part, f"{name} {str(dtype).replace('torch.', '')}", worst <= tol, max_rel_err=worst, tol=tol,
               errors=errs)


# ----------------------------------------------------------------------------------------------
def check_kernels(dev, s: dict) -> list[dict]:
    import torch

    from megamoe import kernels
    from megamoe.kernels import reference
    kernels.set_backend("triton")
    g = torch.Generator(device="cpu").manual_seed(0)
    T, H, L, R = s["T"], s["hidden"], s["latent"], s["rope"]
    w = torch.rand(H, generator=g) + 0.5
    latent_full = torch.randn(T, L + R, generator=g)
    cos, sin = (f(torch.rand(1, min(T, s["S"]), R // 2, generator=g) * 6.28) for f in (torch.cos, torch.sin))
    q_pe = torch.randn(1, cos.shape[1], s["heads"], R, generator=g)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(T, H, generator=g).to(dev)
        rows.append(compare("kernels", f"rms_norm [{T}, {H}]", lambda a, b: kernels.rms_norm(a, b, 1e-6),
                            lambda a, b: reference.rms_norm(a, b, 1e-6), [x, w.to(dev)], dtype))
        sl = latent_full.to(dev)
        rows.append(compare("kernels", f"rms_norm strided [{T}, {L}] of [{T}, {L + R}]",
                            lambda a, b: kernels.rms_norm(a[:, :L], b, 1e-6),
                            lambda a, b: reference.rms_norm(a[:, :L], b, 1e-6),
                            [sl, torch.rand(L, generator=g).to(dev) + 0.5], dtype))
        rows.append(compare("kernels", f"rope {list(q_pe.shape)}",
                            lambda a, c, d: kernels.apply_rope(a, c, d, True),
                            lambda a, c, d: reference.apply_rope(a, c, d, True),
                            [q_pe.to(dev), cos.to(dev), sin.to(dev)], dtype))
        rows += router_rows(dev, s, dtype, g)
        rows.append(loss_row(dev, s, dtype, g))
    rows.append(loss_chunk_row(dev, s, g))
    kernels.set_backend(None)
    return rows


def _loss_inputs(s: dict, g, dev):
    """(h [T, H], w [V, H] on the CPU, labels on `dev`) for the fused loss's rows."""
    import torch
    T, H, V = s["ce_tokens"], s["ce_hidden"], s["ce_vocab"]
    h, w = torch.randn(T, H, generator=g), torch.randn(V, H, generator=g) * 0.05
    return h, w, torch.randint(0, V, (T,), generator=g).to(dev)


def loss_row(dev, s: dict, dtype, g) -> dict:
    """The fused LM head + loss (kernels/cross_entropy.py per chunk) at DeepSeek-V3's vocabulary."""
    import torch

    from megamoe import kernels
    from megamoe.kernels import reference
    h, w, y = _loss_inputs(s, g, dev)
    (T, H), V = h.shape, w.shape[0]
    fused = ("fp32 GEMM accumulation" if kernels.gemm_accumulates_in_fp32(dev, dtype)
             else "addmm_ into the sum" if dtype == torch.float32 else "16-bit products added")
    return compare("kernels", f"fused LM head + loss [{T}, {H}] x vocab {V} ({fused})",
                   lambda a, b: kernels.linear_cross_entropy(a, b, y),
                   lambda a, b: reference.linear_cross_entropy(a, b, y), [h.to(dev), w.to(dev)], dtype)


def loss_chunk_row(dev, s: dict, g) -> dict:
    """The fused loss's time (bf16, forward and backward) at its default chunk and as one chunk:
    each chunk adds its [V, H] weight gradient into the fp32 sum, which at the default chunk
    (256 MiB of fp32 logits: 519 tokens at vocabulary 129,280) leaves that matmul memory-bound on
    its fp32 output. The measurement that decides whether GPUs want larger chunks."""
    import torch

    from megamoe import kernels
    from megamoe.kernels.reference import device_lm_chunk
    h, w, y = (t.to(dev, torch.bfloat16).requires_grad_() if t.is_floating_point() else t
               for t in _loss_inputs(s, g, dev))
    T, V = h.shape[0], w.shape[0]
    chunk = device_lm_chunk(V, dev.type)
    ms = {n: 1000 * timed(lambda: kernels.linear_cross_entropy(h, w, y, -100, c).backward(), dev)
          for n, c in (("default_chunk_ms", chunk), ("one_chunk_ms", T))}
    return row("kernels", f"fused LM head + loss time, bf16: chunks of {min(chunk, T)} vs one of {T} tokens", True,
               **ms)


def router_rows(dev, s: dict, dtype, g) -> list[dict]:
    import torch

    from megamoe import kernels
    from megamoe.kernels import reference
    rows = []
    for E, K, func, groups, topk_groups in ((256, 8, "sigmoid", 8, 4), (64, 6, "softmax", 1, 1)):
        logits = torch.randn(s["T"], E, generator=g)
        logits[5] = float("nan")   # a NaN row: every rank must still route it somewhere valid
        bias = (torch.randn(E, generator=g) * 0.1).to(dev)
        args = (bias, K, func, groups, topk_groups, True, 2.5)
        def dense(route):   # weights scattered to [T, E]: independent of the order of the top-k slots
            def f(x):
                w, idx = route(x, *args)[:2]
                return torch.zeros(x.shape, dtype=w.dtype, device=x.device).scatter(1, idx, w)
            return f
        r = compare("kernels", f"router E={E} top-{K} {func} groups {groups}/{topk_groups} [{s['T']}, {E}] + NaN row",
                    dense(kernels.route), dense(reference.route), [logits.to(dev)], dtype)
        _, idx, _, counts = kernels.route(logits.to(dev, dtype), *args)
        valid = bool(((idx >= 0) & (idx < E)).all()) and int(counts.sum()) == s["T"] * K
        r["ok"] = r["ok"] and valid
        r["indices_valid"] = valid
        rows.append(r)
    return rows


# ----------------------------------------------------------------------------------------------
def timed(fn: Callable, dev, repeat: int = 3) -> float:
    import torch
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def check_attention(dev, s: dict) -> list[dict]:
    import torch

    import importlib

    from megamoe.kernels import reference
    attn = importlib.import_module("megamoe.kernels.attention")   # the package re-exports the function
    B, S, N = s["B"], s["S"], s["attn_heads"]
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k = (torch.randn(B, S, N, 192, generator=g).to(dev) for _ in range(2))
    v = torch.randn(B, S, N, 128, generator=g).to(dev)
    scale = 192 ** -0.5
    oracle = compare("attention", "oracle", lambda a, b, c: reference.attention(a, b, c, scale, True),
                     lambda a, b, c: reference.attention(a, b, c, scale, True), [q, k, v], torch.float32)
    rows = []
    for name in attn.available_backends(dev, torch.bfloat16, 192, 128) + ["unavailable"]:
        if name == "unavailable":
            for missing, why in attn.unavailable_backends(dev, torch.bfloat16, 192, 128).items():
                rows.append(row("attention", f"{missing}: not run", True, reason=why))
            continue
        r = compare("attention", f"{name} qk192/v128 S={S} heads {N}",
                    lambda a, b, c: attn.attention(a, b, c, scale, True, backend=name),
                    lambda a, b, c: reference.attention(a, b, c, scale, True), [q, k, v], torch.bfloat16)
        r["ok"] = r["ok"] and documents_agree(attn, reference, name, q, k, v, scale, r)
        qb, kb, vb = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
        r["fwd_bwd_ms"] = 1000 * timed(lambda: attn.attention(qb, kb, vb, scale, True, backend=name)
                                       .float().sum().backward(), dev)
        rows.append(r)
    if dev.type == "cuda":
        rows.append(sdpa_padded_row(attn, reference, q, k, v, scale, S, N, dev))
    return rows if oracle["ok"] else rows + [oracle]


def sdpa_padded_row(attn, reference, q, k, v, scale, S, N, dev) -> dict:
    """SDPA with v padded to 192 (what the sdpa backend does on CPUs, where it runs the flash
    kernel instead of the math path), timed next to the sdpa row: on CUDA the sdpa backend leaves
    MLA's dims as they are (the memory-efficient kernel takes them); whether padding into SDPA's
    flash kernel is faster there has not been measured on a GPU yet."""
    import torch
    import torch.nn.functional as F

    def padded(a, b, c):
        qp, kp, vp = attn._one_head_dim(a, b, c)
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (qp, kp, vp)), is_causal=True, scale=scale)
        return out.transpose(1, 2)[..., :c.shape[-1]]
    r = compare("attention", f"sdpa, v padded to 192, qk192/v128 S={S} heads {N}", padded,
                lambda a, b, c: reference.attention(a, b, c, scale, True), [q, k, v], torch.bfloat16)
    qb, kb, vb = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
    r["fwd_bwd_ms"] = 1000 * timed(lambda: padded(qb, kb, vb).float().sum().backward(), dev)
    return r


def documents_agree(attn, reference, name, q, k, v, scale, r: dict) -> bool:
    """The same backend over packed documents (varlen) vs the fp32 oracle with the document mask."""
    import torch
    B, S = q.shape[:2]
    ids = torch.ones(B, S, dtype=torch.long)
    ids[:, torch.randperm(S, generator=torch.Generator().manual_seed(1))[:8]] = 0   # 8 document ends per row
    docs = attn.documents_of(ids, eos_id=0).to(q.device)
    got = attn.attention(*(t.to(torch.bfloat16) for t in (q, k, v)), scale, True, backend=name, documents=docs)
    want = reference.attention(q, k, v, scale, True, mask_BSS=docs.mask_BSS())
    r["documents_max_rel_err"] = rel_err(got, want)
    return r["documents_max_rel_err"] <= TOL["bfloat16"]


# ----------------------------------------------------------------------------------------------
def check_syncs(dev, s: dict) -> list[dict]:
    import torch

    from megamoe.config import ModelConfig
    from megamoe.model.moe import MoE
    from megamoe.syncs import HostSyncCounter
    cfg = ModelConfig.load("tiny" if dev.type == "cpu" else "deepseek-v3",
                           **({} if dev.type == "cpu" else {"hidden_size": 1024, "moe_intermediate_size": 256}))
    layer = MoE(cfg).to(dev, torch.bfloat16)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(2, 256, cfg.hidden_size, device=dev, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()   # warm-up: kernels compiled, allocator primed
    debug_syncs = 0
    with HostSyncCounter(where=True) as counter:
        if dev.type == "cuda":
            import warnings
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    layer(x).float().sum().backward()
                    torch.cuda.synchronize()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            debug_syncs = sum("synchroniz" in str(w.message) for w in caught)
        else:
            layer(x).float().sum().backward()
    rows = [row("syncs", f"MoE layer fwd+bwd ({cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok})",
                counter.total == 0 and debug_syncs == 0, host_sync_ops=dict(counter.seen), sites=dict(counter.sites),
                cuda_sync_debug_warnings=debug_syncs)]
    return rows + loop_sync_rows(dev)


LOOP_AUDIT = """
import json, sys, warnings
import torch
from megamoe import trainer
from megamoe.syncs import HostSyncCounter, loop_syncs
from megamoe.train_config import parse_args
t = trainer.Trainer(parse_args(sys.argv[1:]))
cuda = torch.cuda.is_available()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
    try:
        rc, per = loop_syncs(t, HostSyncCounter())
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
warned = sum("synchroniz" in str(w.message) for w in caught)
print("SYNCS " + json.dumps({"rc": rc, "per": per, "cuda_sync_warnings": warned}))
"""


def loop_sync_rows(dev) -> list[dict]:
    """Steady-state iterations of the real loop (1 rank, tiny, ds_configs/zero2.json): the budget by
    HostSyncCounter; on CUDA also the warnings of torch.cuda.set_sync_debug_mode over the run
    (reported: they include DeepSpeed's deliberate synchronisations, start-up and the final save)."""
    with tempfile.TemporaryDirectory() as tmp:
        data = write_corpus(Path(tmp) / "syn", 512, 60_000)
        script = Path(tmp) / "loop_audit.py"
        script.write_text(LOOP_AUDIT)
        out = run_py([str(script), "--model-config", "tiny", "--data-path", data, "--seq-length", "64",
                      "--train-iters", "11", "--lr", "1e-3", "--log-interval", "5", "--eval-iters", "0",
                      "--deepspeed", str(ZERO2)], timeout=600)
    line = next((ln for ln in out.splitlines() if ln.startswith("SYNCS ")), None)
    if line is None:
        return [row("syncs", "training loop", False, output=out[-3000:])]
    audit = json.loads(line[6:])
    per = [sum(d.values()) for d in audit["per"][1:]]
    return [row("syncs", "training loop, per iteration (EP 1; budget 1, 2 on log steps)", max(per) <= 2,
                per_iteration=per, ops=audit["per"][1:], cuda_sync_warnings=audit["cuda_sync_warnings"])]


# ----------------------------------------------------------------------------------------------
def write_corpus(prefix: Path, vocab: int, tokens: int) -> str:
    """Arithmetic progressions mod (vocab - 3): learnable, so the loss falls within iterations."""
    import numpy as np

    from megamoe.data import IndexedDatasetWriter
    rng = np.random.default_rng(0)
    dtype = np.uint16 if vocab < 65500 else np.int32
    with IndexedDatasetWriter(str(prefix), dtype) as w:
        n_total = 0
        while n_total < tokens:
            start, stride, n = rng.integers(3, vocab - 3), rng.integers(1, 7), rng.integers(200, 3000)
            w.add_document(((start + stride * np.arange(n)) % (vocab - 3) + 3).tolist())
            n_total += n
    return str(prefix)


def run_py(args: list[str], timeout: float) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return p.stdout + p.stderr + f"\n[exit {p.returncode}]"


def pretrain(s: dict, data: str, tb: Path, extra: list[str]) -> str:
    return run_py(["-m", "megamoe.pretrain", "--model-config", s["preset"], "--model-override",
                   f"num_hidden_layers={s['e2e_layers']}", "--data-path", data, "--seq-length", str(s["e2e_seq"]),
                   "--micro-batch-size", str(s["e2e_micro"]), "--global-batch-size", str(s["e2e_micro"]),
                   "--train-iters", str(s["e2e_iters"]), "--lr", s["lr"], "--lr-warmup-iters", s["warmup"],
                   "--log-interval", "10", "--eval-interval", "20", "--eval-iters", "2",
                   "--tensorboard-dir", str(tb), "--deepspeed", str(ZERO2), *extra],
                  timeout=420)


def check_end_to_end(dev, s: dict) -> list[dict]:
    from megamoe.config import ModelConfig
    from megamoe.monitor import flops_per_token, mfu, read_scalars
    cfg = ModelConfig.load(s["preset"], num_hidden_layers=s["e2e_layers"])
    peak = measured_bf16_peak(dev, s["peak_n"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokens = s["e2e_iters"] * s["e2e_micro"] * (s["e2e_seq"] + 1) * 2
        data = write_corpus(tmp / "syn", cfg.vocab_size, tokens)
        runs = {"straight": pretrain(s, data, tmp / "tb_straight", []),
                "first": pretrain(s, data, tmp / "tb_resumed", ["--save", str(tmp / "ck"),
                                                                 "--exit-interval", str(s["e2e_save"])]),
                "resumed": pretrain(s, data, tmp / "tb_resumed", ["--load", str(tmp / "ck")])}
        straight = read_scalars(tmp / "tb_straight", "train/loss")
        resumed = read_scalars(tmp / "tb_resumed", "train/loss")
        val = read_scalars(tmp / "tb_straight", "val/loss")
        tok_s = read_scalars(tmp / "tb_straight", "perf/tokens_per_s")
        mem = read_scalars(tmp / "tb_straight", "mem/max_allocated_gb") or read_scalars(tmp / "tb_straight",
                                                                                       "mem/max_rss_gb")
    failed = {k: v[-3000:] for k, v in runs.items() if not v.rstrip().endswith("[exit 0]")}
    if failed:
        return [row("end_to_end", "runs", False, output=failed)]
    n, first = s["e2e_iters"], s["e2e_save"]
    diffs = [abs(resumed[i] - straight[i]) for i in range(first + 1, n + 1)]
    steady = [v for it, v in sorted(tok_s.items()) if it > 10] or list(tok_s.values())
    rate = sum(steady) / len(steady)
    util = mfu(rate * flops_per_token(cfg, s["e2e_seq"])["total"], peak)   # None above the measured peak
    head, tail = sum(straight[i] for i in range(1, 6)) / 5, sum(straight[i] for i in range(n - 4, n + 1)) / 5
    return [row("end_to_end", f"loss falls ({s['preset']} x{s['e2e_layers']} layers, ZeRO-2 bf16)", tail < head,
                first5=head, last5=tail, val_loss=val),
            row("end_to_end", f"resume at {first}: iterations {first + 1}-{n} match the straight run",
                max(diffs) <= RESUME_TOL[dev.type], max_abs_diff=max(diffs), tol=RESUME_TOL[dev.type]),
            row("end_to_end", "throughput", True, tokens_per_s=rate, mfu=util, bf16_peak_tflops=peak / 1e12,
                peak_memory_gb=max(mem.values()) if mem else None),
            planner_row(cfg, s, dev, max(mem.values()) if mem else None)]


def planner_row(cfg, s: dict, dev, measured_gib) -> dict:
    """The memory planner (megamoe-plan) for the straight run's exact setup against its measured
    tensor peak (torch.cuda.max_memory_allocated), within the 15% the CPU tests hold it to. On the
    CPU the run reports its process RSS (interpreter and libraries included), which the planner
    does not count: the tests compare it there against peaks above a baseline instead."""
    from megamoe import plan as P
    from megamoe.train_config import load_ds_config
    setup = P.Setup.from_ds_config(load_ds_config(str(ZERO2)), gpus=1, ep=1,
                                   micro_batch=s["e2e_micro"], seq_length=s["e2e_seq"], device=dev.type)
    planned = P.plan(cfg, setup).total / 2 ** 30
    if dev.type != "cuda" or measured_gib is None:
        return row("end_to_end", "planner: not compared", True, planned_gib=planned,
                   reason="compared on CUDA only (the CPU run reports process RSS)")
    ratio = measured_gib / planned
    return row("end_to_end", "planner: measured tensor peak within 15% of the plan", abs(ratio - 1) <= 0.15,
               planned_gib=planned, measured_gib=measured_gib, measured_over_planned=ratio)


def measured_bf16_peak(dev, n: int) -> float:
    import torch
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n ** 3 / timed(lambda: a @ b, dev, repeat=10)


# ----------------------------------------------------------------------------------------------
PARTS = {"kernels": check_kernels, "attention": check_attention, "syncs": check_syncs, "end_to_end": check_end_to_end}


def table(rows: list[dict]) -> str:
    lines = [f"{'part':<11} {'result':<6} check"]
    for r in rows:
        keys = [k for k in ("max_rel_err", "documents_max_rel_err", "fwd_bwd_ms", "per_iteration",
                            "cuda_sync_warnings", "max_abs_diff", "default_chunk_ms", "one_chunk_ms",
                            "tokens_per_s", "mfu", "peak_memory_gb", "planned_gib", "measured_over_planned",
                            "reason") if k in r]
        detail = ", ".join(f"{k}={r[k]:.3g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in keys)
        lines.append(f"{r['part']:<11} {'ok' if r['ok'] else 'FAIL':<6} {r['name']}" + (f"  ({detail})" if detail else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU, Triton interpreted (CI)")
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu_check.json"))
    p.add_argument("--parts", nargs="*", default=list(PARTS), choices=list(PARTS))
    args = p.parse_args(argv)
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"   # before Triton is imported
    import torch
    if not args.cpu and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU here, nothing to check (bench/gpu_check.py --cpu rehearses the script on the CPU)")
        return 0
    dev = torch.device("cpu" if args.cpu else "cuda")
    shapes = TINY if args.cpu else FULL
    from megamoe.monitor import cpu_name
    report = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else cpu_name(),
              "torch": torch.__version__, "python": platform.python_version(), "shapes": shapes, "rows": []}
    t0 = time.perf_counter()
    for name in args.parts:
        try:
            report["rows"] += PARTS[name](dev, shapes)
        except Exception:
            report["rows"].append(row(name, "crashed", False, error=traceback.format_exc()[-3000:]))
        print(table([r for r in report["rows"] if r["part"] == name]).split("\n", 1)[1], flush=True)
    report["seconds"] = time.perf_counter() - t0
    report["ok"] = all(r["ok"] for r in report["rows"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, out)
    print(table(report["rows"]))
    print(f"gpu-check: {'PASSED' if report['ok'] else 'FAILED'} in {report['seconds']:.0f} s on {report['device']}; "
          f"report {out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
