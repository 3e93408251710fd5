"""The dispatch rule in kernels/__init__.py: auto = Triton on CUDA tensors else the reference;
MEGAMOE_KERNELS / set_backend force either; forced Triton without a way to run is an error."""
from __future__ import annotations

import pytest
import torch

from megamoe import kernels
from megamoe.kernels import reference


@pytest.fixture(autouse=True)
def _reset_backend(monkeypatch):
    monkeypatch.delenv("MEGAMOE_KERNELS", raising=False)
    kernels.set_backend(None)
    yield
    kernels.set_backend(None)


def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, spy)
    return calls


def _call_all_ops():
    x = torch.randn(3, 5, 2, 8)
    cos, sin = torch.randn(1, 5, 4), torch.randn(1, 5, 4)
    kernels.rms_norm(x, torch.randn(8), 1e-6)
    kernels.apply_rope(x, cos, sin, True)
    kernels.route(torch.randn(6, 16), None, 2, "sigmoid")


def test_auto_uses_reference_on_cpu(monkeypatch):
    from megamoe.kernels import rmsnorm, rope, router
    ref = [_spy(monkeypatch, reference, n) for n in ("rms_norm", "apply_rope", "route")]
    tri = [_spy(monkeypatch, rmsnorm, "rms_norm"), _spy(monkeypatch, rope, "apply_rope"),
           _spy(monkeypatch, router, "route")]
    assert kernels.backend() == "auto" and not kernels.use_triton(torch.zeros(1))
    _call_all_ops()
    assert all(len(c) == 1 for c in ref) and not any(tri)


@pytest.mark.parametrize("how", ["env", "set_backend"])
def test_forcing_triton_runs_the_kernels_under_the_interpreter(monkeypatch, how):
    from megamoe.kernels import rmsnorm, rope, router
    tri = [_spy(monkeypatch, rmsnorm, "rms_norm"), _spy(monkeypatch, rope, "apply_rope"),
           _spy(monkeypatch, router, "route")]
    if how == "env":
        monkeypatch.setenv("MEGAMOE_KERNELS", "triton")
    else:
        kernels.set_backend("triton")
    _call_all_ops()
    assert all(len(c) == 1 for c in tri)


def test_forcing_reference_wins_over_env(monkeypatch):
    monkeypatch.setenv("MEGAMOE_KERNELS", "triton")
    kernels.set_backend("reference")
    assert not kernels.use_triton(torch.zeros(1))


def test_forced_triton_without_cuda_or_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kernels.set_backend("triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.rms_norm(torch.randn(2, 4), torch.ones(4), 1e-6)


def test_bad_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError):
        kernels.set_backend("cuda")
    monkeypatch.setenv("MEGAMOE_KERNELS", "fast")
    with pytest.raises(ValueError, match="MEGAMOE_KERNELS"):
        kernels.backend()


def test_router_shapes_beyond_the_kernel(monkeypatch):
    """auto sends E > 256 to the reference (on CUDA); forced triton raises instead of falling back."""
    logits = torch.randn(4, 300)
    kernels.set_backend("triton")
    with pytest.raises(ValueError, match="E must be"):
        kernels.route(logits, None, 2, "sigmoid")
    kernels.set_backend(None)
    monkeypatch.setattr(kernels, "use_triton", lambda x: True)  # pretend the tensor is on CUDA
    w, idx, s, counts = kernels.route(logits, None, 2, "sigmoid")
    assert counts.sum() == 8


def test_rope_with_trainable_tables_stays_exact():
    """The kernel gives cos/sin no gradient, so tables that require grad go to the reference."""
    kernels.set_backend("triton")
    x = torch.randn(1, 3, 2, 4)
    cos = torch.randn(1, 3, 2, requires_grad=True)
    sin = torch.randn(1, 3, 2)
    kernels.apply_rope(x, cos, sin).sum().backward()
    assert cos.grad is not None


def test_kernels_are_installed_inside_megamoe_only(tmp_path):
    """No top-level `kernels` is installed (Hugging Face publishes a package of that name, which
    transformers probes for), and megamoe.kernels imports from any directory."""
    import importlib.metadata
    import subprocess
    import sys
    owners = importlib.metadata.packages_distributions()
    assert "megamoe" in owners.get("megamoe", [])
    assert "megamoe" not in owners.get("kernels", [])
    r = subprocess.run([sys.executable, "-c", "import megamoe.kernels as k, megamoe.kernels.reference as r; "
                        "print(k.route.__module__, r.__name__)"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["megamoe.kernels", "megamoe.kernels.reference"], r.stderr
