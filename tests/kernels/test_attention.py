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


@pytest.mark.parametrize("Dqk,Dv,Sq,Sk,docs", [(24, 16, 6, 6, False), (16, 24, 6, 6, False),
                                               (24, 16, 3, 7, False), (24, 16, 7, 7, True)])
def test_sdpa_on_cpu_pads_mla_head_dims_into_the_fused_kernel(Dqk, Dv, Sq, Sk, docs):
    """MLA's unequal head dims would send CPU SDPA to its math path ([B, H, Sq, Sk] fp32 scores);
    padded to one dim they run its flash kernel, forward and backward, with eager's values and
    gradients (causal, KV prefix, documents)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func.name())
            return func(*args, **(kwargs or {}))

    q, k, v = _qkv(Sq=Sq, Sk=Sk, Dqk=Dqk, Dv=Dv)
    d = attn.documents_of(torch.tensor([[4, 2, 5, 5, 2, 6, 6], [7, 7, 7, 2, 8, 8, 2]]), 2) if docs else None
    seen: set = set()
    with Ops():
        out = attn.attention(q, k, v, 0.3, backend="sdpa", documents=d)
        grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
    assert {"aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward"} <= seen
    assert not any("math" in name or "bmm" in name for name in seen), seen
    ref = _per_document(q, k, v, 0.3, d) if docs else attn.attention(q, k, v, 0.3, backend="eager")
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, gr in zip(grads, torch.autograd.grad(ref.pow(2).sum(), (q, k, v))):
        torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-5)


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


# -- packed documents (--reset-attention-mask) --------------------------------------------------
def test_documents_of_a_packed_batch():
    ids = torch.tensor([[5, 6, 2, 7, 2, 8], [9, 9, 9, 9, 9, 2]])
    d = attn.documents_of(ids, eos_id=2)
    assert d.doc_ids_BS.tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]]
    assert d.cu_seqlens.tolist() == [0, 3, 5, 6, 12] and d.max_seqlen == 6
    m = d.mask_BSS()
    assert m[0, 4].tolist() == [False, False, False, True, True, False]   # token 4 sees its document only
    assert torch.equal(m[1], torch.ones(6, 6, dtype=torch.bool).tril())


def _per_document(q, k, v, scale, d):
    """The oracle: every document on its own, through plain causal attention."""
    out = torch.zeros(*q.shape[:3], v.shape[-1])
    B, S = q.shape[:2]
    cu = d.cu_seqlens.tolist()
    flat = [t.reshape(B * S, *t.shape[2:]) for t in (q, k, v)]
    for a, b in zip(cu, cu[1:]):
        piece = reference.attention(*(t[a:b].unsqueeze(0) for t in flat), scale, True)[0]
        out.view(B * S, *out.shape[2:])[a:b] = piece
    return out


@pytest.fixture
def fake_varlen(monkeypatch):
    """Stand-ins for flash_attn_varlen_func (FA2: equal head dims) and FA3's (192/128 native): the
    real keywords, computing each cu_seqlens sequence exactly."""
    seen = []

    def make(native):
        def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                   softmax_scale=None, causal=False, deterministic=False):
            assert q.dim() == 3 and torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
            assert native or q.shape[-1] == v.shape[-1]
            cu = cu_seqlens_q.tolist()
            assert max_seqlen_q == max(b - a for a, b in zip(cu, cu[1:]))
            seen.append(v.shape[-1])
            out = torch.zeros(*q.shape[:2], v.shape[-1])
            for a, b in zip(cu, cu[1:]):
                out[a:b] = reference.attention(q[a:b][None], k[a:b][None], v[a:b][None], softmax_scale, causal)[0]
            return out
        return varlen
    monkeypatch.setitem(attn._probed, "flash_varlen", (make(False), None))
    monkeypatch.setitem(attn._probed, "fa3_varlen", (make(True), None))
    return seen


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flash", "fa3"])
def test_every_backend_attends_within_documents(backend, fake_varlen, monkeypatch):
    real = attn.unusable_reason
    monkeypatch.setattr(attn, "unusable_reason", lambda n, *a: None if n in ("flash", "fa3") else real(n, *a))
    q, k, v = _qkv(B=2, Sq=7, Sk=7, H=2, Dqk=192, Dv=128)
    ids = torch.tensor([[4, 2, 5, 5, 2, 6, 6], [7, 7, 7, 2, 8, 8, 2]])
    d = attn.documents_of(ids, eos_id=2)
    out = attn.attention(q, k, v, 0.07, backend=backend, documents=d)
    ref = _per_document(q, k, v, 0.07, d)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(out)
    for g, gr in zip(torch.autograd.grad((out * dy).sum(), (q, k, v)), torch.autograd.grad((ref * dy).sum(), (q, k, v))):
        torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-6)
    if backend in ("flash", "fa3"):
        assert fake_varlen[-1] == (192 if backend == "flash" else 128)   # FA2 pads v, FA3 does not


def test_a_packed_document_reads_as_if_it_were_alone():
    """RoPE is relative, so with documents a document packed after another gives the logits it
    gives on its own (and the first one is unchanged by what follows)."""
    from megamoe.config import ModelConfig
    cfg = ModelConfig.load("tiny", attention_backend="sdpa")
    model = cfg.build(seed=0).eval()
    a = torch.tensor([5, 9, 13, cfg.eos_token_id])
    b = torch.tensor([40, 41, 42, 43, 44])
    packed = torch.cat([a, b])[None]
    docs = attn.documents_of(packed, cfg.eos_token_id)
    with torch.no_grad():
        both = model(packed, documents=docs).logits[0]
        alone_a, alone_b = model(a[None]).logits[0], model(b[None]).logits[0]
        mixed = model(packed).logits[0]
    torch.testing.assert_close(both[:4], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[4:], alone_b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(mixed[4:], alone_b, atol=1e-3)   # without documents b sees a
