"""Counting the ops that make the host wait for the GPU, on any device (a CPU test included).

A CUDA kernel launch returns at once; the host only waits when it needs a value the device has
not produced yet. In PyTorch that is a handful of ops: reading a scalar (`.item()`, `float(t)`,
`bool(t)`, `if t:` -> `aten::_local_scalar_dense`), ops whose output size depends on the data
(`nonzero`, boolean-mask indexing, `masked_select`, `bincount`, `unique`, `repeat_interleave`
without an output size) and copies from the device to the host. `HostSyncCounter` is a
TorchDispatchMode that sees every op and counts those. On a GPU it counts what would stall the
stream; on the CPU (no stream to stall) it counts the same ops, so a CPU test can hold the
training loop to a sync budget that carries over to GPUs. A device-to-host copy is only
recognisable where there is a device: on the CPU, `.cpu()` of a CPU tensor returns it without
an op. So the loop reads device values only through `to_host`, which tells an active counter on
a CPU run, and bench/gpu_check.py audits the real step under `torch.cuda.set_sync_debug_mode` too.
Host tensors that never were on the device (the gloo side group's flags) are read with
`.numpy()`, which is no op and no sync.

    with HostSyncCounter() as syncs:
        trainer.train_step(it)
    syncs.total, syncs.seen        # Counter: op name -> count
"""
from __future__ import annotations

import collections
import contextlib
import traceback
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops whose result the host needs before it can go on (data-dependent output sizes, or a scalar read)
SYNCING_OPS = frozenset({
    "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::nonzero",
    "aten::nonzero_static", "aten::masked_select", "aten::bincount", "aten::unique_consecutive",
    "aten::_unique2", "aten::unique_dim", "aten::repeat_interleave", "aten::histc",
})


def _is_bool_index(name: str, args) -> bool:
    if name not in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
        return False
    indices = args[1] if len(args) > 1 else None
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or []))


def _is_device_to_host(name: str, args, kwargs) -> bool:
    if name == "aten::_to_copy":
        src, dst = args[0], kwargs.get("device")
        return src.device.type != "cpu" and dst is not None and torch.device(dst).type == "cpu"
    if name == "aten::copy_":
        dst, src = args[0], args[1]
        return src.device.type != "cpu" and dst.device.type == "cpu"
    return False


def op_syncs(func, args, kwargs) -> Optional[str]:
    """The name under which an op is counted as a host sync, or None."""
    name = func._schema.name
    if name in SYNCING_OPS:
        return name
    if _is_bool_index(name, args):   # the schema name carries no overload (aten::index, not .Tensor)
        return "boolean-mask index"
    if _is_device_to_host(name, args, kwargs or {}):
        return "device-to-host copy"
    return None


_active: list["HostSyncCounter"] = []


class HostSyncCounter(TorchDispatchMode):
    """Counts host-syncing ops (see the module docstring). `where=True` also keeps, per op, the
    innermost megamoe or DeepSpeed source line that issued it (slow; for finding a sync).

    `autoep_as_on_gpu=True` (CPU runs with DeepSpeed AutoEP): counts AutoEP as a CUDA run has it,
    i.e. one device-to-host copy per split plan (invisible on the CPU) and nothing for the CPU
    stand-ins of its Triton permutation kernels (deepspeed_compat.autoep_syncs_as_on_gpu)."""

    def __init__(self, where: bool = False, autoep_as_on_gpu: bool = False):
        super().__init__()
        self.seen: collections.Counter = collections.Counter()
        self.where = where
        self.sites: collections.Counter = collections.Counter()
        self._paused = 0
        self._autoep = None
        if autoep_as_on_gpu:
            from megamoe.parallel import deepspeed_compat
            self._autoep = deepspeed_compat.autoep_syncs_as_on_gpu(
                lambda: self.note("device-to-host copy"), self.paused)

    def __enter__(self):
        _active.append(self)
        if self._autoep is not None:
            self._autoep.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        _active.remove(self)
        if self._autoep is not None:
            self._autoep.__exit__(*exc)
        return super().__exit__(*exc)

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def note(self, name: str) -> None:
        if self._paused:
            return
        self.seen[name] += 1
        if self.where:
            self.sites[f"{name} @ {_site()}"] += 1

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = op_syncs(func, args, kwargs)
        if name is not None:
            self.note(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def cpu_only():
    """Around code that exists only on CPU runs, where a GPU run does something else without the
    host (dispatch.PaddedRows: the CPU experts' row padding reads the counts): what it reads is
    not counted, as a GPU run never reads it."""
    with contextlib.ExitStack() as stack:
        for counter in list(_active):
            stack.enter_context(counter.paused())
        yield


def _site() -> str:
    frames = [f for f in traceback.extract_stack()[:-3]
              if ("megamoe" in f.filename or "deepspeed" in f.filename) and "syncs.py" not in f.filename]
    if not frames:
        return "?"
    f = frames[-1]
    return f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.line}"


def to_host(t: torch.Tensor) -> torch.Tensor:
    """The loop's way of bringing device values to the host: one blocking copy (a fresh tensor).
    On a CPU run there is no device-to-host copy to see, so an active HostSyncCounter is told
    directly: a CPU test counts the reads a GPU run makes."""
    if t.device.type == "cpu":
        for counter in _active:
            counter.note("device-to-host copy")
    return t.to("cpu", copy=True)


def loop_syncs(trainer, counter: HostSyncCounter) -> tuple[int, list[dict]]:
    """Run `trainer.train()` under `counter`: (exit code, per iteration {op: count}), an iteration
    running from one train_step call to the next (its logging, bias update and stop checks in)."""
    marks = []
    step = trainer.train_step

    def marked(it):
        marks.append(dict(counter.seen))
        return step(it)

    trainer.train_step = marked
    try:
        with counter:
            rc = trainer.train()
    finally:
        trainer.train_step = step
    marks.append(dict(counter.seen))
    return rc, [{k: v - a.get(k, 0) for k, v in b.items() if v - a.get(k, 0)} for a, b in zip(marks, marks[1:])]
