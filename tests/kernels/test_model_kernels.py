"""The whole model, forward and backward, with every kernel forced to Triton (interpreter on CPU)
equals the PyTorch reference path: same logits and loss, same parameter gradients."""
from __future__ import annotations

import pytest
import torch

from megamoe import kernels

from megamoe.config import ModelConfig


def _run(backend: str, dtype: torch.dtype, input_ids, labels):
    kernels.set_backend(backend)
    try:
        model = ModelConfig.load("tiny").build(seed=0).to(dtype)
        loss = model(input_ids, labels=labels).loss     # the fused head + loss (no logits with labels)
        logits = model(input_ids).logits                # the logits path, a second forward
        # the logits themselves get a random cotangent too, so every output path is exercised
        g = torch.Generator().manual_seed(1)
        probe = torch.randn(logits.shape, generator=g).to(dtype)
        (loss + (logits * probe).sum() * 1e-3).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                 if p.grad is not None}
        return logits.detach(), loss.detach(), grads
    finally:
        kernels.set_backend(None)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_model_forward_backward_triton_equals_reference(dtype, tol, monkeypatch):
    from megamoe.kernels import rmsnorm, rope, router
    calls = {}
    for mod, name in ((rmsnorm, "rms_norm"), (rope, "apply_rope"), (router, "route")):
        real = getattr(mod, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*a, **k)
        monkeypatch.setattr(mod, name, counted)
    torch.manual_seed(0)
    input_ids = torch.randint(3, 512, (2, 12))
    labels = input_ids.roll(-1, dims=1)
    logits_t, loss_t, grads_t = _run("triton", dtype, input_ids, labels)
    assert set(calls) == {"rms_norm", "apply_rope", "route"}, f"kernels not all used: {calls}"
    n_triton = dict(calls)
    logits_r, loss_r, grads_r = _run("reference", dtype, input_ids, labels)
    assert calls == n_triton, "the reference run must not touch the Triton kernels"

    def rel(a, b):
        return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()

    assert rel(logits_t, logits_r) <= tol
    assert abs(loss_t.item() - loss_r.item()) <= tol * abs(loss_r.item())
    assert grads_t.keys() == grads_r.keys() and len(grads_r) > 10
    bad = {n: rel(grads_t[n], grads_r[n]) for n in grads_r if rel(grads_t[n], grads_r[n]) > tol}
    assert not bad, f"parameter grads differ: {bad}"
