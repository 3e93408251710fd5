"""Every patch megamoe applies to DeepSpeed internals, in one place, for one DeepSpeed version.

Two module-level names are swapped while `deepspeed.initialize` runs (and restored after):
- `deepspeed.module_inject.auto_ep_layer.TokenChoiceTopKRouter`: AutoEP builds megamoe's router
  inside each expert-parallel layer (megamoe.parallel.expert);
- `deepspeed.set_optimizer_flags`: Muon goes on exactly the hidden matrices (megamoe.optim).
Both are internals with no stability promise, so each patch first checks that the installed
DeepSpeed is the one they were written and tested against.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

SUPPORTED_DEEPSPEED = "0.19.8"


class DeepSpeedVersionError(RuntimeError):
    pass


def installed_version() -> str:
    import deepspeed
    return str(deepspeed.__version__).split("+")[0]


def check_version() -> None:
    found = installed_version()
    if found != SUPPORTED_DEEPSPEED:
        raise DeepSpeedVersionError(
            f"megamoe patches DeepSpeed internals (AutoEP's router class, Muon's parameter flags) written for "
            f"deepspeed=={SUPPORTED_DEEPSPEED}, but deepspeed {found} is installed. Install the supported one: "
            f"pip install --no-build-isolation deepspeed=={SUPPORTED_DEEPSPEED} (after torch). Porting to "
            f"{found} means re-checking megamoe/parallel/deepspeed_compat.py against its sources.")


@contextlib.contextmanager
def _swap(owner: Any, name: str, replacement: Any) -> Iterator[Any]:
    """owner.name = replacement for the duration; yields the original; restores it on any exit."""
    check_version()
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield original
    finally:
        setattr(owner, name, original)


def autoep_router_class(factory: Callable[..., Any]):
    """While active, AutoEPMoELayer.__init__ builds its router with `factory(**router_kwargs)`."""
    import deepspeed.module_inject.auto_ep_layer as auto_ep_layer
    return _swap(auto_ep_layer, "TokenChoiceTopKRouter", factory)


@contextlib.contextmanager
def optimizer_flags_hook(after: Callable[[Any], None]) -> Iterator[None]:
    """While active, `deepspeed.set_optimizer_flags(config_class, model)` (called by initialize and
    by the engine after AutoEP builds expert parameters) runs DeepSpeed's own tagging, then
    `after(model)`."""
    import deepspeed

    def set_flags(config_class, model):
        original(config_class, model)
        after(model)

    with _swap(deepspeed, "set_optimizer_flags", set_flags) as original:
        yield
