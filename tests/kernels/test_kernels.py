"""Triton kernels (run by the interpreter: tests/conftest.py sets TRITON_INTERPRET=1) against the
float64 references in kernels/reference.py, forward and backward, on random non-zero inputs.

Error metric: max |kernel - reference| / max |reference| over the tensor (a relative error that
does not blow up on individual near-zero entries). Bounds: 2e-6 for fp32, 1e-2 for bf16 (whose
outputs are rounded to 8 mantissa bits, and which the interpreter truncates rather than rounds).
"""
from __future__ import annotations

import math

import pytest
import torch

from megamoe.kernels import reference
from megamoe.kernels import rmsnorm as rmsnorm_mod
from megamoe.kernels import rope as rope_mod
from megamoe.kernels import router as router_mod

TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def assert_close(actual, expected, dtype, what):
    err = rel_err(actual, expected)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:g}"


# --------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(37, 3), (37, 7), (3, 11, 100), (64, 512), (5, 1000),
                                   (3, 9000)])  # 9000 > MAX_BLOCK_N: two column chunks
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_float64_reference(shape, dtype):
    torch.manual_seed(0)
    N = shape[-1]
    x = (torch.randn(shape) * 3 + 0.5).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(N)).to(dtype).requires_grad_()
    dy = torch.randn(shape).to(dtype)
    y = rmsnorm_mod.rms_norm(x, w, 1e-6)
    y.backward(dy)
    assert y.dtype == dtype and y.shape == x.shape

    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y64 = reference.rms_norm(x64, w64, 1e-6)
    y64.backward(dy.double())
    assert_close(y, y64, dtype, "y")
    assert_close(x.grad, x64.grad, dtype, "dx")
    assert_close(w.grad, w64.grad, dtype, "dweight")


def test_rms_norm_mixed_dtypes_and_strided_rows():
    """bf16 activations with an fp32 weight, rows taken from a wider buffer (row stride != N)."""
    torch.manual_seed(1)
    buf = torch.randn(2, 9, 160, dtype=torch.bfloat16)
    x = buf[..., :96].detach().requires_grad_()  # a strided leaf (row stride 160)
    x_view = buf[..., 16:112]                     # strided, and not starting at column 0
    w = (1 + 0.3 * torch.randn(96)).requires_grad_()
    y = rmsnorm_mod.rms_norm(x_view, w, 1e-5)
    assert y.dtype == torch.bfloat16
    assert_close(y, reference.rms_norm(x_view.double(), w.detach().double(), 1e-5),
                 torch.bfloat16, "y strided")
    dy = torch.randn(2, 9, 96)
    rmsnorm_mod.rms_norm(x, w, 1e-5).backward(dy.to(torch.bfloat16))
    assert w.grad.dtype == torch.float32
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    reference.rms_norm(x64, w64, 1e-5).backward(dy.to(torch.bfloat16).double())
    assert_close(x.grad, x64.grad, torch.bfloat16, "dx")
    assert_close(w.grad, w64.grad, torch.bfloat16, "dweight")


def test_rms_norm_config_is_chunked_and_bounded():
    for N in (1, 7, 100, 7168, 8192, 9000, 100000):
        cfg = rmsnorm_mod.rms_norm_config(N, interpret=False)
        assert cfg["BLOCK_N"] & (cfg["BLOCK_N"] - 1) == 0
        assert cfg["BLOCK_N"] <= rmsnorm_mod.MAX_BLOCK_N
        assert cfg["BLOCK_N"] * cfg["NUM_CHUNKS"] >= N
        assert cfg["BLOCK_M"] * cfg["BLOCK_N"] <= 8192


