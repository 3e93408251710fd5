"""Expert parallelism (DeepSpeed AutoEP) and aux-loss-free balancing on 2 CPU ranks (gloo).

One torchrun launch runs every 2-rank configuration (tests/distributed/ep_rank.py loops over
them and writes per-rank JSON); one plain-python launch gives the single-process reference.
fp32 throughout: in bf16 tiny random models flip expert choices.

Model: 3 layers (1 dense + 2 MoE), E=8 routed experts, top-2, sigmoid scores, 2 groups with 1
kept (group-limited routing), 1 shared expert, balance loss and z-loss on, bias rate 0.01
updated after every optimizer step.
"""
import json
from pathlib import Path

import pytest

import multirank

from megamoe.config import ModelConfig
from megamoe.parallel import expert

REPO = Path(__file__).resolve().parents[2]
RANK_SCRIPT = Path(__file__).with_name("ep_rank.py")
STEPS, GLOBAL_BATCH, SEQ = 5, 4, 16
TOL = 1e-5
INIT_SEED = 31

TRAIN = dict(kind="train", steps=STEPS, global_batch=GLOBAL_BATCH, seq=SEQ, clip=1.0)
TWO_RANK_RUNS = [
    dict(TRAIN, name="ep2_z2", ep=2, zero=2),
    dict(TRAIN, name="ep1_z2", ep=1, zero=2),
    dict(TRAIN, name="ep1_autoep_z2", ep=1, zero=2, use_autoep=True),
    dict(TRAIN, name="ep2_z1", ep=2, zero=1),
    dict(TRAIN, name="ep2_z2_eager", ep=2, zero=2, eager_params=True),
    dict(TRAIN, name="ep2_z3", ep=2, zero=3),
    dict(TRAIN, name="ep2_z2_gas2", ep=2, zero=2, gas=2),
    # control: the same run without the balance loss and z-loss must differ measurably, so the
    # agreement above proves their gradients reach the router through AutoEP
    dict(TRAIN, name="ep2_z2_noaux", ep=2, zero=2, model=dict(aux_loss_alpha=0.0, router_z_loss_coef=0.0)),
    dict(kind="skewed", name="skewed", ep=2, zero=2, steps=15, global_batch=8, seq=32, skew=1.0, rate=0.02),
    dict(kind="routers", name="routers", ep=2, zero=3, seq=16),
    *(dict(kind="init", name=f"init_ep{ep}_z{z}", ep=ep, zero=z, seed=INIT_SEED) for ep in (1, 2) for z in (2, 3)),
]
SINGLE_RUNS = [dict(TRAIN, name="single", ep=1, zero=0),
               dict(kind="init", name="init_ep1_z2", ep=1, zero=2, seed=INIT_SEED),
               dict(kind="init", name="init_ep1_autoep_z2", ep=1, zero=2, use_autoep=True, seed=INIT_SEED),
               dict(kind="init", name="init_ep1_z3", ep=1, zero=3, seed=INIT_SEED)]


def _launch(tmp_path, runs, nproc):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"runs": runs}))
    rc, out = multirank.run([RANK_SCRIPT, spec, tmp_path], nproc, timeout=400)
    assert rc == 0, f"rank script failed:\n{out[-8000:]}"
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]
    results[0]["dir"] = tmp_path
    return results


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("ep2"), TWO_RANK_RUNS, 2)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("ep_single"), SINGLE_RUNS, 1)[0]


# ---------------------------------------------------------------------------------------------
# built where it lives: the same model at every layout
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_same_seed_same_model_at_every_layout(two_rank, single):
    """1 and 2 ranks x EP 1 and 2 x ZeRO-2 and 3, each rank building only its share: put back
    together, every layout holds exactly the model one process builds whole."""
    import torch

    from ep_rank import model_cfg  # noqa: E402
    whole = model_cfg(None).build(seed=INIT_SEED).state_dict()
    layouts = {f"1 rank, {n}": single["dir"] / f"init_{n}.pt" for n in ("ep1_z2", "ep1_autoep_z2", "ep1_z3")}
    layouts.update({f"2 ranks, init_ep{ep}_z{z}": two_rank[0]["dir"] / f"init_ep{ep}_z{z}.pt"
                    for ep in (1, 2) for z in (2, 3)})
    for layout, path in layouts.items():
        got = torch.load(path)
        assert sorted(got) == sorted(whole), f"{layout}: other tensors than a whole model's"
        differ = [k for k in whole if not torch.equal(got[k], whole[k])]
        assert not differ, f"{layout}: {len(differ)} tensors differ from the one-process build, e.g. {differ[:3]}"
    other_seed = model_cfg(None).build(seed=INIT_SEED + 1).state_dict()
    assert not torch.equal(other_seed["layers.1.ffn.experts.down_proj"], whole["layers.1.ffn.experts.down_proj"])


