"""The model's own behaviour: routing, dropless grouped experts, MLA cache, losses, init."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from megamoe.config import ModelConfig
from megamoe import kernels
from megamoe.kernels import grouped_mm
from megamoe.model.moe import MoE, sequence_balance_loss, set_aux_loss_scale

TINY = ModelConfig.load("tiny")


def naive_moe(moe: MoE, x_TH: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the definition the grouped path must equal."""
    weights, indices, _ = moe.router(x_TH)
    I = moe.experts.down_proj.shape[-1]
    out = torch.zeros_like(x_TH)
    for t in range(x_TH.shape[0]):
        for k in range(indices.shape[1]):
            e = indices[t, k]
            gate_w, up_w = moe.experts.gate_up_proj[e, :I], moe.experts.gate_up_proj[e, I:]
            h = F.silu(x_TH[t] @ gate_w.T) * (x_TH[t] @ up_w.T)
            out[t] += weights[t, k] * (h @ moe.experts.down_proj[e].T)
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(x_TH)
    return out


@pytest.mark.parametrize("kw", [dict(), dict(num_experts_per_tok=3, n_group=1, topk_group=1),
                                dict(scoring_func="softmax", norm_topk_prob=False, n_shared_experts=0)])
def test_grouped_experts_equal_naive_per_token_loop(kw):
    cfg = dataclasses.replace(TINY, hidden_size=32, moe_intermediate_size=16, **kw).validate()
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 13, cfg.hidden_size)
    fast = moe(x).view(-1, cfg.hidden_size)
    slow = naive_moe(moe, x.view(-1, cfg.hidden_size))
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    # every (token, slot) pair was computed: the layer is dropless
    assert moe.router.last_tokens_per_expert.sum() == 2 * 13 * cfg.num_experts_per_tok


def test_grouped_mm_fallback_equals_torch_grouped_mm():
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 8])
    x, w = torch.randn(16, 32), torch.randn(4, 8, 32)
    offs = counts.cumsum(0).to(torch.int32)
    ref = torch.cat([x[a:b] @ w[e].T for e, (a, b) in enumerate(zip([0, *offs[:-1].tolist()], offs.tolist()))])
    torch.testing.assert_close(grouped_mm(x, w, counts, offs), ref)
    x_odd, w_odd = torch.randn(16, 7), torch.randn(4, 5, 7)   # unaligned: takes the loop
    ref_odd = torch.cat([x_odd[a:b] @ w_odd[e].T for e, (a, b) in
                         enumerate(zip([0, *offs[:-1].tolist()], offs.tolist()))])
    torch.testing.assert_close(grouped_mm(x_odd, w_odd, counts, offs), ref_odd)
    from megamoe import kernels
    assert kernels.grouped_mm_supported(x, w) and not kernels.grouped_mm_supported(x_odd, w_odd)
    kernels.set_backend("reference")   # the loop, forced: same numbers
    try:
        torch.testing.assert_close(grouped_mm(x, w, counts, offs), ref)
    finally:
        kernels.set_backend(None)


