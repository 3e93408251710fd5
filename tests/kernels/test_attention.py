"""Attention backends: the choice rule and its message, the flash path's padding of v (with
flash_attn replaced by a stand-in: it cannot be installed without CUDA), and sdpa == eager."""
from __future__ import annotations

import importlib
import logging

import pytest
import torch

from megamoe.kernels import reference

# `kernels.attention` is the dispatched function (kernels/__init__.py re-exports it over the
# submodule's name), so reach the module itself through importlib.
attn = importlib.import_module("megamoe.kernels.attention")


@pytest.fixture
def fake_flash(monkeypatch):
    """A stand-in for flash_attn_func with its real constraint (q, k, v share one head dim),
    computing exact attention so the padding/slicing around it can be checked."""
    seen = []

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        assert q.shape[-1] == k.shape[-1] == v.shape[-1], "flash_attn needs equal head dims"
        seen.append((q.shape, v.shape))
        return reference.attention(q, k, v, softmax_scale, causal)
    monkeypatch.setattr(attn, "_flash_attn_func", lambda: (flash_attn_func, None))
    return seen


def _qkv(B=2, Sq=6, Sk=6, H=3, Dqk=24, Dv=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
    return mk(B, Sq, H, Dqk), mk(B, Sk, H, Dqk), mk(B, Sk, H, Dv)


def test_auto_on_cpu_says_why_it_uses_sdpa(caplog):
    attn._logged.clear()
    name, why = attn.resolve_attention_backend("auto", torch.device("cpu"), torch.bfloat16, 192)
    assert name == "sdpa"
    assert "flash_attn" in why and "SDPA" in why
    q, k, v = _qkv()
    with caplog.at_level(logging.INFO, logger="megamoe.kernels"):
        attn.attention(q, k, v, 0.2)
    assert any("attention backend: sdpa" in r.getMessage() for r in caplog.records)


def test_explicit_flash_that_cannot_run_raises_with_the_reason():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="'flash' was requested but cannot run"):
        attn.attention(q, k, v, 0.2, backend="flash")


def test_choice_rule_with_flash_installed(fake_flash, monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert attn.resolve_attention_backend("auto", cuda, torch.bfloat16, 192)[0] == "flash"
    assert attn.resolve_attention_backend("sdpa", cuda, torch.bfloat16, 192)[0] == "sdpa"
    for dtype, hd, cap, word in ((torch.float32, 192, (9, 0), "fp16 or bf16"),
                                 (torch.bfloat16, 320, (9, 0), "exceeds"),
                                 (torch.bfloat16, 192, (7, 5), "sm_80")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=cap: c)
        name, why = attn.resolve_attention_backend("auto", cuda, dtype, hd)
        assert name == "sdpa" and word in why
    assert attn.resolve_attention_backend("auto", torch.device("cpu"))[0] == "sdpa"


@pytest.mark.parametrize("Dqk,Dv,Sq,Sk", [(24, 16, 6, 6),   # MLA: v narrower than q/k
                                          (16, 24, 6, 6),   # v wider: q and k get padded
                                          (24, 16, 3, 7)])  # KV prefix, bottom-right causal
def test_flash_path_pads_and_slices(fake_flash, Dqk, Dv, Sq, Sk):
    q, k, v = _qkv(Sq=Sq, Sk=Sk, Dqk=Dqk, Dv=Dv)
    out = attn._flash(q, k, v, 0.2, True)
    assert fake_flash and fake_flash[0][0][-1] == max(Dqk, Dv)
    assert out.shape == (2, Sq, 3, Dv)
    dy = torch.randn_like(out)
    grads = torch.autograd.grad((out * dy).sum(), (q, k, v))
    ref = reference.attention(q, k, v, 0.2, True)
    grads_ref = torch.autograd.grad((ref * dy).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for g, gr in zip(grads, grads_ref):
        assert g.shape == gr.shape
        torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("Sq,Sk", [(6, 6), (3, 7)])
def test_sdpa_equals_eager(Sq, Sk):
    q, k, v = _qkv(Sq=Sq, Sk=Sk)
    torch.testing.assert_close(attn.attention(q, k, v, 0.3, backend="sdpa"),
                               attn.attention(q, k, v, 0.3, backend="eager"),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(attn._flash_attn_func()[0] is None or not torch.cuda.is_available(),
                    reason="needs flash_attn and a CUDA GPU (flash_attn cannot be built here)")
def test_real_flash_attn_matches_eager():
    q, k, v = (t.detach().cuda().to(torch.bfloat16) for t in _qkv(Dqk=192, Dv=128))
    torch.testing.assert_close(attn.attention(q, k, v, 0.1, backend="flash").float(),
                               reference.attention(q, k, v, 0.1).float(), rtol=2e-2, atol=2e-2)