@pytest.mark.slow
def test_each_rank_builds_only_its_share(two_rank, single):
    r0, r1 = two_rank
    for r, mine in ((r0, [0, 1, 2, 3]), (r1, [4, 5, 6, 7])):
        for z in (2, 3):   # EP 2: no rank ever materialised another rank's experts
            assert r[f"init_ep2_z{z}"]["experts_on_meta"] and r[f"init_ep2_z{z}"]["local_experts"] == mine
        assert not r["init_ep1_z2"]["experts_on_meta"]   # EP 1 without AutoEP: the plain model
        for ep in (1, 2):   # ZeRO-3: every parameter partitioned as it was built (zero.Init's way)
            assert r[f"init_ep{ep}_z3"]["partitioned"] and not r[f"init_ep{ep}_z2"]["partitioned"]
    assert single["init_ep1_autoep_z2"]["experts_on_meta"]
    # what a rank holds: ZeRO-3 < EP 2 < the whole model
    held = {n: r0[n]["held_numel"] for n in ("init_ep1_z2", "init_ep2_z2", "init_ep2_z3")}
    assert held["init_ep2_z3"] < held["init_ep2_z2"] < held["init_ep1_z2"], held


def _max_diff(a, b):
    return max(abs(x - y) for x, y in zip(a, b))


def _assert_same_run(a, b, what):
    for key in ("loss", "aux", "z"):
        d = _max_diff(a[key], b[key])
        assert d <= TOL, f"{what}: {key} differs by {d:.3g} (> {TOL}): {a[key]} vs {b[key]}"
    assert a["bias"] == b["bias"], f"{what}: selection biases differ"
    if None not in a["grad_norm"] + b["grad_norm"]:   # global norm over EP-sharded experts, pre-clip
        d = _max_diff(a["grad_norm"], b["grad_norm"])
        assert d <= TOL * max(b["grad_norm"]), f"{what}: grad norm differs by {d:.3g}"


# ---------------------------------------------------------------------------------------------
# losses: EP 2 == EP 1 == one process; ZeRO 1 == 2 == 3
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ep2_ep1_single_process_same_losses(two_rank, single):
    r0, single = two_rank[0], single["single"]
    assert r0["ep2_z2"]["n_autoep_layers"] == 2 and r0["ep2_z2"]["layout"]["experts_per_rank"] == 4
    assert r0["ep1_z2"]["n_autoep_layers"] == 0          # EP 1: the plain model, data parallel
    assert r0["ep1_autoep_z2"]["n_autoep_layers"] == 2   # AutoEP layers at size 1 on request
    assert len(single["loss"]) == STEPS
    _assert_same_run(r0["ep2_z2"], single, "EP2 vs single process")
    _assert_same_run(r0["ep1_z2"], single, "EP1 vs single process")
    _assert_same_run(r0["ep1_autoep_z2"], single, "EP1 (AutoEP layers) vs single process")
    # training moved: not a comparison of constants; clipping (1.0) was active, so the global
    # gradient norm over expert-sharded parameters is part of what agreed
    assert single["loss"][-1] < single["loss"][0]
    assert min(r0["ep2_z2"]["grad_norm"]) > 1.0


@pytest.mark.slow
def test_zero_stages_agree_with_aux_losses(two_rank):
    r0 = two_rank[0]
    for stage in ("ep2_z1", "ep2_z3", "ep2_z2_eager"):
        _assert_same_run(r0[stage], r0["ep2_z2"], f"{stage} vs ep2_z2")
    assert all(a > 0 for a in r0["ep2_z2"]["aux"]) and all(z > 0 for z in r0["ep2_z2"]["z"])
    # Without the aux losses the run is measurably different: the agreement above is sensitive
    # to their gradient path through AutoEP's layer.
    d = _max_diff(r0["ep2_z2_noaux"]["loss"], r0["ep2_z2"]["loss"])
    assert d > 20 * TOL, f"aux losses changed the losses by only {d:.3g}"