def test_expert_gradients_match_naive():
    cfg = dataclasses.replace(TINY, hidden_size=32, moe_intermediate_size=16, aux_loss_alpha=0.0,
                              router_z_loss_coef=0.0).validate()
    torch.manual_seed(1)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(20, cfg.hidden_size)
    g = torch.randn(20, cfg.hidden_size)
    (moe(x[None]).view(-1, cfg.hidden_size) * g).sum().backward()
    fast = {n: p.grad.clone() for n, p in moe.named_parameters()}
    moe.zero_grad()
    (naive_moe(moe, x) * g).sum().backward()
    for n, p in moe.named_parameters():
        torch.testing.assert_close(fast[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def _grouped_experts():
    """4 experts, H 32, I 16, weights N(0, 0.2) from seed 0 (the global RNG stays seeded after)."""
    from megamoe.model.moe import GroupedExperts
    torch.manual_seed(0)
    experts = GroupedExperts(4, 32, 16)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return experts


def test_capacity_dropping_experts_keep_the_model_dtype_on_both_backends():
    """The capacity path (its own combine): in a bf16 model its output is bf16, the same under the
    per-expert loop as under torch._grouped_mm, and a dropped pair contributes nothing."""
    from megamoe import kernels
    experts = _grouped_experts().to(torch.bfloat16)
    x, weights = torch.randn(12, 32, dtype=torch.bfloat16), torch.rand(12, 2)
    indices = torch.randint(0, 4, (12, 2), generator=torch.Generator().manual_seed(2))
    kept = torch.rand(12, 2, generator=torch.Generator().manual_seed(3)) > 0.3
    outs = {}
    for backend in ("auto", "reference"):
        kernels.set_backend(backend)
        try:
            outs[backend] = experts(x, weights, indices, kept_TK=kept)
        finally:
            kernels.set_backend(None)
    assert outs["auto"].dtype == torch.bfloat16
    torch.testing.assert_close(outs["auto"], outs["reference"])
    only_kept = experts(x, weights * kept, indices)           # dropless, dropped pairs weighted 0
    torch.testing.assert_close(outs["auto"], only_kept)


def test_experts_run_in_autocast_dtype_and_grads_stay_fp32():
    """torch._grouped_mm is on no autocast list: the experts cast their input and weights
    themselves, so under bf16 autocast they compute what bf16 copies compute, and the fp32
    weights get fp32 gradients."""
    from megamoe.model.moe import GroupedExperts
    experts = _grouped_experts()
    x = torch.randn(12, 32)
    weights, indices = torch.rand(12, 2), torch.randint(0, 4, (12, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = experts(x, weights, indices)
    got.sum().backward()
    assert got.dtype == torch.float32 and experts.gate_up_proj.grad.dtype == torch.float32
    bf16 = GroupedExperts(4, 32, 16).to(torch.bfloat16)
    bf16.load_state_dict(experts.state_dict())
    torch.testing.assert_close(got, bf16(x.bfloat16(), weights, indices).float(), rtol=0, atol=0)


@pytest.mark.parametrize("kw", [dict(), dict(q_lora_rank=None), dict(n_routed_experts=0, n_shared_experts=0)])
def test_cached_decoding_equals_full_forward(kw):
    cfg = dataclasses.replace(TINY, **kw).validate()
    model = cfg.build(seed=2).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(ids).logits
        caches = model.new_caches(2, 20)
        parts = [model(ids[:, :7], caches=caches).logits]
        parts += [model(ids[:, i:i + 1], caches=caches, start_pos=i).logits for i in range(7, 20)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=2e-6)


def test_bf16_decoding_keeps_a_bf16_cache_and_follows_the_full_forward():
    """A bf16 model decodes from a bf16 latent cache (half the memory of fp32) and its cached
    logits follow the uncached bf16 forward within bf16 rounding."""
    model = TINY.build(seed=2).eval().to(torch.bfloat16)
    ids = torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        caches = model.new_caches(2, 12)
        assert all(c.kv_BTC.dtype == c.pe_BTR.dtype == torch.bfloat16 for c in caches)
        parts = [model(ids[:, :5], caches=caches).logits]
        parts += [model(ids[:, i:i + 1], caches=caches, start_pos=i).logits for i in range(5, 12)]
    got = torch.cat(parts, 1)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), full.float(), rtol=0.05, atol=0.05)


def test_greedy_generation_equals_argmax_of_uncached_forward():
    model = TINY.build(seed=4).eval()
    prompt = torch.randint(3, TINY.vocab_size, (2, 5))
    out = model.generate(prompt, max_new_tokens=10, temperature=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(10):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


def test_sampling_is_seeded_and_respects_top_k():
    model = TINY.build(seed=4).eval()
    prompt = torch.randint(3, TINY.vocab_size, (1, 4))
    a = model.generate(prompt, 12, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 12, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    streamed = []
    model.generate(prompt, 6, temperature=0.8, top_p=0.9, on_token=lambda t: streamed.append(int(t)))
    assert len(streamed) == 6


def test_balance_loss_is_one_when_perfectly_balanced_and_larger_when_skewed():
    E, S = 4, 8
    uniform = torch.full((S, E), 0.5)
    balanced = torch.tensor([[0, 1], [2, 3]] * (S // 2))
    assert sequence_balance_loss(uniform, balanced, E, S).item() == pytest.approx(1.0)
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.1]] * S)
    skewed = torch.tensor([[0, 1]] * S)
    assert sequence_balance_loss(scores, skewed, E, S).item() > 1.5


def test_aux_losses_reach_router_gradient_and_scale():
    cfg = dataclasses.replace(TINY, aux_loss_alpha=0.1, router_z_loss_coef=0.1).validate()
    model = cfg.build(seed=0).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    router = next(r for _, r in model.routers())

    def router_grad(scale, alpha, z):
        set_aux_loss_scale(scale)
        for _, r in model.routers():
            r.aux_loss_alpha, r.z_loss_coef = alpha, z
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return router.weight.grad.clone()

    try:
        without = router_grad(1.0, 0.0, 0.0)
        with_aux = router_grad(1.0, 0.1, 0.1)
        half = router_grad(0.5, 0.1, 0.1)
    finally:
        set_aux_loss_scale(1.0)
    assert not torch.allclose(without, with_aux)
    # d total/d aux scaled by 0.5: the aux part of the gradient halves
    torch.testing.assert_close(half - without, 0.5 * (with_aux - without), rtol=1e-4, atol=1e-7)


def test_training_output_reports_losses_and_counts():
    model = TINY.build().train()
    ids = torch.randint(0, TINY.vocab_size, (3, 10))
    out = model(ids, labels=ids)
    n_moe = len(TINY.moe_layer_indices)
    assert out.tokens_per_expert.shape == (n_moe, TINY.n_routed_experts)
    assert (out.tokens_per_expert.sum(1) == 30 * TINY.num_experts_per_tok).all()
    assert out.aux_loss.item() > 0 and out.z_loss.item() > 0
    assert abs(out.loss.item() - math.log(TINY.vocab_size)) < 0.5  # ~uniform at init
    acc = next(r for _, r in model.routers()).tokens_per_expert_acc
    assert acc.sum().item() == 30 * TINY.num_experts_per_tok


def test_routing_bias_steers_selection_only():
    cfg = dataclasses.replace(TINY, n_group=1, topk_group=1).validate()
    model = cfg.build().eval()
    router = next(r for _, r in model.routers())
    x = torch.randn(50, cfg.hidden_size)
    router.e_score_correction_bias[3] = 10.0          # force expert 3 into every top-k
    w, idx, counts = router(x)
    assert (idx == 3).any(1).all() and counts[3] == 50
    scores = torch.sigmoid(x @ router.weight.T)
    raw = scores.gather(1, idx)
    torch.testing.assert_close(w, raw / raw.sum(1, keepdim=True) * cfg.routed_scaling_factor)


def test_init_is_deterministic_and_experts_independent():
    a, b, c = TINY.build(seed=5), TINY.build(seed=5), TINY.build(seed=6)
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), n
        if p.dim() >= 2:
            assert not torch.equal(p, r), n
    experts = a.layers[1].ffn.experts.gate_up_proj
    assert not torch.equal(experts[0], experts[1])
    std = TINY.initializer_range
    assert abs(a.layers[1].attn.wkv_a.weight.std().item() - std) < 0.2 * std
    out_std = std / math.sqrt(2 * TINY.num_hidden_layers)
    assert abs(a.layers[1].attn.wo.weight.std().item() - out_std) < 0.2 * out_std


def test_gradient_checkpointing_gives_identical_gradients_and_counts():
    ids = torch.randint(0, TINY.vocab_size, (2, 12))
    grads, counts = [], []
    for ckpt in (False, True):
        model = TINY.build(seed=3).train()
        model.set_gradient_checkpointing(ckpt)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        counts.append(torch.stack([r.tokens_per_expert_acc for _, r in model.routers()]))
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-8, msg=n)
    # the recompute in backward routes again but is not counted again
    assert torch.equal(counts[0], counts[1]) and counts[0].sum() == 2 * 24 * TINY.num_experts_per_tok


def test_model_output_is_a_dict_of_its_tensors():
    out = TINY.build().eval()(torch.randint(0, TINY.vocab_size, (1, 5)))
    assert isinstance(out, dict) and set(out) == {"logits", "tokens_per_expert", "dropped_fraction"}
    assert out.loss is None and out["logits"] is out.logits


def test_bf16_forward_backward_runs_and_bias_stays_fp32():
    model = TINY.build().to(torch.bfloat16).train()
    assert next(r for _, r in model.routers()).e_score_correction_bias.dtype == torch.float32
    ids = torch.randint(0, TINY.vocab_size, (2, 8))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_eager_attention_backend_matches_sdpa():
    ids = torch.randint(0, TINY.vocab_size, (2, 12))
    a = TINY.build(seed=1).eval()
    b = dataclasses.replace(TINY, attention_backend="eager").build(seed=1).eval()
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=1e-5, atol=1e-6)