# --------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------
def yarn_tables(positions_BS: torch.Tensor, dim: int, base=10000.0, factor=4.0, orig_max=64,
                beta_fast=32.0, beta_slow=1.0, mscale=0.707):
    """YaRN cos/sin gathered at position ids, carrying the attention factor (DeepSeek-V3 recipe),
    built here only to feed the kernel realistic, non-unit-norm tables."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)

    def corr_dim(rot):
        return dim * math.log(orig_max / (rot * 2 * math.pi)) / (2 * math.log(base))
    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    attn_factor = 0.1 * mscale * math.log(factor) + 1.0
    angles = positions_BS.double()[..., None] * inv_freq
    return (angles.cos() * attn_factor).float(), (angles.sin() * attn_factor).float()


ROPE_CASES = [
    # B, S, H, D_nope, D_rope, batch of the cos/sin tables
    (2, 7, 3, 5, 6, 1),     # R = 3 pairs: non-power-of-2 everything, q slice of a wider head
    (2, 9, 1, 0, 64, 2),    # the shared rope key [B, S, 1, Dr], per-batch position ids
    (1, 13, 16, 32, 16, 1),
]


@pytest.mark.parametrize("B,S,H,Dn,Dr,bc", ROPE_CASES)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_float64_reference(B, S, H, Dn, Dr, bc, interleaved, dtype):
    torch.manual_seed(2)
    q = torch.randn(B, S, H, Dn + Dr).to(dtype).requires_grad_()
    x = q[..., Dn:]  # the model rotates the rope slice of q in place of a copy
    positions = torch.stack([torch.randperm(4 * S)[:S] for _ in range(bc)])  # arbitrary ids
    cos, sin = yarn_tables(positions, Dr)
    y = rope_mod.apply_rope(x, cos, sin, interleaved)
    dy = torch.randn(B, S, H, Dr).to(dtype)
    y.backward(dy)
    assert y.shape == x.shape and y.dtype == dtype

    q64 = q.detach().double().requires_grad_()
    y64 = reference.apply_rope(q64[..., Dn:], cos.double(), sin.double(), interleaved)
    y64.backward(dy.double())
    assert_close(y, y64, dtype, "y")
    assert_close(q.grad, q64.grad, dtype, "dq")
    if Dn:
        assert torch.all(q.grad[..., :Dn] == 0)  # nothing leaks into the nope part


def test_rope_layouts_differ():
    """Guard against the two layouts silently computing the same thing."""
    torch.manual_seed(3)
    x = torch.randn(1, 4, 2, 8)
    cos, sin = yarn_tables(torch.arange(4)[None], 8)
    a = rope_mod.apply_rope(x, cos, sin, True)
    b = rope_mod.apply_rope(x, cos, sin, False)
    assert rel_err(a, b) > 0.1


# --------------------------------------------------------------------------------------------
# Router
# --------------------------------------------------------------------------------------------
GROUPING = {8: (1, 1), 64: (8, 4), 160: (8, 3), 256: (8, 4)}  # E -> (n_group, topk_group)


def untied_rows(logits_TE, bias_E, top_k, score_func, n_group, topk_group, gap=1e-5):
    """Rows whose float64 selection has margins > gap (group scores and the k/k+1 boundary), so
    the fp32 kernel and the float64 reference must agree on them."""
    lg = logits_TE.double()
    scores = lg.sigmoid() if score_func == "sigmoid" else lg.softmax(-1)
    choice = scores + (0 if bias_E is None else bias_E.double())
    T, E = choice.shape
    ok = torch.ones(T, dtype=torch.bool)
    if n_group > 1:
        gs = choice.view(T, n_group, -1).topk(2, -1).values.sum(-1).sort(-1, descending=True).values
        ok &= (gs[:, :-1] - gs[:, 1:]).abs().min(-1).values > gap
    top = choice.sort(-1, descending=True).values[:, :top_k + 1]
    ok &= (top[:, :-1] - top[:, 1:]).min(-1).values > gap
    return ok


def run_route(mod_route, logits, bias, k, sf, G, TG, norm, scale, dW, dS):
    logits = logits.detach().requires_grad_()
    w, idx, s, counts = mod_route(logits, bias, k, sf, G, TG, norm, scale)
    loss = (w * dW).sum() + ((s * dS).sum() if dS is not None else 0)
    loss.backward()
    return w, idx, s, counts, logits.grad


def check_route(T, E, k, score_func, n_group, topk_group, norm, scale, dtype, with_bias=True,
                with_dscores=True, seed=0):
    torch.manual_seed(seed)
    logits = (torch.randn(T, E) * 2).to(dtype)
    bias = 0.05 * torch.randn(E) if with_bias else None
    dW = torch.randn(T, k)
    dS = torch.randn(T, E) if with_dscores else None
    w, idx, s, counts, dlogits = run_route(router_mod.route, logits, bias, k, score_func, n_group,
                                           topk_group, norm, scale, dW, dS)
    w6, idx6, s6, counts6, dlogits6 = run_route(
        reference.route, logits.double(), None if bias is None else bias.double(), k, score_func,
        n_group, topk_group, norm, scale, dW.double(), None if dS is None else dS.double())

    assert w.dtype == torch.float32 and s.dtype == torch.float32
    assert idx.dtype == torch.int64 and counts.dtype == torch.int32
    assert w.shape == (T, k) and idx.shape == (T, k) and s.shape == (T, E) and counts.shape == (E,)
    ok = untied_rows(logits, bias, k, score_func, n_group, topk_group)
    assert ok.float().mean() > 0.8, "test inputs are too tied to be informative"
    assert torch.equal(idx[ok], idx6[ok]), "expert choice differs on untied rows"
    # counts are exact: they count the kernel's own picks, and match the reference when untied
    assert torch.equal(counts, torch.bincount(idx.flatten(), minlength=E).int())
    if ok.all():
        assert torch.equal(counts, counts6)
    fp32 = torch.float32
    assert_close(s, s6, fp32, "scores")                        # scores are always fp32
    assert_close(w[ok], w6[ok], fp32, "weights")
    assert_close(dlogits[ok], dlogits6[ok].to(dtype), dtype, "dlogits")
    assert dlogits.dtype == dtype


@pytest.mark.parametrize("E", [8, 64, 160, 256])
@pytest.mark.parametrize("k", [1, 2, 6, 8])
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_route_matches_float64_reference(E, k, score_func):
    n_group, topk_group = GROUPING[E]
    norm = score_func == "sigmoid"          # DeepSeek-V3 renormalises; V2-style softmax does not
    scale = 2.5 if norm else 16.0
    check_route(37, E, k, score_func, n_group, topk_group, norm, scale, torch.float32, seed=E + k)


@pytest.mark.parametrize("case", [
    dict(E=256, k=8, score_func="sigmoid", n_group=8, topk_group=4, norm=True, scale=2.5,
         dtype=torch.bfloat16),                                  # DeepSeek-V3 in bf16
    dict(E=160, k=6, score_func="softmax", n_group=8, topk_group=3, norm=True, scale=1.0,
         dtype=torch.float32, with_bias=False),                  # softmax + renorm, no bias
    dict(E=64, k=6, score_func="sigmoid", n_group=1, topk_group=1, norm=False, scale=1.0,
         dtype=torch.float32, with_dscores=False),               # only the weights used
    dict(E=64, k=2, score_func="softmax", n_group=4, topk_group=1, norm=True, scale=1.0,
         dtype=torch.bfloat16),
    dict(E=8, k=8, score_func="softmax", n_group=1, topk_group=1, norm=True, scale=1.0,
         dtype=torch.float32, T=300),                            # k = E, several programs
])
def test_route_variants(case):
    case = dict(case)
    check_route(case.pop("T", 37), case.pop("E"), case.pop("k"), case.pop("score_func"),
                case.pop("n_group"), case.pop("topk_group"), case.pop("norm"),
                case.pop("scale"), case.pop("dtype"), **case)


def test_route_bias_steers_selection_but_not_weights():
    """A large bias on expert 3 makes every token pick it, with its unbiased score as weight."""
    torch.manual_seed(5)
    logits = torch.randn(20, 16)
    bias = torch.zeros(16)
    bias[3] = 10.0
    w, idx, s, counts = router_mod.route(logits, bias, 2, "sigmoid", 1, 1, False, 1.0)
    assert torch.all(idx[:, 0] == 3)
    torch.testing.assert_close(w[:, 0], torch.sigmoid(logits[:, 3]), rtol=1e-6, atol=1e-7)
    assert counts[3] == 20 and counts.sum() == 40


def test_route_ties_pick_a_valid_distinct_set():
    """With exactly tied scores, the picks are still k distinct experts among the tied maxima."""
    logits = torch.zeros(4, 8)
    logits[:, [1, 5, 6]] = 3.0
    w, idx, _, counts = router_mod.route(logits, None, 3, "softmax", 1, 1, True, 1.0)
    assert torch.equal(idx.sort(-1).values, torch.tensor([[1, 5, 6]] * 4))
    torch.testing.assert_close(w, torch.full((4, 3), 1 / 3))
    assert counts.tolist() == [0, 4, 0, 0, 0, 4, 4, 0]


@pytest.mark.parametrize("score_func, n_group, topk_group", [("sigmoid", 8, 4), ("softmax", 1, 1)])
def test_route_nan_rows_pick_distinct_in_range_experts(score_func, n_group, topk_group):
    """A token whose router logits are NaN (all, or some) must still pick k distinct experts in
    [0, E) in the kernel and the reference: an out-of-range index (BLOCK_E) would make the EP
    split sizes disagree across ranks and hang them. The other rows are unaffected."""
    from megamoe.kernels import reference
    E, k = 64, 6
    torch.manual_seed(11)
    logits = torch.randn(16, E)
    logits[3] = float("nan")                  # a whole row
    logits[7, ::3] = float("nan")             # some experts of a row
    bias = torch.randn(E) * 0.01
    for route in (router_mod.route, reference.route):
        w, idx, _, counts = route(logits, bias, k, score_func, n_group, topk_group, True, 1.0)
        assert idx.min() >= 0 and idx.max() < E
        assert all(len(set(row.tolist())) == k for row in idx), idx
        assert int(counts.sum()) == 16 * k and torch.equal(counts, torch.bincount(idx.flatten(), minlength=E).int())
        if score_func == "sigmoid":   # (one NaN logit makes a whole softmax row NaN)
            assert not set(idx[7].tolist()) & set(range(0, E, 3))   # NaN experts never win over finite ones
        clean = reference.route(logits[[0, 1, 2]], bias, k, score_func, n_group, topk_group, True, 1.0)[1]
        assert torch.equal(idx[[0, 1, 2]].sort(-1).values, clean.sort(-1).values)


def test_route_rejects_unsupported_shapes():
    x = torch.randn(4, 300)
    with pytest.raises(ValueError, match="E must be"):
        router_mod.route(x, None, 2, "sigmoid")
    with pytest.raises(ValueError, match="top_k"):
        router_mod.route(torch.randn(4, 64), None, 9, "sigmoid")
    with pytest.raises(ValueError, match="n_group"):
        router_mod.route(torch.randn(4, 64), None, 2, "sigmoid", n_group=7)


# --------------------------------------------------------------------------------------------
# The GPU launch configs (small tiles, many programs) under the interpreter: the tests above use
# interpreter-sized tiles (one big program), so this is what exercises row-block boundaries,
# the persistent RMSNorm backward loop and the cross-program atomic expert counts.
# --------------------------------------------------------------------------------------------
@pytest.fixture
def gpu_tiles(monkeypatch):
    for mod in (rmsnorm_mod, rope_mod, router_mod):
        monkeypatch.setattr(mod, "_interpreting", lambda: False)


@pytest.mark.parametrize("shape", [(37, 100), (5, 9000), (70, 16)])
def test_rms_norm_gpu_tiles(gpu_tiles, shape):
    assert rmsnorm_mod.rms_norm_config(shape[-1])["BLOCK_M"] < shape[0] or shape[-1] > 8192
    test_rms_norm_matches_float64_reference(shape, torch.float32)


def test_rope_gpu_tiles(gpu_tiles):
    assert rope_mod.rope_config(1, 32)["BLOCK_T"] < 2 * 40
    test_rope_matches_float64_reference(2, 40, 1, 0, 64, 2, True, torch.float32)
    test_rope_matches_float64_reference(1, 13, 16, 32, 16, 1, False, torch.float32)


@pytest.mark.parametrize("E,k,score_func,G,TG", [(256, 8, "sigmoid", 8, 4), (160, 6, "softmax", 8, 3),
                                                 (8, 2, "softmax", 1, 1)])
def test_route_gpu_tiles(gpu_tiles, E, k, score_func, G, TG):
    T = 300
    assert router_mod.router_config(E, k, G)["BLOCK_T"] < T  # several programs
    check_route(T, E, k, score_func, G, TG, True, 2.5, torch.float32, seed=E)


def test_reference_route_defaults_and_dtype_promotion():
    """The reference's defaults are DeepSeek-V3's (one group, renormalised, scale 1) and bf16
    logits are scored in fp32 (float64 stays float64: the oracle)."""
    from megamoe.kernels import reference
    torch.manual_seed(3)
    logits = torch.randn(12, 16)
    explicit = reference.route(logits, None, 4, "sigmoid", 1, 1, True, 1.0)
    for a, b in zip(reference.route(logits, None, 4, "sigmoid"), explicit):
        assert torch.equal(a, b)
    assert torch.allclose(explicit[0].sum(-1), torch.ones(12))          # renormalised, scale 1
    w, _, s, _ = reference.route(logits.bfloat16(), None, 4, "softmax")
    assert w.dtype == s.dtype == torch.float32
    torch.testing.assert_close(s, torch.softmax(logits.bfloat16().float(), dim=-1))
    w64, _, s64, _ = reference.route(logits.double(), None, 4, "softmax")
    assert w64.dtype == s64.dtype == torch.float64


# -- fused LM head + cross-entropy ---------------------------------------------------------------
@pytest.mark.parametrize("dtype, chunk, tol", [(torch.float32, 7, 1e-6), (torch.float32, 1000, 1e-6),
                                               (torch.bfloat16, 5, 2e-2)])
def test_linear_cross_entropy_equals_the_unfused_loss_and_gradients(dtype, chunk, tol):
    import torch.nn.functional as F

    from megamoe import kernels
    g = torch.Generator().manual_seed(0)
    T, H, V = 23, 16, 50
    h = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.3).to(dtype).requires_grad_()
    y = torch.randint(0, V, (T,), generator=g)
    y[[0, 5, 6]] = -100                                          # ignored positions
    fused = kernels.linear_cross_entropy(h, w, y, -100, chunk)
    ref = F.cross_entropy((h @ w.T).float(), y, ignore_index=-100)
    torch.testing.assert_close(fused, ref, rtol=tol, atol=tol)
    for a, b in zip(torch.autograd.grad(fused * 1.7, (h, w)), torch.autograd.grad(ref * 1.7, (h, w))):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    with torch.no_grad():                                        # no gradients wanted: none computed
        torch.testing.assert_close(kernels.linear_cross_entropy(h, w, y, -100, chunk), ref.detach(), rtol=tol, atol=tol)


def test_linear_cross_entropy_sums_bf16_weight_gradients_without_fp32_copies():
    """In bf16 each chunk's [V, H] weight gradient is added to the fp32 sum as it is: one fp32 cast
    in all (the sum's start), not one per chunk (on GPUs add_ casts inside its kernel; on CPUs
    TensorIterator makes its own temporary, below the dispatcher this test sees); the sum is the
    same to the bit, and what waits for backward is its bf16 rounding, not the fp32 sum."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from megamoe import kernels
    g = torch.Generator().manual_seed(0)
    T, H, V, chunk = 23, 16, 50, 5
    h = torch.randn(T, H, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.3).bfloat16().requires_grad_()
    y = torch.randint(0, V, (T,), generator=g)
    fp32_VH = []

    class Allocs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (V, H):
                fp32_VH.append(func.name())
            return out

    held = []
    with Allocs(), torch.autograd.graph.saved_tensors_hooks(lambda t: held.append(t) or t, lambda t: t):
        loss = kernels.linear_cross_entropy(h, w, y, -100, chunk)
    assert fp32_VH.count("aten::_to_copy") == 1, fp32_VH
    # held until backward at w's size: the sum is rounded to bf16 once, at the end of forward
    assert [t.dtype for t in held if t.shape == (V, H)] == [torch.bfloat16]
    # the same sum the per-chunk fp32 copies gave, in the same order
    ref = None
    for s in range(0, T, chunk):
        _, g_CV = kernels.reference._chunk_ce_torch(h[s:s + chunk] @ w.T, y[s:s + chunk],
                                                    torch.tensor(float(T)), -100, True)
        d = (g_CV.T @ h[s:s + chunk]).float()
        ref = d if ref is None else ref + d
    dw, = torch.autograd.grad(loss, w, retain_graph=True)
    assert torch.equal(dw, ref.bfloat16())
    # an upstream scale is applied in fp32 to the rounded sum and rounded once (0.3 is not a bf16)
    loss = kernels.linear_cross_entropy(h, w, y, -100, chunk)
    dw, = torch.autograd.grad(loss * 0.3, w)
    assert torch.equal(dw, (ref.bfloat16().float() * torch.tensor(0.3)).bfloat16())