@pytest.mark.slow
def test_ranks_agree(two_rank):
    r0, r1 = two_rank
    for name in ("ep2_z2", "ep2_z1", "ep2_z3", "ep2_z2_gas2", "ep1_z2", "skewed"):
        assert r0[name]["bias"] == r1[name]["bias"], f"{name}: bias differs between ranks"
    assert r0["ep2_z2"]["loss"] == r1["ep2_z2"]["loss"]
    assert r0["ep2_z2"]["layout"]["local_experts"] == [0, 1, 2, 3]
    assert r1["ep2_z2"]["layout"]["local_experts"] == [4, 5, 6, 7]


# ---------------------------------------------------------------------------------------------
# aux-loss-free balancing
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_gradient_accumulation_one_bias_update_per_step(two_rank):
    r0 = two_rank[0]
    gas, ref = r0["ep2_z2_gas2"], r0["ep2_z2"]
    k = 2
    for step_counts in gas["tokens_per_expert"]:
        for layer_counts in step_counts:   # all micro-batches of all ranks counted, once
            assert sum(layer_counts) == GLOBAL_BATCH * SEQ * k
    # micro 1 x GAS 2 sees the same tokens per step as micro 2 x GAS 1: same losses, same
    # counts, and the same bias (one update per optimizer step, not per micro-batch)
    _assert_same_run(gas, ref, "GAS 2 vs GAS 1")
    assert gas["tokens_per_expert"] == ref["tokens_per_expert"]
    first = [[abs(b) for b in layer] for layer in gas["bias"][0]]
    # after step 1 each |b_i| is 0 or exactly one update (rate 0.01, fp32), never two
    assert all(v == 0.0 or abs(v - 0.01) < 1e-7 for layer in first for v in layer), \
        f"bias after step 1 is not one update away from 0: {gas['bias'][0]}"


@pytest.mark.slow
def test_bias_update_reduces_imbalance(two_rank):
    r0 = two_rank[0]
    sk = r0["skewed"]
    worst = [max(step) for step in sk["max_over_mean"]]   # worst MoE layer per update
    start, end = worst[0], sum(worst[-4:]) / 4            # 4-update mean: loads oscillate around balance
    assert start >= 3.0, f"the toy task is not skewed enough to test anything (max/mean {start})"
    assert end < 0.6 * start, f"max/mean load went {start:.2f} -> {end:.2f}: {worst}"
    assert sk["bias_keys"] == ["layers.1.ffn.router.e_score_correction_bias",
                               "layers.2.ffn.router.e_score_correction_bias"]
    assert sk["state_dict_bias_matches"] and sk["checkpoint_bias_restored"]


# ---------------------------------------------------------------------------------------------
# our router inside AutoEP
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_megamoe_router_inside_autoep_layers(two_rank):
    for r in two_rank:
        res = r["routers"]
        assert res["n_verified"] == 2
        assert res["cpu_gathers"], "expert.initialize did not install AutoEP's CPU row gathers"
        assert res["router_types"] == ["ExpertParallelRouter", "ExpertParallelRouter"]
        assert res["router_is_megamoe"] and all(res["routers_are_model_routers"])
        assert res["bias_is_models"], "AutoEP did not carry the model's e_score_correction_bias"
        assert res["seq_len_seen"] == [SEQ, SEQ]           # Block sets ffn.router.seq_len
        assert res["counts_per_layer"] == [SEQ * 2, SEQ * 2]  # our router counted the tokens
        assert res["aux_positive"]
        assert all(res["router_grad_nonzero"]), "router weight got no gradient under ZeRO-3"
        assert "not megamoe's Router" in res["foreign_router_error"]


