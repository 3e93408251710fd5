"""Initialisation independent of layout (megamoe.model.init): a parameter's values depend on the
seed and its name alone, an expert's on its global id too, so a rank that builds only its share
holds exactly that share of the whole model. The multi-rank proof (1 and 2 ranks x EP 1 and 2 x
ZeRO-2 and 3) is tests/distributed/test_expert_parallel.py::test_same_seed_same_model_at_every_layout."""
import dataclasses

import pytest
import torch

from megamoe.config import ModelConfig
from megamoe.model.init import ExpertSlices, build_on_meta, initial_values, materialize
from megamoe.model.layers import rope_inv_freq
from megamoe.model.moe import Router
from megamoe.parallel import expert

TINY = ModelConfig.load("tiny")
MTP = dataclasses.replace(TINY, num_nextn_predict_layers=1, tie_word_embeddings=True)


def test_meta_build_holds_no_storage_and_the_same_layout():
    meta = TINY.build(device="meta")
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    whole = TINY.build(seed=0)
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in whole.state_dict().items()}


def test_buffers_are_rebuilt_not_left_empty():
    model = MTP.build(seed=2)
    assert torch.equal(model.rotary.inv_freq, rope_inv_freq(MTP)[0])
    for _, r in model.routers():
        assert isinstance(r, Router) and all(torch.equal(b, torch.zeros_like(b)) for b in r.buffers())
        assert r.e_score_correction_bias.dtype == torch.float32 and not r.last_aux_loss.is_meta
    assert all(torch.isneginf(a.max_logit).all() for a in model.attention_modules())
    assert model.lm_head.weight is model.embed_tokens.weight   # tied weights stay one Parameter


def test_a_slice_of_the_experts_equals_those_rows_of_the_whole():
    whole = TINY.build(seed=9)
    layer = whole.layers[1].ffn.experts
    model = TINY.build(seed=9, defer_experts_of=expert.MOE_LAYER_PATTERN)
    deferred = model.layers[1].ffn.experts
    assert deferred.gate_up_proj.is_meta and isinstance(deferred.expert_slices, ExpertSlices)
    for start, end in ((0, 2), (2, 4), (1, 3)):
        gate_up, down = deferred.expert_slices.build(start, end)
        assert torch.equal(gate_up, layer.gate_up_proj[start:end]) and torch.equal(down, layer.down_proj[start:end])
    # everything else was built, and equals the whole model
    built = {n: p for n, p in model.named_parameters() if not p.is_meta}
    assert len(built) == len(list(whole.parameters())) - 2 * len(TINY.moe_layer_indices)
    assert all(torch.equal(p, dict(whole.named_parameters())[n]) for n, p in built.items())


def test_an_expert_does_not_depend_on_how_many_there_are():
    wide = dataclasses.replace(TINY, n_routed_experts=2 * TINY.n_routed_experts,
                               topk_group=TINY.topk_group, n_group=TINY.n_group)
    a = TINY.build(seed=4).layers[1].ffn.experts.down_proj
    b = wide.build(seed=4).layers[1].ffn.experts.down_proj
    assert torch.equal(a, b[:a.shape[0]])


def test_partition_sees_each_block_once_with_its_values():
    seen = []
    model = materialize(build_on_meta(MTP), 3, partition=lambda params: seen.append([p.clone() for p in params]))
    blocks = 1 + MTP.num_hidden_layers + 1 + 1 + MTP.num_nextn_predict_layers   # embed, layers, norm, head, mtp
    assert len(seen) == blocks - 1   # the tied head brings no new parameter
    flat = [p for block in seen for p in block]
    assert len(flat) == len(list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(flat, model.parameters()))


def test_values_statistics_and_dtype():
    std = TINY.initializer_range
    w = initial_values(TINY, "layers.0.attn.wq.weight", (512, 512), seed=0)
    assert w.dtype == torch.float32 and abs(w.std().item() - std) < 0.05 * std and abs(w.mean().item()) < 0.05 * std
    assert torch.equal(initial_values(TINY, "layers.0.attn_norm.weight", (8,), 0), torch.ones(8))
    bf16 = TINY.build(seed=1, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert torch.equal(bf16.embed_tokens.weight, TINY.build(seed=1).embed_tokens.weight.bfloat16())
    with pytest.raises(ValueError, match="expert ids"):
        initial_values(TINY, "layers.1.ffn.experts.down_proj", (2, 4, 4), 0, experts=range(3))


def test_engine_refuses_a_model_with_parameters_left_unbuilt():
    model = TINY.build(seed=0, defer_experts_of=expert.MOE_LAYER_PATTERN)
    with pytest.raises(expert.ExpertParallelError, match="no storage"):
        expert.initialize(model, TINY, {"train_micro_batch_size_per_gpu": 1}, 1)
