"""Routing and the balance loss against oracles that share no code with megamoe: plain Python
loops in float64, written from the DeepSeek-V3 paper (arXiv:2412.19437, section 2.1.2 and eqs.
12-20), one token and one sequence at a time."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megamoe import kernels
from megamoe.config import ModelConfig
from megamoe.model.moe import Router, capacity_keep_mask, sequence_balance_loss

TINY = ModelConfig.load("tiny")


# ----------------------------------------------------------------------------------------------
# oracles
# ----------------------------------------------------------------------------------------------
def naive_route_token(logits: list[float], bias: list[float], k: int, score_func: str, n_group: int,
                      topk_group: int, norm: bool, scale: float):
    """One token, DeepSeek-V3 eqs. 12-16: (expert ids in selection order, their gate weights)."""
    E = len(logits)
    if score_func == "sigmoid":
        s = [1.0 / (1.0 + math.exp(-x)) for x in logits]
    else:
        m = max(logits)
        ex = [math.exp(x - m) for x in logits]
        s = [e / sum(ex) for e in ex]
    choice = [s[i] + bias[i] for i in range(E)]
    allowed = set(range(E))
    if n_group > 1:
        size = E // n_group
        group_score = [sum(sorted(choice[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
        keep = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        allowed = {i for g in keep for i in range(g * size, (g + 1) * size)}
    picked = sorted(allowed, key=lambda i: -choice[i])[:k]
    w = [s[i] for i in picked]
    if norm:
        total = sum(w)
        w = [x / (total + 1e-20) for x in w]
    return picked, [x * scale for x in w]


def naive_balance_loss(scores: list[list[float]], picked: list[list[int]], E: int, K: int, S: int) -> float:
    """DeepSeek-V3 eqs. 17-20 without alpha, per sequence of S consecutive tokens, then averaged:
    f_i = E / (K S) * #{t : i in TopK_t},  P_i = 1/S sum_t s_{i,t} / sum_j s_{j,t},  sum_i f_i P_i."""
    losses = []
    for b in range(len(scores) // S):
        rows = range(b * S, (b + 1) * S)
        f = [E / (K * S) * sum(i in picked[t] for t in rows) for i in range(E)]
        P = [sum(scores[t][i] / sum(scores[t]) for t in rows) / S for i in range(E)]
        losses.append(sum(f[i] * P[i] for i in range(E)))
    return sum(losses) / len(losses)


# ----------------------------------------------------------------------------------------------
# routing
# ----------------------------------------------------------------------------------------------
@st.composite
def routing_case(draw):
    n_group = draw(st.sampled_from([1, 2, 4]))
    per_group = draw(st.integers(2, 8))
    E = n_group * per_group
    topk_group = draw(st.integers(1, n_group))
    k = draw(st.integers(1, min(8, topk_group * per_group)))
    return dict(E=E, k=k, n_group=n_group, topk_group=topk_group,
                score_func=draw(st.sampled_from(["sigmoid", "softmax"])), norm=draw(st.booleans()),
                scale=draw(st.sampled_from([1.0, 2.5])), T=draw(st.integers(1, 12)),
                seed=draw(st.integers(0, 2**31 - 1)), with_bias=draw(st.booleans()))


@settings(max_examples=150, deadline=None)
@given(routing_case())
def test_route_matches_the_papers_formula_token_by_token(c):
    g = torch.Generator().manual_seed(c["seed"])
    logits = torch.randn(c["T"], c["E"], generator=g, dtype=torch.float64) * 2  # float64: no ties
    bias = (torch.randn(c["E"], generator=g, dtype=torch.float64) * 0.1 if c["with_bias"]
            else torch.zeros(c["E"], dtype=torch.float64))
    w, idx, scores, counts = kernels.route(logits, bias if c["with_bias"] else None, c["k"], c["score_func"],
                                           c["n_group"], c["topk_group"], c["norm"], c["scale"])
    expected_counts = [0] * c["E"]
    for t in range(c["T"]):
        picked, weights = naive_route_token(logits[t].tolist(), bias.tolist(), c["k"], c["score_func"],
                                            c["n_group"], c["topk_group"], c["norm"], c["scale"])
        assert idx[t].tolist() == picked, (t, c)
        assert w[t].tolist() == pytest.approx(weights, rel=1e-12, abs=1e-15), (t, c)
        for i in picked:
            expected_counts[i] += 1
    assert counts.tolist() == expected_counts


def test_capacity_keeps_each_experts_best_assignments():
    """Brute force: per expert, sort its (token, slot) assignments by score (ties by position) and
    keep the first `capacity`."""
    g = torch.Generator().manual_seed(3)
    T, K, E, capacity = 40, 3, 6, 7
    indices = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    scores = torch.rand(T, K, generator=g)
    kept = capacity_keep_mask(scores, indices, E, capacity)
    expected = torch.zeros(T, K, dtype=torch.bool)
    for e in range(E):
        slots = [(t, j) for t in range(T) for j in range(K) if indices[t, j] == e]
        slots.sort(key=lambda tj: -float(scores[tj]))
        for t, j in slots[:capacity]:
            expected[t, j] = True
    assert torch.equal(kept, expected)


# ----------------------------------------------------------------------------------------------
# sequence-wise balance loss
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_balance_loss_is_per_sequence_with_several_sequences(score_func):
    """Sequences routed very differently: a batch-wide formula gives another value."""
    B, S, E, K = 3, 10, 8, 2
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B * S, E, generator=g, dtype=torch.float64)
    logits[:S, :2] += 4.0        # sequence 0 prefers experts 0-1, sequence 1 experts 6-7
    logits[S:2 * S, 6:] += 4.0
    _, idx, scores, _ = kernels.route(logits, None, K, score_func, 1, 1, True, 1.0)
    ours = sequence_balance_loss(scores, idx, E, S)
    oracle = naive_balance_loss(scores.tolist(), idx.tolist(), E, K, S)
    assert ours.item() == pytest.approx(oracle, rel=1e-12)
    whole_batch = naive_balance_loss(scores.tolist(), idx.tolist(), E, K, B * S)
    assert abs(oracle - whole_batch) > 0.05   # the case distinguishes the two readings