def test_expert_parallel_block_parses_and_validates():
    from deepspeed.module_inject.auto_ep_config import parse_autoep_config, validate_autoep_config

    cfg = ModelConfig.load("tiny")
    block = expert.expert_parallel_config(cfg, 2)
    parsed = parse_autoep_config(block)
    validate_autoep_config(parsed, world_size=2, pp_size=1, tp_size=1, sp_size=1, zero_stage=3)
    assert parsed.enabled and parsed.autoep_size == 2 and parsed.top_k == cfg.num_experts_per_tok
    assert parsed.moe_layer_pattern == r"layers\.\d+\.ffn" and parsed.router_pattern == "router"
    assert (parsed.expert_w1, parsed.expert_w2, parsed.expert_w3) == ("gate_up_proj", "down_proj", None)
    assert parsed.score_func == cfg.scoring_func and parsed.route_norm == cfg.norm_topk_prob
    assert (parsed.num_expert_groups, parsed.num_limited_groups) == (cfg.n_group, cfg.topk_group)
    assert parsed.shared_experts_pattern == "shared_experts" and parsed.load_balance_coeff is None
    no_groups = expert.expert_parallel_config(ModelConfig.load("tiny", n_group=1, topk_group=1), 4)
    assert "num_expert_groups" not in no_groups


@pytest.mark.parametrize("ep, world, words", [
    (3, 6, ["--expert-model-parallel-size", "n_routed_experts=8", "[1, 2, 4, 8]"]),
    (2, 3, ["--expert-model-parallel-size", "world size 3"]),
    (0, 2, ["--expert-model-parallel-size", "positive"]),
])
def test_bad_ep_sizes_are_clear_errors(ep, world, words):
    cfg = ModelConfig.load("tiny")
    with pytest.raises(expert.ExpertParallelError) as e:
        expert.check_ep_size(cfg, ep, world)
    for w in words:
        assert w in str(e.value)


def test_ep_on_dense_model_and_conflicting_block_are_errors():
    with pytest.raises(expert.ExpertParallelError, match="no routed experts"):
        expert.check_ep_size(ModelConfig.load("tiny", n_routed_experts=0), 2, 2)
    cfg = ModelConfig.load("tiny")
    derived = expert.expert_parallel_config(cfg, 2)
    with pytest.raises(expert.ExpertParallelError, match="router_pattern"):
        expert._merge_user_block(derived, {"router_pattern": "gate"})
    merged = expert._merge_user_block(derived, {"async_split_plan": True, "autoep_size": 2})
    assert merged["async_split_plan"] is True and merged["router_pattern"] == "router"


def test_update_routing_bias_single_process_semantics():
    """b_i += rate * sign(mean - load_i) from the accumulated counts, then the counts reset;
    rate 0 only reports. No process group: a world of one."""
    import torch

    from megamoe.parallel import balance

    cfg = ModelConfig.load("tiny", num_hidden_layers=2, first_k_dense_replace=0)
    model = cfg.build(seed=0)
    routers = [r for _, r in model.routers()]
    loads = [torch.tensor([5., 3, 4, 4, 4, 4, 4, 4]), torch.tensor([0., 0, 0, 0, 0, 0, 16, 16])]
    for r, load in zip(routers, loads):
        r.tokens_per_expert_acc.copy_(load)
    stats = balance.update_routing_bias(model, 0.0)
    assert torch.equal(stats["tokens_per_expert"], torch.stack(loads))
    assert torch.allclose(stats["max_over_mean"], torch.tensor([1.25, 4.0]))
    # load entropy / log E: two experts sharing everything is log 2 / log 8
    assert stats["load_entropy"][1].item() == pytest.approx(1 / 3) and 0.99 < stats["load_entropy"][0].item() < 1
    assert all(r.e_score_correction_bias.abs().sum() == 0 for r in routers)   # rate 0: no update
    assert all(r.tokens_per_expert_acc.sum() == 0 for r in routers)           # counts reset
    for r, load in zip(routers, loads):
        r.tokens_per_expert_acc.copy_(load)
    balance.update_routing_bias(model, 0.5)
    assert torch.equal(routers[0].e_score_correction_bias, torch.tensor([-0.5, 0.5, 0, 0, 0, 0, 0, 0]))
    assert torch.equal(routers[1].e_score_correction_bias, torch.tensor([0.5] * 6 + [-0.5] * 2))
    assert torch.equal(balance.routing_bias_state(model)[1], routers[1].e_score_correction_bias)
    # a training forward accumulates the counts update_routing_bias consumes
    model.train()
    ids = torch.randint(3, cfg.vocab_size, (2, 9))
    model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    stats = balance.update_routing_bias(model, 0.0)
    assert stats["tokens_per_expert"].sum(-1).tolist() == [2 * 8 * cfg.num_experts_per_tok] * 2
    assert (stats["rerouted_fraction"] > 0).all()    # biases of +-0.5 against sigmoid scores move picks