def test_max_logit_tracking_equals_explicit_attention_logits():
    model = TINY.build(seed=2).train()
    model.set_track_max_logit(True)
    ids = torch.randint(0, TINY.vocab_size, (2, 10))
    captured = {}
    layer0 = model.layers[0]
    h = layer0.attn.register_forward_hook(lambda m, a, o: captured.setdefault("x", a[0]))
    model(ids)
    h.remove()
    attn, x = layer0.attn, captured["x"]
    cos, sin = model.rotary(torch.arange(10)[None])
    q_nope, q_pe = attn._queries(x, cos, sin)
    kv, pe = attn._latent(x, cos, sin)
    k_nope = attn.wkv_b(kv).view(2, 10, attn.n_heads, -1)[..., :attn.nope_dim]
    q = torch.cat([q_nope, q_pe], -1)
    k = torch.cat([k_nope, pe[:, :, None].expand(-1, -1, attn.n_heads, -1)], -1)
    expected = torch.full((attn.n_heads,), float("-inf"))
    for s in range(10):
        for t in range(s + 1):
            expected = torch.maximum(expected, (q[:, s] * k[:, t]).sum(-1).amax(0) * attn.softmax_scale)
    maxes = model.pop_max_logits()
    assert maxes.shape == (TINY.num_hidden_layers, TINY.num_attention_heads)
    torch.testing.assert_close(maxes[0], expected.detach(), rtol=1e-5, atol=1e-6)
    assert torch.isinf(model.pop_max_logits()).all()   # reset by the pop


