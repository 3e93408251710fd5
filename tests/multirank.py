"""The one launcher for multi-rank tests: torchrun with `nproc` CPU ranks on a free port.

    from multirank import launch, run
    rc, out = run(["-m", "megamoe.pretrain", *flags])            # wait; stdout + stderr
    p = launch([script, arg], env={...})                          # a Popen, for signal tests

Every rank gets the CPU settings the suite runs under (gloo, one OpenMP thread) and the repository
on PYTHONPATH. `tests/` is on sys.path through its conftest.py, so any test imports this module.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


def rank_env(**extra) -> dict[str, str]:
    # PYTHONFAULTHANDLER: a rank that aborts (SIGABRT, SIGSEGV) prints every thread's Python stack
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def command(target: list[str], nproc: int = 2) -> list[str]:
    """`target` is what torchrun runs: ["-m", "module", args...] or [script, args...]."""
    from megamoe.distributed import free_port
    if nproc == 1 and target[0] != "-m":
        return [sys.executable, *map(str, target)]   # one rank: plain python (megamoe.distributed sets a world of 1)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), *map(str, target)]


def launch(target: list[str], nproc: int = 2, env: Optional[dict] = None) -> subprocess.Popen:
    return subprocess.Popen(command(target, nproc), cwd=ROOT, env=rank_env(**(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run(target: list[str], nproc: int = 2, timeout: float = 600, env: Optional[dict] = None) -> tuple[int, str]:
    """(exit code, stdout and stderr interleaved) of a finished multi-rank run."""
    p = launch(target, nproc, env)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        raise AssertionError(f"{' '.join(target[:3])} ran past {timeout} s:\n{out[-4000:]}") from None
    return p.returncode, out