def test_specialisation_is_the_mutual_information_of_token_and_expert():
    """1 when the token id decides the expert, 0 when experts ignore it, and in between the
    mutual information / H(expert) of the counts; a training forward counts token -> experts."""
    import math

    import torch

    from megamoe.parallel import balance
    cfg = ModelConfig.load("tiny", num_hidden_layers=3, first_k_dense_replace=0)
    model = cfg.build(seed=0)
    r0, r1, r2 = [r for _, r in model.routers()]
    r0.bucket_expert_acc[torch.arange(16), torch.arange(16) % 8] = 5.0           # id decides expert
    r1.bucket_expert_acc[:16] = 1.0                                                # experts ignore the id
    r2.bucket_expert_acc[0, :2] = 1.0                                              # bucket 0: experts 0, 1
    r2.bucket_expert_acc[1, 1:2] = 2.0                                             # bucket 1: expert 1
    spec = balance.expert_specialisation(model)
    # layer 2 by hand: p(b0,e0)=p(b0,e1)=p(b1,e1)=1/4... with counts 1, 1, 2 of 4
    p = {(0, 0): .25, (0, 1): .25, (1, 1): .5}
    pb, pe = {0: .5, 1: .5}, {0: .25, 1: .75}
    mi = sum(v * math.log(v / (pb[b] * pe[e])) for (b, e), v in p.items())
    he = -sum(v * math.log(v) for v in pe.values())
    assert spec.tolist() == pytest.approx([1.0, 0.0, mi / he], abs=1e-6)
    assert all(r.bucket_expert_acc.sum() == 0 for r in (r0, r1, r2))                # read once
    ids = torch.randint(3, cfg.vocab_size, (2, 9))
    model.train()(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    assert r0.bucket_expert_acc.sum() == 2 * 8 * cfg.num_experts_per_tok


def test_rerouted_share_counts_the_picks_the_bias_changed():
    """Router._count_rerouted against sets: per token, the experts picked with the bias that the
    unbiased top-k would not have picked."""
    import torch

    from megamoe.kernels import reference
    cfg = ModelConfig.load("tiny", n_group=1, topk_group=1, num_experts_per_tok=3)
    router = cfg.build(seed=0).layers[1].ffn.router.train()
    router.e_score_correction_bias.copy_(torch.tensor([0.3, 0, 0, -0.2, 0, 0.1, 0, 0]))
    logits = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    args = (3, cfg.scoring_func, 1, 1, cfg.norm_topk_prob, cfg.routed_scaling_factor)
    biased = reference.route(logits, router.e_score_correction_bias, *args)[1]
    plain = reference.route(logits, None, *args)[1]
    changed = sum(len(set(b.tolist()) - set(p.tolist())) for b, p in zip(biased, plain))
    assert changed > 0
    router._count_rerouted(logits, biased)
    assert router.rerouted_acc.tolist() == [changed, 40 * 3]


def test_native_autoep_expert_names_round_trip():
    import torch

    cfg = ModelConfig.load("tiny")
    sd = cfg.build(seed=0).state_dict()
    ep_sd = expert.autoep_expert_state_dict(sd)
    assert "layers.1.ffn.experts.w1" in ep_sd and "layers.1.ffn.experts.gate_up_proj" not in ep_sd
    I = cfg.moe_intermediate_size
    assert torch.equal(ep_sd["layers.1.ffn.experts.w1"], sd["layers.1.ffn.experts.gate_up_proj"][:, :I])
    assert torch.equal(ep_sd["layers.1.ffn.experts.w3"], sd["layers.1.ffn.experts.gate_up_proj"][:, I:])
    back = expert.native_expert_state_dict(ep_sd)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    del ep_sd["layers.1.ffn.experts.w3"]
    with pytest.raises(KeyError, match="w3"):
        expert.native_expert_state_dict(ep_sd)


def test_deepspeed_patches_refuse_another_version(monkeypatch):
    import deepspeed
    import deepspeed.module_inject.auto_ep_layer as auto_ep_layer

    from megamoe.parallel import deepspeed_compat
    original = auto_ep_layer.TokenChoiceTopKRouter
    with deepspeed_compat.autoep_router_class(lambda **kw: "ours"):
        assert auto_ep_layer.TokenChoiceTopKRouter(dim=1) == "ours"
    assert auto_ep_layer.TokenChoiceTopKRouter is original
    monkeypatch.setattr(deepspeed, "__version__", "0.20.0")
    with pytest.raises(deepspeed_compat.DeepSpeedVersionError, match=r"deepspeed==0\.19\.8.*0\.20\.0 is installed"):
        with deepspeed_compat.autoep_router_class(lambda **kw: None):
            pass
    assert auto_ep_layer.TokenChoiceTopKRouter is original


def test_expert_name_mapping_touches_only_expert_weights():
    import torch
    from megamoe.parallel.expert import autoep_expert_state_dict, native_expert_state_dict
    g = torch.Generator().manual_seed(0)
    E, I, H = 3, 4, 5
    w1, w3, w2 = (torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g),
                  torch.randn(E, H, I, generator=g))
    others = {"layers.1.ffn.shared_experts.w1": torch.ones(2), "layers.1.ffn.experts.scale": torch.ones(3),
              "w1": torch.zeros(1), "layers.1.ffn.gate_up_proj": torch.ones(4)}
    autoep = {"layers.1.ffn.experts.w1": w1, "layers.1.ffn.experts.w3": w3, "layers.1.ffn.experts.w2": w2, **others}
    native = native_expert_state_dict(autoep)
    assert set(native) == {"layers.1.ffn.experts.gate_up_proj", "layers.1.ffn.experts.down_proj", *others}
    assert torch.equal(native["layers.1.ffn.experts.gate_up_proj"], torch.cat([w1, w3], dim=1))  # gate rows first
    assert native["layers.1.ffn.experts.down_proj"] is w2
    for k, v in others.items():
        assert native[k] is v
    back = autoep_expert_state_dict(native)
    assert set(back) == set(autoep) and all(torch.equal(back[k], autoep[k]) for k in autoep)
    with pytest.raises(KeyError, match="no matching layers.1.ffn.experts.w3"):
        native_expert_state_dict({"layers.1.ffn.experts.w1": w1})
    with pytest.raises(KeyError, match="no matching layers.1.ffn.experts.w1"):
        native_expert_state_dict({"layers.1.ffn.experts.w3": w3})
    with pytest.raises(ValueError, match=r"differ in shape"):
        native_expert_state_dict({"layers.1.ffn.experts.w1": w1, "layers.1.ffn.experts.w3": w3[:, :2]})