def test_router_inside_the_model_applies_the_loss_per_sequence():
    """The router's logged aux loss in a real forward (batch of 3 sequences) equals alpha times the
    oracle computed from the router's own input."""
    cfg = dataclasses.replace(TINY, aux_loss_alpha=0.3, router_z_loss_coef=0.0).validate()
    model = cfg.build(seed=2).train()
    layer, router = next(iter(model.routers()))
    seen, calls = {}, {}
    original = router.route

    def route(x, bias=None):
        seen["x"] = x.detach().double()
        calls["n"] = calls.get("n", 0) + 1
        return original(x, bias)
    router.route = route
    B, S = 3, 16
    ids = torch.randint(3, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids)
    assert calls["n"] == 1
    logits = seen["x"] @ router.weight.detach().double().T
    bias = router.e_score_correction_bias.double().tolist()
    picked, scores = [], []
    for row in logits.tolist():
        p, _ = naive_route_token(row, bias, cfg.num_experts_per_tok, cfg.scoring_func, cfg.n_group,
                                 cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor)
        picked.append(p)
        scores.append([1.0 / (1.0 + math.exp(-x)) for x in row])
    oracle = cfg.aux_loss_alpha * naive_balance_loss(scores, picked, cfg.n_routed_experts,
                                                     cfg.num_experts_per_tok, S)
    assert router.last_aux_loss.item() == pytest.approx(oracle, rel=1e-4)