def test_linear_cross_entropy_under_autocast_casts_the_weight_once():
    """Under bf16 autocast the fused loss computes what the chunks' autocast matmuls computed
    (bf16 operands, the fp32 weight gradient summed in fp32), casting the fp32 weight once in
    all, not again in every chunk (autocast caches no cast of a view, and `h @ w.T` takes one)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from megamoe import kernels
    g = torch.Generator().manual_seed(0)
    T, H, V, chunk = 23, 16, 50, 5
    h = torch.randn(T, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.3).requires_grad_()
    y = torch.randint(0, V, (T,), generator=g)

    class WeightCasts(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if (func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32
                    and args[0].shape in ((V, H), (H, V))):
                WeightCasts.n += 1
            return func(*args, **(kwargs or {}))

    with WeightCasts(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = kernels.linear_cross_entropy(h, w, y, -100, chunk)
    assert WeightCasts.n == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # autocast_operands casts as autocast does: float64 and integer tensors stay as they are
        casts = kernels.autocast_operands(h, h.double(), y, h.half())
        assert [t.dtype for t in casts] == [torch.bfloat16, torch.float64, torch.int64, torch.bfloat16]
        assert kernels.autocast_operands(w)[0].dtype == torch.bfloat16
    dh, dw = torch.autograd.grad(fused, (h, w))
    assert dh.dtype == dw.dtype == torch.float32
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    ref = kernels.linear_cross_entropy(hb, wb, y, -100, chunk)      # the same products on bf16 copies
    assert torch.equal(fused, ref)
    ref_dh, _ = torch.autograd.grad(ref, (hb, wb))
    assert torch.equal(dh, ref_dh.float())
    torch.testing.assert_close(dw, torch.autograd.grad(
        torch.nn.functional.cross_entropy((hb.detach() @ w.bfloat16().T).float(), y), w)[0], rtol=0.02, atol=2e-3)


def test_linear_cross_entropy_in_fp32_adds_each_chunk_into_the_sum():
    """In fp32 each later chunk's weight gradient goes into the sum by addmm_ (beta 1): no [V, H]
    product per chunk and no separate add. Only the first chunk's matmul makes a [V, H] tensor,
    and the gradient is the unfused one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from megamoe import kernels
    g = torch.Generator().manual_seed(0)
    T, H, V, chunk = 23, 16, 50, 5
    h = torch.randn(T, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.3).requires_grad_()
    y = torch.randint(0, V, (T,), generator=g)
    made = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.shape == (V, H):
                made.append(func.name())
            return out

    with Ops():
        loss = kernels.linear_cross_entropy(h, w, y, -100, chunk)
    assert made[0] == "aten::mm" and made[1:] == ["aten::addmm_"] * (math.ceil(T / chunk) - 1), made
    ref = torch.nn.functional.cross_entropy(h @ w.T, y)
    for a, b in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(ref, (h, w))):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fused_loss_takes_the_fp32_accumulating_gemm_on_cuda_only(monkeypatch):
    """fp32_accumulating_mm (CUDA, 16-bit: the matmul adds into the fp32 sum) is chosen only where
    its probe says torch can run it, never on CPUs; its calls are torch's out_dtype matmuls,
    checked here on the meta device (no CUDA here): fp32 out, the sum updated in place. With it
    forced, the fused loss runs end to end (meta: shapes and dtypes) and still hands back d(w) in
    w's dtype."""
    from megamoe import kernels
    assert not kernels.gemm_accumulates_in_fp32(torch.device("cpu"), torch.bfloat16)
    assert not kernels.gemm_accumulates_in_fp32(torch.device("cuda"), torch.float32)
    a = torch.empty(50, 5, device="meta", dtype=torch.bfloat16)
    b = torch.empty(5, 16, device="meta", dtype=torch.bfloat16)
    acc = kernels.fp32_accumulating_mm(None, a, b)
    assert acc.dtype == torch.float32 and acc.shape == (50, 16)
    assert kernels.fp32_accumulating_mm(acc, a, b) is acc
    calls, real = [], kernels.fp32_accumulating_mm
    monkeypatch.setattr(kernels, "fp32_accumulating_mm", lambda *args: calls.append(1) or real(*args))
    monkeypatch.setattr(kernels, "gemm_accumulates_in_fp32", lambda device, dtype: True)
    monkeypatch.setattr(reference, "autocast_operands", lambda *t: t)   # autocast knows no meta device
    h = torch.empty(23, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w = torch.empty(50, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    y = torch.zeros(23, device="meta", dtype=torch.long)
    dh, dw = torch.autograd.grad(kernels.linear_cross_entropy(h, w, y, -100, 5), (h, w))
    assert len(calls) == 5                                              # one per chunk of 5 tokens
    assert dh.dtype == dw.dtype == torch.bfloat16 and dw.shape == w.shape


def test_the_training_loss_never_holds_full_vocab_logits():
    """Forward and backward of a model with labels: no tensor as large as [tokens, vocab] (a
    TorchDispatchMode sees every op's output), and the loss is the unfused one."""
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    from megamoe.config import ModelConfig
    from megamoe.kernels import reference
    cfg = ModelConfig.load("tiny", vocab_size=4096, num_nextn_predict_layers=1)
    model = cfg.build(seed=0).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 65), generator=torch.Generator().manual_seed(0))
    T, chunk = 2 * 64, reference.lm_chunk_tokens(cfg.vocab_size, budget_bytes=4 * 4096 * 16)

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, t.numel())
            return out

    import unittest.mock
    with unittest.mock.patch.object(reference, "lm_chunk_tokens", lambda v, budget_bytes=0: chunk), Largest():
        out = model(ids[:, :-1], labels=ids[:, 1:])
        out.loss.backward()
    assert out.logits is None and chunk == 16
    # nothing larger than the [V, H] weight (and its gradient) or one chunk's [chunk, V] logits
    assert Largest.biggest <= max(cfg.vocab_size * cfg.hidden_size, chunk * cfg.vocab_size) < T * cfg.vocab_size
    with torch.no_grad():
        logits = model.eval()(ids[:, :-1]).logits
    torch.testing.assert_close(out.loss.detach(), F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].reshape(-1)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("V", [50, 4096 + 37])          # one tile; two tiles with a masked tail
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_kernel_matches_the_torch_chunk(V, dtype):
    """kernels/cross_entropy.py: a chunk's loss and its gradient written over the logits, against
    reference._chunk_ce_torch (softmax in fp32 from the stored logits, gradient in their dtype)."""
    from megamoe.kernels import cross_entropy as ce_mod
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, V, generator=g) * 3).to(dtype)
    y = torch.randint(0, V, (9,), generator=g)
    y[[1, 4]] = -100
    n = torch.tensor(11.0)
    want_loss, want_g = reference._chunk_ce_torch(logits.clone(), y, n, -100, True)
    buf = logits.clone()
    loss, grad = ce_mod.chunk_cross_entropy(buf, y, n, -100, True)
    assert grad is buf and grad.dtype == dtype                     # in place, in the logits' dtype
    assert rel_err(loss, want_loss) <= 2e-6
    assert rel_err(grad, want_g) <= TOL[dtype]
    assert (grad[[1, 4]] == 0).all()                               # ignored rows: no gradient
    loss_only, none = ce_mod.chunk_cross_entropy(logits.clone(), y, n, -100, False)
    assert none is None and rel_err(loss_only, want_loss) <= 2e-6


