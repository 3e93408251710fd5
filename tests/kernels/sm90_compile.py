"""Compile every megamoe Triton kernel for a real GPU target (sm_90) on a machine without a GPU.

Run as a script in its own process, with TRITON_INTERPRET unset (the kernels must be decorated
in compile mode):  python tests/kernels/sm90_compile.py  -> one JSON line per compiled variant:
  {"kernel", "variant", "regs", "stack", "local", "shared", "spill_free", "error"}

How: triton's CudaDriver is subclassed to report GPUTarget("cuda", 90, 32) without touching
libcuda, set active, and each kernel is built with `kernel.warmup(...)` (dtypes stand in for
tensors) using the same launch-config functions the wrappers use, so we compile exactly what
would run. Register spills and stack use are read from the cubin with the cuobjdump bundled
with triton; the static shared memory from the cubin and triton's own metadata.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run with TRITON_INTERPRET unset"
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.driver import CudaDriver  # noqa: E402

SM90_SHARED_LIMIT = 232448  # bytes of shared memory a block may use on H100 (227 KB)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


class FakeSm90Driver(CudaDriver):
    """A CUDA driver that claims an sm_90 device and never loads libcuda."""

    def __init__(self):  # skip CudaUtils(): it would dlopen libcuda
        pass

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=None):
        return (9, 0)

    @staticmethod
    def is_active():
        return True


def resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {"regs": int(fields["REG"]), "stack": int(fields["STACK"]),
            "local": int(fields["LOCAL"]), "cubin_shared": int(fields["SHARED"])}


def variants():
    """(kernel name, variant label, jit fn, positional args, constexpr kwargs, grid)."""
    from megamoe.kernels import cross_entropy, rmsnorm, rope, router
    bf16, f32, i64, i32 = torch.bfloat16, torch.float32, torch.int64, torch.int32
    M = 8192
    for N in (512, 1536, 7168, 20000):  # kv_lora, q_lora, V3 hidden, wider than one chunk
        cfg = rmsnorm.rms_norm_config(N, interpret=False)
        ce = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "NUM_CHUNKS")}
        for dt in (bf16, f32):
            yield ("rms_norm_fwd", f"N={N} {dt}", rmsnorm._rms_norm_fwd_kernel,
                   (dt, dt, dt, f32, M, N, N, N, 1e-6), ce, cfg["num_warps"])
        cfg = rmsnorm.rms_norm_config(N, interpret=False, backward=True)
        ce = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "NUM_CHUNKS")}
        yield ("rms_norm_bwd", f"N={N} bf16", rmsnorm._rms_norm_bwd_kernel,
               (bf16, bf16, bf16, f32, bf16, f32, M, N, N, N, N, M // cfg["BLOCK_M"]), ce,
               cfg["num_warps"])
    for N, R, inter in ((128, 32, True), (128, 32, False), (1, 32, True), (16, 32, True)):
        cfg = rope.rope_config(N, R, interpret=False)
        B, S = 4, 4096
        D = 2 * R
        # q slice of [B, S, N, 192] (nope 128 + rope 64), cos/sin [1, S, R] broadcast
        args = (bf16, f32, f32, bf16, B * S, S, N, S * N * 192, N * 192, 192, 1,
                S * N * D, N * D, D, 1, 0, R, 1, 1.0)
        yield ("rope", f"N={N} R={R} interleaved={inter}", rope._rope_kernel, args,
               dict(R=R, INTERLEAVED=inter, BLOCK_T=cfg["BLOCK_T"], BLOCK_HR=cfg["BLOCK_HR"]),
               cfg["num_warps"])
    T = 16384
    for E, K, G, TG, softmax, norm, bias in ((256, 8, 8, 4, False, True, True),
                                             (160, 6, 8, 3, True, False, False),
                                             (64, 6, 1, 1, True, True, False),
                                             (256, 1, 1, 1, False, True, True),
                                             (8, 2, 1, 1, True, True, False)):
        cfg = router.router_config(E, K, G, interpret=False)
        label = f"E={E} K={K} G={G}/{TG} {'softmax' if softmax else 'sigmoid'}"
        yield ("router_fwd", label, router._router_fwd_kernel,
               (bf16, f32, f32, i64, f32, i32, T, E, E, 2.5),
               dict(K=K, N_GROUP=G, TOPK_GROUP=TG, GROUP_SIZE=E // G, SOFTMAX=softmax,
                    NORM=norm, HAS_BIAS=bias, BLOCK_T=cfg["BLOCK_T"], BLOCK_E=cfg["BLOCK_E"],
                    BLOCK_K=cfg["BLOCK_K"], BLOCK_G=cfg["BLOCK_G"]), cfg["num_warps"])
        yield ("router_bwd", label, router._router_bwd_kernel,
               (f32, i64, f32, f32, bf16, T, E, E, E, 2.5),
               dict(K=K, SOFTMAX=softmax, NORM=norm, HAS_DSCORES=True,
                    BLOCK_T=cfg["BLOCK_T"], BLOCK_E=cfg["BLOCK_E"]), cfg["num_warps"])


    for V, dt in ((129280, bf16), (129280, f32), (102400, bf16), (512, bf16)):   # V3, V2-Lite, tiny vocabularies
        cfg = cross_entropy.ce_config(V)
        for grad in (True, False):
            yield ("cross_entropy", f"V={V} {dt} grad={grad}", cross_entropy._ce_kernel,
                   (dt, V, i64, f32, f32, V, -100), dict(WANT_GRAD=grad, BLOCK_V=cfg["BLOCK_V"]), cfg["num_warps"])


def main() -> int:
    triton.runtime.driver.set_active(FakeSm90Driver())
    for name, label, fn, args, constexprs, num_warps in variants():
        rec = {"kernel": name, "variant": label}
        try:
            compiled = fn.warmup(*args, **constexprs, num_warps=num_warps, grid=(1,))
            rec.update(resource_usage(compiled.asm["cubin"]))
            rec["shared"] = max(int(compiled.metadata.shared), rec["cubin_shared"])
            rec["spill_free"] = rec["local"] == 0 and rec["stack"] == 0
            rec["error"] = None
        except Exception as exc:  # report every failure, keep compiling the rest
            rec["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            rec["traceback"] = traceback.format_exc()[-3000:]
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