def test_recomputing_experts_match_autoep_experts(monkeypatch):
    """The GroupedExperts megamoe has AutoEP build (expert.recomputing_experts) against DeepSpeed's
    own on the same weights and AutoEP-shaped input (an idle expert, alignment rows past the last
    expert's): same parameters, same output and gradients, 2I fewer values saved per row; float64
    (the per-expert loop, which torch._grouped_mm does not take) against DeepSpeed's fp32; bf16
    weights cast to the input's dtype as AutoEP casts them; DeepSpeed's own forward, with the same
    arguments, for other activations and where it picks its Triton grouped GEMM."""
    import torch
    import deepspeed.moe.ep_experts as ep_experts
    from deepspeed.moe.ep_experts import GroupedExperts

    from megamoe.parallel.deepspeed_compat import autoep_local_experts
    H, I, E = 16, 8, 4
    torch.manual_seed(0)
    ds = GroupedExperts(dim=H, hidden_dim=I, num_experts=E)
    for w in ds.parameters():
        torch.nn.init.normal_(w, std=0.3)
    Ours = expert.recomputing_experts(GroupedExperts)
    ours = Ours(dim=H, hidden_dim=I, num_experts=E)
    ours.load_state_dict(ds.state_dict())
    assert isinstance(ours, GroupedExperts) and [n for n, _ in ours.named_parameters()] == ["w1", "w2", "w3"]
    counts = torch.tensor([5, 0, 7, 4], dtype=torch.int32)
    n = int(counts.sum())
    x = torch.cat([torch.randn(n, H), torch.zeros(8, H)])
    g = torch.cat([torch.randn(n, H), torch.zeros(8, H)])

    def run(m, x):
        xi = x.clone().requires_grad_()
        m.zero_grad(set_to_none=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = m(xi, counts)
        y.backward(g.to(y.dtype))
        activations = {t.untyped_storage().data_ptr(): t.numel() for t in saved if t.dim() == 2}
        return [y[:n], xi.grad[:n], *(w.grad for w in m.parameters())], sum(activations.values())
    want, want_saved = run(ds, x)
    got, got_saved = run(ours, x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert (want_saved, got_saved) == (len(x) * (H + 4 * I), len(x) * (H + 2 * I))
    got64, _ = run(ours.double(), x.double())
    for a, b in zip(got64, want):
        torch.testing.assert_close(a.float(), b)
    ours.bfloat16()
    got16, _ = run(ours, x)
    assert got16[0].dtype == torch.float32 and all(w.grad.dtype == torch.bfloat16 for w in ours.parameters())
    geglu = [Ours(dim=H, hidden_dim=I, num_experts=E, activation="geglu_tanh"),
             GroupedExperts(dim=H, hidden_dim=I, num_experts=E, activation="geglu_tanh")]
    geglu[0].load_state_dict(ds.state_dict()), geglu[1].load_state_dict(ds.state_dict())
    (y0, *_), saved0 = run(geglu[0], x)
    (y1, *_), saved1 = run(geglu[1], x)
    torch.testing.assert_close(y0, y1, rtol=0, atol=0)
    assert saved0 == saved1
    monkeypatch.setattr(ep_experts, "_run_experts_triton_grouped_mm", lambda *args: args)
    ours.use_triton_grouped_mm = True
    args = ours(x, counts)
    assert args[3] is x and args[4] is counts and args[0] is ours.w1
    import deepspeed.module_inject.auto_ep_layer as auto_ep_layer   # and the swap restores the class
    original = auto_ep_layer.GroupedExperts
    with autoep_local_experts(lambda *a: None, expert.recomputing_experts):
        assert issubclass(auto_ep_layer.GroupedExperts(16, 8, 4).__class__, original)
        assert auto_ep_layer.GroupedExperts(16, 8, 4).__class__ is not original
    assert auto_ep_layer.GroupedExperts is original


@pytest.fixture
def stock_autoep_token_functions():
    """DeepSpeed's own token functions for the test (also when this process built an AutoEP engine
    before, which installed the gathers), and whatever was installed before back after it."""
    import deepspeed.module_inject.auto_ep_layer as layer
    import deepspeed.moe.ep_kernels as kernels

    from megamoe.parallel import deepspeed_compat
    names = [(kernels, "permute_rows_supported"), (kernels, "gather_rows"), (layer, "combine_from_routed"),
             (kernels, "_megamoe_cpu_gathers")]
    saved = [(m, n, getattr(m, n, None)) for m, n in names]
    saved_stock = dict(deepspeed_compat.AUTOEP_STOCK)   # a test that reinstalls records its stand-ins there
    for (m, n), stock in saved_stock.items():
        setattr(m, n, stock)
    kernels._megamoe_cpu_gathers = False
    yield
    for m, n, v in saved:
        setattr(m, n, v)
    deepspeed_compat.AUTOEP_STOCK.clear()
    deepspeed_compat.AUTOEP_STOCK.update(saved_stock)


def _autoep_token_movement(counts, received, returned, scores, order, top_k, combine_impl="weighted_sum"):
    """AutoEP's token path on one rank, through DeepSpeed's functions: permute the received rows
    by local expert, un-permute them, combine the returned rows; outputs and input gradients."""
    import torch
    import deepspeed.module_inject.auto_ep_layer as layer
    rows, y, w = (t.detach().clone().requires_grad_() for t in (received, returned, scores))
    permuted, idx, _, n = layer.permute_by_local_expert(rows, counts)
    back = layer.unpermute_by_local_expert(permuted * torch.arange(1, permuted.shape[0] + 1.0).to(permuted)[:, None],
                                           idx, n)
    T = scores.shape[0]
    out = layer.combine_from_routed(y, w, order, top_k, "post", combine_impl, (1, T, y.shape[-1]))
    g = torch.Generator().manual_seed(5)
    torch.autograd.backward([back, out], [torch.randn(back.shape, generator=g).to(back.dtype),
                                          torch.randn(out.shape, generator=g).to(out.dtype)])
    return [permuted.detach(), back.detach(), out.detach(), rows.grad, y.grad, w.grad]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_autoep_cpu_gathers_are_deepspeeds_fallback_bit_for_bit(dtype, stock_autoep_token_functions):
    """The permutation (with its alignment padding and a source that sent nothing to an expert)
    and the weighted combine give DeepSpeed's own CPU results and gradients exactly, without its
    advanced indexing; CUDA-only settings (another combine) still reach DeepSpeed's code."""
    import torch
    import deepspeed.module_inject.auto_ep_layer as layer
    import deepspeed.moe.ep_kernels as kernels
    from megamoe.parallel import deepspeed_compat
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    T, K, E = 37, 3, 6
    counts = torch.tensor([[5, 0, 9], [7, 3, 0]])               # [sources, local experts]
    received = torch.randn(int(counts.sum()), 16, generator=g).to(dt)
    order = torch.argsort(torch.rand(T, E, generator=g).topk(K, dim=-1).indices.view(-1), stable=True)
    returned, scores = torch.randn(T * K, 16, generator=g).to(dt), torch.rand(T, K, generator=g)
    case = (counts, received, returned, scores, order, K)

    stock = _autoep_token_movement(*case)
    stock_combine = layer.combine_from_routed

    def indexed_rows(movement):   # advanced indexing of token rows (not of 1-D index vectors)
        with torch.autograd.profiler.profile(record_shapes=True) as prof:
            out = movement()
        return out, [e.name for e in prof.function_events if e.name in ("aten::index", "aten::index_put_")
                     and len(e.input_shapes[0]) > 1]

    assert indexed_rows(lambda: _autoep_token_movement(*case))[1]    # DeepSpeed's CPU fallback
    assert deepspeed_compat.autoep_gathers_on_cpu() and not deepspeed_compat.autoep_gathers_on_cpu()
    ours, indexing = indexed_rows(lambda: _autoep_token_movement(*case))
    assert indexing == []
    for a, b in zip(stock, ours):
        assert a.dtype == b.dtype and torch.equal(a, b)
    # settings the gathers do not cover reach DeepSpeed's own combine
    calls = []
    kernels._megamoe_cpu_gathers = False
    layer.combine_from_routed = lambda *a: calls.append(a[5]) or stock_combine(*a)
    deepspeed_compat.autoep_gathers_on_cpu()
    _autoep_token_movement(*case, combine_impl="legacy_bmm")
    _autoep_token_movement(*case)
    assert calls == ["legacy_bmm"]
    # a rank that received no rows at all: every permuted slot is padding
    empty = kernels.gather_rows(received[:0], torch.tensor([-1, -1], dtype=torch.int32))
    assert empty.shape == (2, 16) and not empty.any()


@pytest.mark.parametrize("capability, triton, want", [
    ((9, 0), True, {"async_split_plan": True, "gate_up_impl": "fused", "combine_impl": "fused_weighted_sum"}),
    ((8, 0), True, {"async_split_plan": True, "combine_impl": "fused_weighted_sum"}),
    ((9, 0), False, {"async_split_plan": True, "gate_up_impl": "fused"}),
])
def test_accelerator_tuning_on_cuda(monkeypatch, capability, triton, want):
    """The AutoEP keys megamoe adds on CUDA (none on CPU), each only where its kernel exists."""
    import torch
    from deepspeed.ops.triton_ops import autoep_fused_token_ops

    import megamoe.distributed
    assert expert.accelerator_tuning() == {}          # this machine's device: the CPU
    monkeypatch.setattr(megamoe.distributed, "device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: capability)
    monkeypatch.setattr(autoep_fused_token_ops, "is_available", lambda: triton)
    assert expert.accelerator_tuning() == want