def test_dropless_moe_layer_never_waits_on_the_device(monkeypatch):
    """Forward and backward of a dropless MoE layer issue none of the ops that read a device value
    back to the host on a GPU (the router's counts are reused: no bincount). The experts' row
    padding is CPU-only (kernels.expert_row_block is 1 on GPUs) and reads counts: off here."""
    import collections

    from megamoe import kernels
    monkeypatch.setattr(kernels, "CPU_EXPERT_ROW_BLOCK", 1)

    from torch.utils._python_dispatch import TorchDispatchMode
    syncing = {"aten::_local_scalar_dense", "aten::nonzero", "aten::bincount", "aten::item", "aten::masked_select"}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            bool_index = name == "aten::index" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
            if name in syncing or bool_index:
                self.seen[name] += 1
            return func(*args, **(kwargs or {}))

    cfg = ModelConfig.load("tiny")
    model = cfg.build(seed=0).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with Count() as c:
        model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    assert not c.seen, dict(c.seen)
    capacity = ModelConfig.load("tiny", capacity_factor=1.0).build(seed=0).train()
    with Count() as c:
        capacity(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    assert c.seen, "the counter sees the capacity path's boolean-mask indexing"


def test_max_logit_in_query_chunks_equals_one_pass():
    """QK-clip's per-head max logit, computed a few query rows at a time (no [B, N, S, S] tensor),
    equals the one-pass value; with documents, only pairs within a document count."""
    from megamoe.kernels.attention import documents_of
    attn = TINY.build(seed=2).layers[0].attn
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 9, attn.n_heads, 24, generator=g) for _ in range(2))
    docs = documents_of(torch.tensor([[5, 2, 5, 5, 5, 2, 5, 5, 5]] * 2), eos_id=2)
    for d in (None, docs):
        got = {}
        for budget in (4 * 2 * attn.n_heads * 9, 1 << 28):          # one query row per chunk; all at once
            attn.max_logit.fill_(float("-inf"))
            attn._track_max_logit(q, k, d, budget_bytes=budget)
            got[budget] = attn.max_logit.clone()
        a, b = got.values()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    logits = torch.einsum("bsnd,btnd->bnst", q, k) * attn.softmax_scale
    within = logits.masked_fill(~docs.mask_BSS()[:, None], float("-inf")).amax(dim=(0, 2, 3))
    torch.testing.assert_close(got[1 << 28], within, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_routed_experts_and_combine_backward_is_exact(backend):
    """The hand-written backward of the dropless path (row gathers both ways, the experts' SwiGLU
    recomputed from the saved gate/up output) against finite differences in float64, and, in fp32
    through torch._grouped_mm or the per-expert loop, against autograd through the plain ops."""
    from megamoe import kernels
    from megamoe.model.dispatch import Combine, RoutedExperts
    T, K, H, I, E = 7, 3, 8, 4, 4
    routing = _routing(T, K, E, used=E - 1)                # the last expert gets no token
    order, inverse, counts_E, offs_E = routing

    def fused(x, w, gate_up, down):
        y = RoutedExperts.apply(x, gate_up, down, order, inverse, K, counts_E, offs_E)
        return Combine.apply(y, w, order, inverse)

    torch.manual_seed(0)
    kernels.set_backend(backend)
    try:
        for dtype in (torch.float64, torch.float32):
            args = [torch.randn(T, H, dtype=dtype), torch.rand(T, K, dtype=dtype),
                    torch.randn(E, 2 * I, H, dtype=dtype) / 3, torch.randn(E, H, I, dtype=dtype) / 2]
            args = [a.requires_grad_() for a in args]
            if dtype == torch.float64:
                assert torch.autograd.gradcheck(fused, args)
            out, want = fused(*args), _plain_experts_and_combine(*args, routing)
            torch.testing.assert_close(out, want)
            g = torch.randn_like(out)
            grads = torch.autograd.grad(out, args, g)
            for got, exp in zip(grads, torch.autograd.grad(want, args, g)):
                torch.testing.assert_close(got, exp)
            assert not grads[2][-1].any() and not grads[3][-1].any()   # the idle expert's: zero
    finally:
        kernels.set_backend(None)


def _routing(T=7, K=3, E=4, used=None):
    """(order, inverse, counts_E, offs_E) of a random routing of T x K pairs to the first `used`
    of E experts."""
    from megamoe.model.dispatch import inverse_permutation
    expert_TK = torch.randint(0, used or E, (T, K), generator=torch.Generator().manual_seed(1))
    order = expert_TK.reshape(-1).argsort(stable=True)
    counts_E = torch.bincount(expert_TK.reshape(-1), minlength=E)
    return order, inverse_permutation(order), counts_E, counts_E.cumsum(0).to(torch.int32)


def _plain_experts_and_combine(x, w, gate_up, down, routing):
    """The oracle of RoutedExperts + Combine: advanced indexing and autograd through plain ops."""
    order, _, counts_E, offs_E = routing
    (T, H), K = x.shape, w.shape[1]
    gate, up = grouped_mm(x[order // K], gate_up, counts_E, offs_E).chunk(2, dim=-1)
    y = torch.zeros(T * K, H, dtype=x.dtype).index_put((order,), grouped_mm(F.silu(gate) * up, down, counts_E, offs_E))
    return (y.view(T, K, H) * w.unsqueeze(-1)).sum(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_combine_is_the_fp32_weighted_sum_bit_for_bit_across_chunks(dtype):
    """Combine, which works a chunk of tokens at a time (three chunks here, the last one short),
    gives what the one-pass fp32 weighted sum (DeepSpeed AutoEP's weighted_sum combine) and its
    autograd give, exactly, and warns about nothing (an `out=` of the wrong shape would). Forward
    and backward gather y's rows a chunk at a time: y in slot order is never whole."""
    import warnings

    from torch.utils._python_dispatch import TorchDispatchMode

    from megamoe.model.dispatch import Combine, _combine_chunk, inverse_permutation

    class Gathers(TorchDispatchMode):
        from_y = []                       # rows of each gather from y ([T*K, H])

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.index_select.default and args[0].shape == (T * K, H):
                Gathers.from_y.append(args[2].numel())
            return func(*args, **(kwargs or {}))
    T, K, H = 600, 4, 256
    # about 1 MiB of fp32 per chunk on CPUs (cache-sized), 256 MiB elsewhere (only to bound memory)
    assert _combine_chunk(T, K, H, torch.device("cpu")) == (1 << 20) // (4 * K * H) == 256
    assert _combine_chunk(T, K, H, torch.device("cuda")) == T
    assert _combine_chunk(T, 64, 7168, torch.device("cuda")) == (1 << 28) // (4 * 64 * 7168) == 146
    assert _combine_chunk(T, 64, 7168, torch.device("cpu")) == 1
    g = torch.Generator().manual_seed(0)
    order = torch.argsort(torch.randint(0, 8, (T * K,), generator=g), stable=True)
    y0, w0 = torch.randn(T * K, H, generator=g).to(dtype), torch.rand(T, K, generator=g)
    y, w, y_ref, w_ref = (t.clone().requires_grad_() for t in (y0, w0, y0, w0))
    grad = torch.randn(T, H, generator=g).to(dtype)
    with warnings.catch_warnings(), Gathers():
        warnings.simplefilter("error")
        out = Combine.apply(y, w, order, inverse_permutation(order))
        out.backward(grad)
    assert Gathers.from_y == [256 * K, 256 * K, 88 * K] * 2       # forward, then the weight gradient
    scattered = torch.zeros_like(y_ref).index_put((order,), y_ref)
    want = (scattered.view(T, K, H) * w_ref.unsqueeze(-1).float()).sum(dim=1).to(dtype)
    want.backward(grad)
    assert out.dtype == dtype and torch.equal(out, want)
    assert torch.equal(y.grad, y_ref.grad) and torch.equal(w.grad, w_ref.grad)


def test_bf16_router_keeps_no_fp32_copy_of_its_input_and_gives_autograds_gradients():
    """The router's fp32 logits from a bf16 input save the input as it is (no fp32 [T, H] copy for
    backward), and the gradients are autograd's through `.float()` and F.linear, bit for bit."""
    import torch.nn.functional as F

    from megamoe.model.moe import RouterLogits
    g = torch.Generator().manual_seed(0)
    x0, w0 = torch.randn(96, 64, generator=g).bfloat16(), (torch.randn(8, 64, generator=g) * 0.1).bfloat16()
    grad = torch.randn(96, 8, generator=g)
    saved = []
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        out = RouterLogits.apply(x, w)
    assert saved == [torch.bfloat16, torch.bfloat16]
    out.backward(grad)
    x_ref, w_ref = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    ref = F.linear(x_ref.float(), w_ref.float())
    ref.backward(grad)
    assert torch.equal(out, ref) and torch.equal(x.grad, x_ref.grad) and torch.equal(w.grad, w_ref.grad)
    # a frozen router weight: the input's gradient still comes back
    x = x0.clone().requires_grad_()
    RouterLogits.apply(x, w0).backward(grad)
    assert torch.equal(x.grad, x_ref.grad)


def test_a_bf16_model_routes_through_router_logits_unless_jitter_or_autocast():
    """The Router takes RouterLogits for bf16 tokens in training, and the plain fp32 path (which
    copies x) under input jitter or autocast: what autograd saves shows which ran."""
    cfg = TINY
    router = cfg.build(seed=0).to(torch.bfloat16).train().layers[1].ffn.router
    x = torch.randn(48, cfg.hidden_size, generator=torch.Generator().manual_seed(0)).bfloat16().requires_grad_()

    def fp32_copies_saved() -> int:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            router.route(x)
        return sum(t.dtype == torch.float32 and t.shape == x.shape for t in saved)
    assert fp32_copies_saved() == 0
    router.jitter = 0.01
    assert fp32_copies_saved() >= 1
    router.jitter = 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp32_copies_saved() == 0 and router.route(x).weights_TK.isfinite().all()


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_swiglu_mlp_keeps_gate_and_up_only_and_gives_autograds_numbers(dtype, autocast):
    """The MLP (dense layers, shared experts) keeps its input and its gate and up outputs for
    backward, not silu(gate) or the product, and its output and gradients are those of autograd
    through down(silu(gate(x)) * up(x)), bit for bit, in fp32, bf16 and under bf16 autocast."""
    import torch.nn.functional as F

    from megamoe.model.layers import MLP
    g = torch.Generator().manual_seed(0)
    mlp = MLP(64, 96).to(dtype)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.05, generator=g)
    x0, dy = torch.randn(2, 24, 64, generator=g).to(dtype), torch.randn(2, 24, 64, generator=g)

    def run(ours: bool):
        x, saved = x0.clone().requires_grad_(), []
        mlp.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = mlp(x) if ours else F.linear(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x), mlp.down_proj.weight)
        y.backward(dy.to(y.dtype))
        wide = {t.untyped_storage().data_ptr() for t in saved if t.shape[-1] == 96 and t.numel() == 48 * 96}
        return [y, x.grad, *(p.grad for p in mlp.parameters())], len(wide)
    (ours, kept), (ref, kept_ref) = run(True), run(False)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    assert (kept, kept_ref) == (2, 4)   # [tokens, intermediate]: gate and up (autograd: silu and the product too)


def test_combine_backward_makes_no_fp32_copy_of_bf16_gradients():
    """In bf16 Combine's backward computes its products in fp32 from the bf16 gradient itself: no
    fp32 [T, H] copy of it and no fp32 [N, H] gradient for y among the ops it dispatches (on GPUs
    TensorIterator casts inside its kernels; CPUs make their temporaries below the dispatcher)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from megamoe.model.dispatch import Combine, inverse_permutation
    T, K, H = 40, 4, 16
    g = torch.Generator().manual_seed(0)
    order = torch.argsort(torch.randint(0, 8, (T * K,), generator=g), stable=True)
    y = torch.randn(T * K, H, generator=g).bfloat16().requires_grad_()
    w = torch.rand(T, K, generator=g).requires_grad_()
    out = Combine.apply(y, w, order, inverse_permutation(order))
    big_fp32 = []

    class Outputs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            res = func(*args, **(kwargs or {}))
            if isinstance(res, torch.Tensor) and res.dtype == torch.float32 and res.shape in ((T, H), (T * K, H)):
                big_fp32.append((func.name(), tuple(res.shape)))
            return res

    grad = torch.randn(T, H, generator=g).bfloat16()
    with Outputs():
        out.backward(grad)
    assert big_fp32 == [], big_fp32
    assert y.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


def test_routed_experts_and_combine_give_gradients_only_where_asked():
    """Each subset of (tokens, routing weights, gate/up, down) frozen: the others' gradients are
    autograd's through the plain ops, and nothing is computed for a frozen one."""
    from megamoe.model.dispatch import Combine, RoutedExperts
    T, K, H, I, E = 7, 3, 8, 4, 4
    routing = _routing(T, K, E)
    order, inverse, counts_E, offs_E = routing
    torch.manual_seed(0)
    base = [torch.randn(T, H), torch.rand(T, K), torch.randn(E, 2 * I, H) / 3, torch.randn(E, H, I) / 2]
    for mask in range(1, 16):
        args = [a.clone().requires_grad_(bool(mask >> i & 1)) for i, a in enumerate(base)]
        want_grad = [a for a in args if a.requires_grad]
        out = Combine.apply(RoutedExperts.apply(*args[:1], *args[2:], order, inverse, K, counts_E, offs_E),
                            args[1], order, inverse)
        plain = _plain_experts_and_combine(*args, routing)
        g = torch.randn_like(out)
        for got, exp in zip(torch.autograd.grad(out, want_grad, g), torch.autograd.grad(plain, want_grad, g)):
            torch.testing.assert_close(got, exp)


def _sorted_experts_case(dtype, pad=3):
    """Rows in expert order as DeepSpeed AutoEP hands them to its experts (one idle expert, `pad`
    zero rows past the last expert's) and separate gate (w1), down (w2), up (w3) weights."""
    N, H, I, E = 11, 8, 4, 4
    counts_E = torch.tensor([4, 0, 5, 2])
    torch.manual_seed(0)
    x = torch.cat([torch.randn(N, H, dtype=dtype), torch.zeros(pad, H, dtype=dtype)])
    w1, w3 = torch.randn(E, I, H, dtype=dtype) / 3, torch.randn(E, I, H, dtype=dtype) / 3
    w2 = torch.randn(E, H, I, dtype=dtype) / 2
    return [t.requires_grad_() for t in (x, w1, w2, w3)], counts_E, counts_E.cumsum(0).to(torch.int32), N


def test_sorted_experts_equal_autograd_through_plain_ops():
    """AutoEP's layout (gate and up as separate weights, rows already in expert order, alignment
    rows past the last expert): output and every gradient equal autograd's through one matmul per
    expert, in float64 (the per-expert loop) and fp32 (torch._grouped_mm), for each subset of
    inputs that needs a gradient."""
    from megamoe.model.dispatch import SortedExperts
    for dtype in (torch.float64, torch.float32):
        (x, w1, w2, w3), counts_E, offs_E, N = _sorted_experts_case(dtype)
        split = counts_E.tolist()

        def plain(x, w1, w2, w3):
            out = []
            for e, rows in enumerate(x[:N].split(split)):
                out.append((F.silu(rows @ w1[e].T) * (rows @ w3[e].T)) @ w2[e].T)
            return torch.cat(out)
        g = torch.randn(N, x.shape[1], dtype=dtype)
        for mask in range(1, 16):
            args = [a.detach().clone().requires_grad_(bool(mask >> i & 1)) for i, a in enumerate((x, w1, w2, w3))]
            want_grad = [a for a in args if a.requires_grad]
            out = SortedExperts.apply(*args, counts_E, offs_E)
            want = plain(*args)
            torch.testing.assert_close(out[:N], want)
            got = torch.autograd.grad(out, want_grad, torch.cat([g, torch.zeros(len(x) - N, g.shape[1], dtype=dtype)]))
            for a, gg, ww in zip(want_grad, got, torch.autograd.grad(want, want_grad, g)):
                torch.testing.assert_close(gg[:N] if a is args[0] else gg, ww[:N] if a is args[0] else ww)
        if dtype == torch.float64:
            torch.testing.assert_close(out[N:], torch.zeros_like(out[N:]), rtol=0, atol=0)   # the loop's padding rows


def test_sorted_experts_keep_the_input_and_gate_up_only():
    """What backward keeps, by the saved-tensor hooks: besides the weights and counts, the
    [N, H] input and the [N, 2I] gate/up output; autograd through DeepSpeed AutoEP's grouped GEMMs
    keeps gate, up, silu(gate) and the product as well (the planner's 2H + 2I vs 2H + 4I per copy,
    output included)."""
    from deepspeed.moe.ep_experts import _run_experts_grouped_mm

    from megamoe.model.dispatch import SortedExperts
    (x, w1, w2, w3), counts_E, offs_E, _ = _sorted_experts_case(torch.float32, pad=0)
    weights = {w.data_ptr() for w in (w1, w2, w3)}

    def saved_activation_elements(fn):
        saved = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights and t.dtype.is_floating_point:
                saved.append((t.untyped_storage().data_ptr(), t.numel()))
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(dict(saved).values())   # a tensor saved twice (or two views of it) counts once
    N, H, I = x.shape[0], x.shape[1], w1.shape[1]
    ours = saved_activation_elements(lambda: SortedExperts.apply(x, w1, w2, w3, counts_E, offs_E))
    autograd = saved_activation_elements(lambda: _run_experts_grouped_mm(w1, w2, w3, x, counts_E))
    assert ours == N * (H + 2 * I)      # fp32: no CPU row padding (see the next test)
    assert autograd == N * (H + 4 * I)


def test_cpu_experts_pad_each_experts_rows_to_the_block():
    """On CPUs in bf16 every grouped matmul sees row counts in multiples of
    kernels.expert_row_block (so oneDNN compiles few shapes); pad rows are zeros in, dropped out,
    and AutoEP's alignment rows past the last expert (whatever they hold) come back as zeros."""
    from megamoe.model.dispatch import PaddedRows
    counts_E = torch.tensor([4, 0, 1, 33, 2])
    N = int(counts_E.sum())
    x = torch.cat([torch.randn(N, 16), torch.full((3, 16), 7.0)]).bfloat16()   # 3 alignment rows
    w1 = torch.randn(5, 8, 16).bfloat16()       # widths torch._grouped_mm takes in bf16 (16 bytes)
    block = kernels.expert_row_block(x, w1)
    assert block == kernels.CPU_EXPERT_ROW_BLOCK == 32
    padded = PaddedRows.of(x, w1, counts_E)
    assert padded.counts_E.tolist() == [32, 0, 32, 64, 32]
    assert padded.offs_E.tolist() == [32, 32, 64, 128, 160] and padded.rows == 160
    x_P = padded.pad(x)
    kept = torch.zeros(padded.rows, dtype=torch.bool)
    kept[padded.pos] = True
    assert torch.equal(x_P[padded.pos], x[:N]) and not x_P[~kept].any()
    back = padded.unpad(x_P, x.shape[0])
    assert back.shape == x.shape and torch.equal(back[:N], x[:N]) and not back[N:].any()
    few = torch.tensor([2, 1])              # fewer rows in all (5) than the width (16)
    x5, w5 = torch.randn(5, 16).bfloat16(), torch.randn(2, 8, 16).bfloat16()
    small = PaddedRows.of(x5, w5, few)
    back5 = small.unpad(small.pad(x5), 5)
    assert back5.shape == x5.shape and torch.equal(back5[:3], x5[:3]) and not back5[3:].any()
    for dtype in (torch.float32, torch.float64):    # fp32 runs faster unpadded; float64 is the oracle's loop
        assert PaddedRows.of(x.to(dtype), w1.to(dtype), counts_E) is None
    # the rule by device and dtype alone (the memory planner's): CPUs in bf16/fp16 only
    assert kernels.row_block("cpu", torch.float16) == kernels.row_block("cpu", torch.bfloat16) == 32
    assert kernels.row_block("cuda", torch.bfloat16) == kernels.row_block("cpu", torch.float32) == 1


def test_padded_sorted_experts_equal_unpadded(monkeypatch):
    """AutoEP's layout in bf16 (an idle expert, alignment rows past the last expert's): with the CPU
    row padding the output and every gradient equal those without it, in the input's shape."""
    from megamoe.model.dispatch import SortedExperts
    counts_E = torch.tensor([5, 0, 33, 2])
    n, H, I = int(counts_E.sum()), 16, 8
    torch.manual_seed(0)
    x = torch.cat([torch.randn(n, H), torch.zeros(3, H)]).bfloat16()
    w1, w3, w2 = (torch.randn(4, I, H) / 3).bfloat16(), (torch.randn(4, I, H) / 3).bfloat16(), (torch.randn(4, H, I) / 2).bfloat16()
    g = torch.randn(x.shape).bfloat16()

    def run():
        ins = [t.clone().requires_grad_() for t in (x, w1, w2, w3)]
        y = SortedExperts.apply(*ins, counts_E, counts_E.cumsum(0).to(torch.int32))
        y.backward(g)
        return [y[:n].detach()] + [t.grad for t in ins]
    assert kernels.expert_row_block(x, w1) > 1
    padded = run()
    monkeypatch.setattr(kernels, "CPU_EXPERT_ROW_BLOCK", 1)
    unpadded = run()
    assert padded[1].shape == x.shape
    # the alignment rows' input gradient: zeros when padded; unpadded, torch._grouped_mm leaves
    # them unwritten (uninitialised memory, AutoEP drops them), so only the real rows compare
    assert padded[1][n:].eq(0).all()
    padded[1], unpadded[1] = padded[1][:n], unpadded[1][:n]
    for a, b in zip(padded, unpadded):
        torch.testing.assert_close(a, b)


def test_padded_cpu_experts_equal_unpadded(monkeypatch):
    """A small-moe-shaped bf16 MoE layer's output and gradients with the CPU row padding equal
    those without it (the same products; only the matmuls' row blocking differs, within bf16's
    rounding)."""
    cfg = ModelConfig.load("small-moe")
    torch.manual_seed(0)
    layer = MoE(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    layer.bfloat16()
    x = torch.randn(2, 64, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)

    def run():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y = layer(x)
        y.square().sum().backward()
        return [y.detach(), x.grad] + [p.grad for p in layer.parameters()]
    assert kernels.expert_row_block(x, layer.experts.gate_up_proj) > 1
    padded = run()
    monkeypatch.setattr(kernels, "CPU_EXPERT_ROW_BLOCK", 1)
    for a, b in zip(padded, run()):
        torch.testing.assert_close(a, b)


def test_combine_sums_in_fp32_and_returns_the_inputs_dtypes():
    from megamoe.model.dispatch import Combine
    T, K, H = 7, 3, 8
    order, inverse, _, _ = _routing(T, K)
    torch.manual_seed(0)
    y, w = torch.randn(T * K, H), torch.rand(T, K)
    y16, w16 = y.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    out = Combine.apply(y16, w16, order, inverse)
    exact = (y16.double()[inverse].view(T, K, H) * w16.double().unsqueeze(-1)).sum(1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), exact.bfloat16().double(), rtol=0, atol=0)   # one rounding, at the end
    out.float().sum().backward()
    assert y16.grad.dtype == w16.grad.dtype == torch.bfloat16


def test_the_forward_tracks_max_logits_within_documents():
    """The model's forward hands its documents to QK-clip's max-logit tracking: with documents the
    per-head maxima never exceed the causal ones and, where a cross-document pair held the max,
    are lower."""
    from megamoe.kernels.attention import documents_of
    model = TINY.build(seed=2).train()
    model.set_track_max_logit(True)
    ids = torch.randint(3, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    ids[:, [5, 11, 17]] = 2
    with torch.no_grad():
        model(ids, documents=documents_of(ids, eos_id=2))
        within = model.pop_max_logits()
        model(ids)
        causal = model.pop_max_logits()
    assert torch.isfinite(within).all() and (within <= causal).all() and (within < causal).any()