def test_router_jitter_uses_the_global_torch_generator():
    """Jitter draws from torch's global RNG (that is what the trainer's per-rank RNG checkpoint
    restores): the same seed gives the same routing, another seed another one."""
    cfg = dataclasses.replace(TINY, router_jitter_noise=0.5).validate()
    router = Router(cfg).train()
    torch.nn.init.normal_(router.weight, std=1.0)
    x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(0))

    def weights(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return router.route(x).weights_TK
    assert torch.equal(weights(1), weights(1))
    assert not torch.equal(weights(1), weights(2))


def _router(**over) -> tuple[Router, torch.Tensor]:
    cfg = dataclasses.replace(TINY, n_group=1, topk_group=1, **over).validate()
    router = Router(cfg).train()
    torch.nn.init.normal_(router.weight, std=1.0)
    return router, torch.randn(48, cfg.hidden_size, generator=torch.Generator().manual_seed(0))


def test_router_jitter_is_the_input_times_uniform_noise_in_training_only():
    """Switch Transformer's jitter: logits of x * U(1 - eps, 1 + eps), drawn from the global RNG
    in that order; in eval, and with eps = 0, the plain logits and no random draw at all."""
    eps = 0.3
    router, x = _router(router_jitter_noise=eps)
    torch.manual_seed(5)
    got = router.route(x)
    torch.manual_seed(5)
    noisy = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
    want = router._top_k(noisy @ router.weight.detach().T, router.e_score_correction_bias)
    assert torch.equal(got.indices_TK, want[1]) and torch.equal(got.weights_TK.detach(), want[0].detach())
    plain = router._top_k(x @ router.weight.detach().T, router.e_score_correction_bias)
    assert not torch.equal(got.indices_TK, plain[1])
    for r in (router.eval(), _router(router_jitter_noise=0.0)[0]):
        state = torch.get_rng_state()
        assert torch.equal(r.route(x).indices_TK, r._top_k(x @ r.weight.detach().T, r.e_score_correction_bias)[1])
        assert torch.equal(torch.get_rng_state(), state)


def test_router_counts_what_training_forwards_route():
    """tokens_per_expert_acc adds each training forward's per-expert counts (not under no_grad,
    not in eval); bucket_expert_acc counts (token id mod 256, expert) pairs when token ids are set."""
    from megamoe.model.moe import SPECIALISATION_BUCKETS
    router, x = _router()
    ids = torch.randint(0, 1000, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    router.token_ids = ids
    a = router.route(x).indices_TK
    b = router.route(x * 2).indices_TK
    with torch.no_grad():
        router.route(x * 3)
    router.eval().route(x * 4)
    E = router.n_experts
    assert torch.equal(router.tokens_per_expert_acc, (torch.bincount(a.flatten(), minlength=E)
                                                      + torch.bincount(b.flatten(), minlength=E)).float())
    buckets = torch.zeros(SPECIALISATION_BUCKETS, E)
    for idx in (a, b):
        for t, row in enumerate(idx.tolist()):
            for e in row:
                buckets[int(ids[t]) % SPECIALISATION_BUCKETS, e] += 1
    assert torch.equal(router.bucket_expert_acc, buckets)


def test_router_z_loss_alone_is_the_mean_squared_logsumexp():
    """ST-MoE's router z-loss, from the router's own logits in float64, with the balance loss off."""
    router, x = _router(router_z_loss_coef=0.01, aux_loss_alpha=0.0)
    router.route(x)
    logits = x.double() @ router.weight.detach().double().T
    assert router.last_z_loss.item() == pytest.approx(0.01 * (logits.logsumexp(-1) ** 2).mean().item(), rel=1e-5)
    assert router.last_aux_loss.item() == 0.0


def test_capacity_zeroes_the_weights_of_dropped_assignments_only():
    router, x = _router(capacity_factor=0.5)
    capped = router.route(x)
    router.capacity_factor = None
    free = router.route(x)
    assert torch.equal(capped.indices_TK, free.indices_TK) and not capped.kept_TK.all()
    want = torch.where(capped.kept_TK, free.weights_TK, torch.zeros(()))
    torch.testing.assert_close(capped.weights_TK, want, rtol=0, atol=0)


def test_an_moe_layer_saves_its_weights_and_selection_bias_only():
    """The per-step counters stay out of checkpoints, and a layer without shared experts has no
    (empty) shared-expert weights that an HF export would then carry."""
    from megamoe.model.moe import MoE
    routed = ["experts.down_proj", "experts.gate_up_proj", "router.e_score_correction_bias", "router.weight"]
    shared = ["shared_experts.down_proj.weight", "shared_experts.gate_proj.weight", "shared_experts.up_proj.weight"]
    assert sorted(MoE(TINY).state_dict()) == sorted(routed + shared)
    assert sorted(MoE(dataclasses.replace(TINY, n_shared_experts=0).validate()).state_dict()) == routed


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_router_weight_gets_the_gradient_of_the_aux_losses(score_func):
    """The router's weight gradient from the balance and z losses alone (the routed output's
    gradient zero) is d(alpha * L_bal + c * mean(lse^2)) / dW, written out in float64 from
    DeepSeek-V3 eqs. 17-20 and ST-MoE: the sign and the form of what training descends on, which
    the logged values (computed apart) do not show."""
    alpha, c, S = 0.3, 0.02, 12
    router, x = _router(aux_loss_alpha=alpha, router_z_loss_coef=c, scoring_func=score_func)
    router.seq_len = S
    r = router.route(x)
    (r.weights_TK * 0).sum().backward()
    W = router.weight.detach().double().requires_grad_()
    logits = x.double() @ W.T
    scores = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(-1)
    E, K, B = W.shape[0], r.indices_TK.shape[1], x.shape[0] // S
    counts = torch.zeros(B, E, dtype=torch.float64)
    for t, row in enumerate(r.indices_TK.tolist()):
        for e in row:
            counts[t // S, e] += 1
    f = counts * E / (K * S)
    P = (scores / scores.sum(-1, keepdim=True)).view(B, S, E).mean(1)
    total = alpha * (f * P).sum(-1).mean() + c * (logits.logsumexp(-1) ** 2).mean()
    total.backward()
    torch.testing.assert_close(router.weight.grad.double(), W.grad, rtol=1e-4, atol=1e-7)


def test_nan_router_fault_poisons_the_first_tokens_logits_only(monkeypatch):
    """The injected fault (tests/train's NaN-router run) makes exactly token 0's logits NaN on
    rank 1 in the planned iteration: the other tokens route as without it."""
    from megamoe import faults
    router, x = _router()
    clean = router.eval().route(x)
    monkeypatch.setenv(faults.ENV, faults.env(nan_router_iters=[3])[faults.ENV])
    faults.plan.cache_clear()
    try:
        faults.begin_iteration(3, rank=1)
        seen, original = {}, router._top_k

        def spy(logits, bias):
            seen["logits"] = logits
            return original(logits, bias)
        router._top_k = spy
        poisoned = router.route(x)
    finally:
        faults.begin_iteration(None, rank=0)
        faults.plan.cache_clear()
    assert seen["logits"].shape == (x.shape[0], router.n_experts)
    assert seen["logits"][0].isnan().all() and not seen["logits"][1:].isnan().any()
    assert torch.equal(poisoned.indices_TK[1:], clean.indices_TK[1:])


def test_router_forward_honours_an_external_bias_and_keeps_fp32_buffers():
    """AutoEP's contract passes its own expert_bias: it steers selection like ours. Casting the model
    to bf16 keeps the selection bias and the token counts in fp32."""
    cfg = dataclasses.replace(TINY, n_group=1, topk_group=1).validate()
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.1)
    x = torch.randn(32, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    push = torch.zeros(cfg.n_routed_experts)
    push[5] = 10.0
    with torch.no_grad():
        _, idx, counts = router(x, expert_bias=push)
    assert (idx == 5).any(dim=1).all() and counts[5] == 32
    with torch.no_grad():
        _, idx0, _ = router(x)
    assert not (idx0 == 5).any(dim=1).all()
    router.to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert router.e_score_correction_bias.dtype == torch.float32 and router.tokens_per_expert_acc.dtype == torch.float32


def test_capacity_breaks_score_ties_by_position():
    """Equal scores: an expert keeps its earliest assignments (token order, then slot)."""
    T, K, E, capacity = 12, 2, 3, 4
    indices = torch.tensor([[t % E, (t + 1) % E] for t in range(T)])
    kept = capacity_keep_mask(torch.full((T, K), 0.5), indices, E, capacity)
    for e in range(E):
        slots = [(t, j) for t in range(T) for j in range(K) if indices[t, j] == e]
        assert [kept[tj].item() for tj in slots] == [True] * capacity + [False] * (len(slots) - capacity)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 70), st.integers(0, 2**31 - 1), st.booleans())
def test_fast_top_k_equals_the_stable_sort(E, seed, special):
    """reference.top_k_ties_to_lower's fp32 key trick picks exactly what the stable descending
    sort does: ties to the lower expert, -0.0 tied with 0.0, negatives and infinities ordered."""
    from megamoe.kernels.reference import top_k_ties_to_lower
    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(1, E + 1, (1,), generator=g))
    if special:   # mostly ties among signed zeros, tiny and denormal values, infinities
        vals = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-38, -1e-38, 3e-45, -3e-45, float("inf"), float("-inf")])
        choice = vals[torch.randint(0, len(vals), (32, E), generator=g)]
    else:
        choice = torch.randn(32, E, generator=g).round(decimals=1)
    expected = choice.sort(dim=-1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(top_k_ties_to_lower(choice, k), expected)
    assert torch.equal(top_k_ties_to_lower(choice.double(), k), expected)   # the sort itself


def test_a_built_router_reports_zero_metrics_before_any_forward():
    """After a build (meta device, then buffers reset where the model lives), each router's
    step metrics read as zeros, counts as int32 like a forward's, and its bias is fp32 zeros."""
    model = TINY.build(seed=0)
    for _, r in model.routers():
        assert r.last_tokens_per_expert.dtype == torch.int32 and not r.last_tokens_per_expert.any()
        assert [float(t) for t in (r.last_aux_loss, r.last_z_loss, r.last_dropped_fraction)] == [0.0, 0.0, 0.0]
        assert r.e_score_correction_bias.dtype == torch.float32 and not r.e_score_correction_bias.any()
    ids = torch.randint(0, TINY.vocab_size, (1, 8))
    model.train()(ids, labels=ids)
    assert all(r.last_tokens_per_expert.dtype == torch.int32 for _, r in model.routers())