def test_fused_loss_with_the_triton_chunk_equals_the_torch_one():
    from megamoe import kernels
    g = torch.Generator().manual_seed(0)
    h = torch.randn(20, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 300, (20,), generator=g)
    out = {}
    for backend in ("triton", "reference"):
        kernels.set_backend(backend)
        try:
            loss = kernels.linear_cross_entropy(h, w, y, -100, 6)
            out[backend] = (loss, *torch.autograd.grad(loss, (h, w)))
        finally:
            kernels.set_backend(None)
    for a, b in zip(out["triton"], out["reference"]):
        assert rel_err(a, b) <= 2e-6


def _within_half_ulp(got: torch.Tensor, exact: torch.Tensor) -> bool:
    """got (bf16) is exact (float64) rounded once: within half a bf16 spacing (+ fp32 noise)."""
    spacing = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
    return bool(((got.double() - exact).abs() <= 0.5 * spacing * (1 + 1e-3) + 1e-12).all())


def test_reference_ops_compute_in_fp32_and_round_once():
    """A bf16 input to the references gives the float64 result rounded once to bf16 (statistics,
    rotation and softmax in fp32, not in the input's dtype); defaults are the model's."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 256, generator=g) * 3).bfloat16()
    w = torch.randn(256, generator=g).bfloat16()
    assert _within_half_ulp(reference.rms_norm(x, w, 1e-6), reference.rms_norm(x.double(), w.double(), 1e-6))
    q = torch.randn(2, 8, 4, 16, generator=g).bfloat16()
    ang = torch.rand(1, 8, 8, generator=g, dtype=torch.float64) * 6
    cos, sin = ang.cos().float(), ang.sin().float()
    for il in (True, False):
        assert _within_half_ulp(reference.apply_rope(q, cos, sin, il),
                                reference.apply_rope(q.double(), cos.double(), sin.double(), il))
        c16, s16 = cos.bfloat16(), sin.bfloat16()                # bf16 tables too: still fp32 inside
        assert _within_half_ulp(reference.apply_rope(q, c16, s16, il),
                                reference.apply_rope(q.double(), c16.double(), s16.double(), il))
    assert torch.equal(reference.apply_rope(q, cos, sin), reference.apply_rope(q, cos, sin, True))
    k, v = torch.randn(2, 8, 4, 16, generator=g), torch.randn(2, 8, 4, 16, generator=g)
    assert torch.equal(reference.attention(q.float(), k, v, 0.25), reference.attention(q.float(), k, v, 0.25, True))
    assert not torch.equal(reference.attention(q.float(), k, v, 0.25), reference.attention(q.float(), k, v, 0.25, False))
    assert reference.attention(q, k.bfloat16(), v.bfloat16(), 0.25).dtype == torch.bfloat16


def test_lm_chunk_is_the_largest_under_the_budget_and_sized_by_the_vocab(monkeypatch):
    for V, budget in ((129280, 1 << 28), (50, 4000), (32000, 1 << 20)):
        c = reference.lm_chunk_tokens(V, budget)
        assert c == 16 if 16 * 4 * V > budget else (c * 4 * V <= budget < (c + 1) * 4 * V)
    seen = []
    monkeypatch.setattr(reference, "lm_chunk_tokens", lambda v, budget_bytes=1 << 28: seen.append(v) or 16)
    reference.linear_cross_entropy(torch.randn(5, 8), torch.randn(40, 8), torch.randint(0, 40, (5,)))
    assert seen and set(seen) == {40}                            # the vocab, not the hidden size
    used = []
    monkeypatch.setattr(reference, "device_lm_chunk", lambda v, device: used.append((v, device)) or 16)
    reference.linear_cross_entropy(torch.randn(5, 8), torch.randn(40, 8), torch.randint(0, 40, (5,)))
    assert used == [(40, "cpu")]                                 # and the hidden states' device


def test_cpu_lm_chunks_are_cache_sized_where_they_hold_256_tokens():
    """On CPUs 8 MiB of fp32 logits per chunk when that is at least 256 tokens, else the GPU's
    256 MiB chunk (each chunk reads the whole head again)."""
    chunk = reference.device_lm_chunk
    assert (chunk(8192, "cpu"), chunk(8192, "cuda")) == (256, 8192)
    assert chunk(512, "cpu") == 4096 and chunk(129280, "cpu") == chunk(129280, "cuda") == 519
    assert chunk(32000, "cpu") == chunk(32000, "cuda")


def test_linear_cross_entropy_with_one_input_frozen_and_far_apart_rows():
    """Only h or only w wanting a gradient (a frozen head, frozen embeddings) gives that one
    gradient; rows whose logits sit hundreds apart stay exact (each row's own max is subtracted)."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(1)
    T, H, V = 9, 8, 30
    h0, w0 = torch.randn(T, H, generator=g), torch.randn(V, H, generator=g)
    h0[:4] *= 60                                                 # logits of hundreds in some rows
    y = torch.randint(0, V, (T,), generator=g)
    for frozen in ("h", "w"):
        h, w = h0.clone().requires_grad_(frozen != "h"), w0.clone().requires_grad_(frozen != "w")
        h64, w64 = h0.double().requires_grad_(frozen != "h"), w0.double().requires_grad_(frozen != "w")
        loss, ref = reference.linear_cross_entropy(h, w, y, -100, 4), F.cross_entropy(h64 @ w64.T, y)
        assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
        loss.backward()
        ref.backward()
        live, live64 = (w, w64) if frozen == "h" else (h, h64)
        assert (h.grad is None) == (frozen == "h") and (w.grad is None) == (frozen == "w")
        torch.testing.assert_close(live.grad.double(), live64.grad, rtol=1e-4, atol=1e-5)


def test_fused_loss_backward_scales_its_saved_gradients_in_place():
    """Backward scales the gradients computed in forward in place (no second [V, H] fp32 buffer):
    the result equals the unfused gradient times the upstream scale, and a second backward through
    a retained graph is refused by autograd instead of scaling them twice."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(6, 4, generator=g, requires_grad=True), torch.randn(10, 4, generator=g, requires_grad=True)
    y = torch.randint(0, 10, (6,), generator=g)
    (reference.linear_cross_entropy(h, w, y) * 2.5).backward(retain_graph=False)
    want = torch.autograd.grad(F.cross_entropy(h @ w.T, y) * 2.5, (h, w))
    torch.testing.assert_close((h.grad, w.grad), want)
    loss = reference.linear_cross_entropy(h, w, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
