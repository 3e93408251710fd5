"""Will this training run fit? Per-GPU memory, the largest micro batch, FLOPs and tokens/s.

    python tools/plan.py --model-config deepseek-v2-lite --deepspeed-config ds_configs/zero2.json \\
        --gpus 8 --gpu-memory 80 --ep 8 --micro-batch 1 --seq-length 4096 [--recompute]

Prints the per-GPU breakdown (weights, gradients, optimizer states by ZeRO stage, routed experts by
EP, activations with or without recompute, the chunked loss, the peak transient, ZeRO and
all-to-all buffers), whether it fits in --gpu-memory less --reserve, the largest micro batch that
does, and training FLOPs per token with tokens/s at --mfu of --peak-tflops (exit status 3 when it
does not fit). The model is counted
from a build on the meta device: nothing is allocated. megamoe/plan.py says what each line counts;
tests/train/test_plan.py checks it against measured peaks.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-config", required=True, help="preset name (tiny, deepseek-v3, ...) or a .json/.yaml file")
    ap.add_argument("--model-override", nargs="*", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--deepspeed-config", required=True, metavar="JSON",
                    help="ZeRO stage, precision, optimizer, buckets and offload are read from it")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs in the job (data-parallel world)")
    ap.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB", help="memory per GPU (default 80)")
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel size (--expert-model-parallel-size)")
    ap.add_argument("--micro-batch", type=int, default=None, help="default: the DeepSpeed config's")
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--recompute", action="store_true", help="activation recompute (--recompute-activations)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cuda: FlashAttention + Triton loss; cpu: what a CPU run saves (SDPA's flash kernel on "
                         "padded head dims, the PyTorch loss chunk)")
    ap.add_argument("--kernels", default="auto", choices=["auto", "triton", "reference"],
                    help="the run's MEGAMOE_KERNELS (auto: Triton on cuda); decides what the norms keep")
    ap.add_argument("--reserve", type=float, default=0.10, help="share of memory left to the allocator")
    ap.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation for the tokens/s line")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="per-GPU dense bf16 peak (H100/H200: 989)")
    args = ap.parse_args(argv)

    from megamoe.cli import report_errors
    from megamoe.config import ConfigError, ModelConfig
    from megamoe.parallel.expert import ExpertParallelError
    from megamoe.plan import Setup, format_plan, largest_micro_batch, plan
    from megamoe.train_config import ConfigConflict, load_ds_config, parse_overrides

    with report_errors("plan", ConfigError, ConfigConflict, ExpertParallelError, ValueError) as failed:
        for flag, value in (("--gpus", args.gpus), ("--ep", args.ep), ("--seq-length", args.seq_length)):
            if value < 1:
                raise ValueError(f"{flag} {value}: must be at least 1")
        if not (args.gpu_memory > 0 and 0 <= args.reserve < 1 and 0 < args.mfu <= 1 and args.peak_tflops > 0):
            raise ValueError("--gpu-memory and --peak-tflops must be > 0, --reserve in [0, 1), --mfu in (0, 1]")
        cfg = ModelConfig.load(args.model_config, **parse_overrides(args.model_override))
        ds = load_ds_config(args.deepspeed_config)
        setup = Setup.from_ds_config(ds, gpus=args.gpus, gpu_gib=args.gpu_memory, ep=args.ep,
                                     seq_length=args.seq_length, recompute=args.recompute, device=args.device,
                                     kernels=args.kernels, reserve=args.reserve)
        if args.micro_batch is not None:
            if args.micro_batch < 1:
                raise ValueError(f"--micro-batch {args.micro_batch}: must be at least 1")
            setup.micro_batch = args.micro_batch
        result = plan(cfg, setup)
        largest = largest_micro_batch(cfg, setup)
    if failed:
        return failed.code
    print(format_plan(args.model_config, result, largest, args.mfu, args.peak_tflops * 1e12))
    return 0 if result.fits else 3   # scripts can test it; bad input is 1, argparse 2


if __name__ == "__main__":
    sys.exit(main())
