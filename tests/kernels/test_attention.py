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

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
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


@pytest.fixture
def fake_fa3(monkeypatch):
    """A stand-in for FlashAttention-3's flash_attn_interface.flash_attn_func: same keywords, MLA's
    192/128 head dims taken natively (anything else unequal is refused, as the real kernel does),
    and the (out, lse) tuple of FA3 releases before 3.0."""
    seen = []

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, deterministic=False):
        assert q.shape[-1] == k.shape[-1] and (q.shape[-1] == v.shape[-1] or (q.shape[-1], v.shape[-1]) == (192, 128))
        assert softmax_scale is not None, "the model's scale (YaRN mscale included) must be passed"
        seen.append({"q": q.shape, "v": v.shape, "causal": causal, "scale": softmax_scale})
        return reference.attention(q, k, v, softmax_scale, causal), None
    monkeypatch.setitem(attn._probed, "fa3", (flash_attn_func, None))
    return seen


def test_auto_prefers_fa3_on_hopper_and_says_why_not_elsewhere(fake_fa3, fake_flash, monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(attn, "_device_capability", lambda d: (9, 0))
    name, why = attn.resolve_attention_backend("auto", cuda, torch.bfloat16, 192, 128)
    assert name == "fa3" and "fa3 is installed" in why
    monkeypatch.setattr(attn, "_device_capability", lambda d: (8, 0))   # A100: FA3 is Hopper-only
    name, why = attn.resolve_attention_backend("auto", cuda, torch.bfloat16, 192, 128)
    assert name == "flash" and "v padded 128 -> 192" in why and "fa3: GPU is sm_80; fa3 needs sm_90 (Hopper)" in why
    with pytest.raises(RuntimeError, match="'fa3' was requested but cannot run: GPU is sm_80"):
        attn.resolve_attention_backend("fa3", cuda, torch.bfloat16, 192, 128)
    assert attn.available_backends(cuda, torch.bfloat16, 192, 128) == ["flash", "sdpa", "eager"]
    assert set(attn.unavailable_backends(cuda, torch.bfloat16, 192, 128)) == {"fa3"}


@pytest.mark.parametrize("Dqk,Dv,Sq,Sk", [(192, 128, 5, 5), (192, 128, 2, 6), (32, 32, 4, 4)])
def test_fa3_path_takes_mla_dims_natively(fake_fa3, Dqk, Dv, Sq, Sk):
    q, k, v = _qkv(B=1, Sq=Sq, Sk=Sk, H=2, Dqk=Dqk, Dv=Dv)
    out = attn._flash(q, k, v, 0.07, True, name="fa3")
    assert fake_fa3[-1]["v"][-1] == Dv                  # no padding: native 192/128
    dy = torch.randn_like(out)
    ref = reference.attention(q, k, v, 0.07, True)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for g, gr in zip(torch.autograd.grad((out * dy).sum(), (q, k, v)),
                     torch.autograd.grad((ref * dy).sum(), (q, k, v))):
        torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-6)


def test_the_model_hands_fa3_its_yarn_scale_and_causal_mask(fake_fa3, monkeypatch):
    """MLA through the fa3 wrapper (a CPU stand-in) gives the eager model's logits: head dims,
    softmax scale with YaRN's mscale, causal flag and the output slice are all wired right."""
    from megamoe.config import ModelConfig
    real = attn.unusable_reason
    monkeypatch.setattr(attn, "unusable_reason", lambda n, *a: None if n == "fa3" else real(n, *a))
    over = dict(qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_attention_heads=2,
                rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                              "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707})
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    logits = {b: ModelConfig.load("tiny", attention_backend=b, **over).build(seed=0).eval()(ids).logits
              for b in ("fa3", "eager")}
    assert fake_fa3 and all(c["causal"] and c["v"][-1] == 128 for c in fake_fa3)
    scale = ModelConfig.load("tiny", **over).build(seed=0).attention_modules()[0].softmax_scale
    assert scale != 192 ** -0.5 and all(c["scale"] == scale for c in fake_fa3)   # mscale applied, passed as is
    torch.testing.assert_close(logits["fa3"], logits["eager"], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(attn._flash_fn("fa3")[0] is None or not torch.cuda.is_available(),
                    reason="needs FlashAttention-3 (flash_attn_interface) and a Hopper CUDA GPU")
def test_real_fa3_matches_eager():
    q, k, v = (t.detach().cuda().to(torch.bfloat16) for t in _qkv(Dqk=192, Dv=128))
    torch.testing.assert_close(attn.attention(q, k, v, 0.1, backend="fa3").float(),
                               reference.attention(q, k, v, 0.1).float(), rtol=2e-2, atol=2e-2)
