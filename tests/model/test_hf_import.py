"""Importing Hugging Face checkpoints megamoe did not write: configs built the way DeepSeek's
released ones are (YaRN, deepseek_v2 softmax routing, no "megamoe" block), random weights from
transformers' own init. The oracle is the original transformers model's logits."""
from __future__ import annotations

import json

import pytest
import torch

from megamoe import hf
from megamoe.export import read_hf_dir

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=256, kv_lora_rank=32, qk_nope_head_dim=16,
             qk_rope_head_dim=8, v_head_dim=16, moe_intermediate_size=24, n_routed_experts=8,
             num_experts_per_tok=2, first_k_dense_replace=1, rms_norm_eps=1e-5, tie_word_embeddings=False)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32.0, "beta_slow": 1.0}


def v3(**kw):
    from transformers import DeepseekV3Config
    return DeepseekV3Config(**{**SMALL, "q_lora_rank": 24, "n_shared_experts": 1, "n_group": 4, "topk_group": 2,
                               "norm_topk_prob": True, "routed_scaling_factor": 2.5, **kw})


def v2(**kw):
    from transformers import DeepseekV2Config
    return DeepseekV2Config(**{**SMALL, "q_lora_rank": None, "n_shared_experts": 2, "n_group": 1, "topk_group": 1,
                               "topk_method": "greedy", "norm_topk_prob": False, "routed_scaling_factor": 1.0,
                               **kw})


CASES = {
    # DeepSeek-V3's release: YaRN with mscale == mscale_all_dim, sigmoid, groups, renormalised
    "v3 yarn (mscale 1.0)": lambda: v3(rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}),
    "v3 yarn (mscale 0.707)": lambda: v3(rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
                                         rope_theta=50000.0),
    "v3 yarn (mscale 1.0, mscale_all_dim 0.707)": lambda: v3(rope_parameters={**YARN, "mscale": 1.0,
                                                                             "mscale_all_dim": 0.707}),
    # YaRN keys left out: transformers infers the cos/sin factor and skips the softmax rescale
    "v3 yarn without mscale keys": lambda: v3(rope_parameters={**YARN}),
    "v3 yarn with mscale only": lambda: v3(rope_parameters={**YARN, "mscale": 0.8}),
    "v3 yarn with attention_factor": lambda: v3(rope_parameters={**YARN, "attention_factor": 1.3, "mscale": 1.0,
                                                                 "mscale_all_dim": 1.0}),
    "v3 yarn, beta_fast 16 and beta_slow 2": lambda: v3(rope_parameters={**YARN, "beta_fast": 16.0, "beta_slow": 2.0,
                                                                         "mscale": 1.0, "mscale_all_dim": 1.0}),
    "v3 yarn with mscale_all_dim only": lambda: v3(rope_parameters={**YARN, "mscale_all_dim": 0.8}),
    "v3 every layer dense (shared expert ignored)": lambda: v3(first_k_dense_replace=3),
    "v3 plain rope, no q_lora, tied": lambda: v3(q_lora_rank=None, tie_word_embeddings=True,
                                                 rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
    "v3 half-rotation rope, eps 1e-6": lambda: v3(rope_interleave=False, rms_norm_eps=1e-6),
    # DeepSeek-V2-Lite's shape of config: softmax, greedy top-k, no renormalisation, YaRN
    "v2 greedy softmax": lambda: v2(),
    "v2 yarn (mscale 0.707)": lambda: v2(rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}),
    "v2 with q_lora, scaling 16": lambda: v2(q_lora_rank=24, routed_scaling_factor=16.0),
}


def make_hf_dir(name, tmp_path):
    from transformers import AutoModelForCausalLM
    hf_cfg = CASES[name]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)   # a trained V3 checkpoint has one; it changes expert choice
        for n, p in model.named_parameters():
            if "experts" in n or n.endswith("gate.weight"):
                p.normal_(0, 0.3)    # transformers zero-/small-inits these; make routing matter
    model.save_pretrained(tmp_path / "orig")
    cfg_json = json.loads((tmp_path / "orig" / "config.json").read_text())
    assert "megamoe" not in cfg_json
    return model, tmp_path / "orig"


@pytest.mark.parametrize("name", list(CASES))
def test_imported_model_has_the_original_logits(name, tmp_path):
    original, path = make_hf_dir(name, tmp_path)
    cfg, sd = read_hf_dir(path)
    ours = cfg.build(seed=0)
    ours.load_state_dict(sd, strict=True)
    ours.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = original(ids).logits
        mine = ours(ids).logits
    rel = (mine - theirs).norm() / theirs.norm()
    assert rel < 1e-5, f"{name}: relative error {rel:.2e}"


@pytest.mark.parametrize("name", list(CASES))
def test_import_then_export_keeps_every_field_transformers_reads(name, tmp_path):
    """HF -> megamoe -> HF reproduces each config field the model reads (no silent drops)."""
    _, path = make_hf_dir(name, tmp_path)
    original = json.loads((path / "config.json").read_text())
    cfg, _ = read_hf_dir(path)
    again = hf.to_hf_config(cfg).to_dict()
    fields = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "max_position_embeddings", "q_lora_rank", "kv_lora_rank",
              "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts",
              "num_experts_per_tok", "moe_intermediate_size", "first_k_dense_replace", "routed_scaling_factor",
              "rms_norm_eps", "tie_word_embeddings"]
    fields += ["rope_interleave", "n_group", "topk_group", "norm_topk_prob"] if "v3" in name else ["topk_method"]
    if original["first_k_dense_replace"] >= original["num_hidden_layers"]:   # no MoE layer reads these
        moe = ("n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
               "routed_scaling_factor", "norm_topk_prob", "first_k_dense_replace", "moe_intermediate_size")
        fields = [f for f in fields if f not in moe]
    for f in fields:
        assert again.get(f) == pytest.approx(original.get(f)), (f, original.get(f), again.get(f))
    # rope parameters may be spelled differently (a left-out mscale becomes an explicit factor):
    # compare what transformers computes from each
    for a, b in zip(rope_effect(original), rope_effect(again)):
        assert a == pytest.approx(b, rel=1e-12), (original["rope_parameters"], again["rope_parameters"])


def rope_effect(config: dict):
    """(inv_freq, cos/sin factor, softmax-scale factor) as transformers derives them."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale
    c = AutoConfig.for_model(**config)
    c.head_dim = c.qk_rope_head_dim   # what DeepSeek's rotary embedding uses
    rope = c.rope_parameters
    if rope.get("rope_type", "default") == "default":
        return [rope.get("rope_theta")], 1.0, 1.0
    inv_freq, factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](c, "cpu")
    return inv_freq.tolist(), factor, yarn_apply_mscale(rope, 1.0)


def test_group_limited_deepseek_v2_is_refused_not_approximated(tmp_path):
    hf_cfg = v2(topk_method="group_limited_greedy", n_group=2, topk_group=1).to_dict()
    with pytest.raises(hf.HFConversionError, match="group_limited_greedy"):
        hf.from_hf_config(hf_cfg)


def test_legacy_config_json_of_the_released_checkpoints():
    """DeepSeek's released config.json files use transformers 4's spelling: `rope_scaling` with
    "type", `rope_theta` at the top level, and no first_k_dense_replace / topk_method defaults
    spelled out. They must import as the same model as the current spelling."""
    current = v3(rope_parameters={**YARN, "rope_theta": 50000.0, "mscale": 0.9, "mscale_all_dim": 0.9}).to_dict()
    legacy = {k: v for k, v in current.items() if k != "rope_parameters"}
    legacy["rope_theta"] = 50000.0
    legacy["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                              "beta_fast": 32, "beta_slow": 1, "mscale": 0.9, "mscale_all_dim": 0.9}
    assert hf.from_hf_config(legacy) == hf.from_hf_config(current)
    cfg = hf.from_hf_config(legacy)
    assert cfg.rope_theta == 50000.0 and cfg.rope_scaling.factor == 4.0 and cfg.rope_scaling.mscale == 0.9
    plain = {k: v for k, v in current.items() if k not in ("rope_parameters", "first_k_dense_replace")}
    plain["rope_theta"] = 20000.0
    cfg = hf.from_hf_config(plain)
    assert cfg.rope_scaling is None and cfg.rope_theta == 20000.0 and cfg.first_k_dense_replace == 0
    v2_dict = {k: v for k, v in v2().to_dict().items() if k != "topk_method"}
    assert hf.from_hf_config(v2_dict).scoring_func == "softmax"
    for bad, message in ((dict(attention_bias=True), "attention_bias"), (dict(hidden_act="gelu"), "gelu"),
                         (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), "linear")):
        with pytest.raises(hf.HFConversionError, match=message):
            hf.from_hf_config({**current, **bad})


def test_optional_config_keys_take_transformers_defaults():
    """A config.json that leaves optional keys out imports with the values transformers itself
    would use for them: its config class's defaults (DeepseekV3Config's routed_scaling_factor is
    2.5, n_group 8, bos 0), not values of ours."""
    from transformers import DeepseekV2Config, DeepseekV3Config
    optional = ("rope_parameters", "rope_theta", "first_k_dense_replace", "norm_topk_prob", "n_group", "topk_group",
                "routed_scaling_factor", "tie_word_embeddings", "initializer_range", "hidden_act", "bos_token_id",
                "eos_token_id", "pad_token_id", "n_shared_experts", "num_experts_per_tok", "rope_interleave",
                "topk_method", "q_lora_rank")
    for full, cls in ((v3(num_hidden_layers=5, n_routed_experts=16).to_dict(), DeepseekV3Config),
                      (v2(num_hidden_layers=5, num_experts_per_tok=3).to_dict(), DeepseekV2Config)):
        # DeepseekV2Config has no default top-k (its model would fail): that one stays
        stripped = {k: v for k, v in full.items() if k not in optional or (k, cls) == ("num_experts_per_tok",
                                                                                   DeepseekV2Config)}
        theirs = cls(**stripped)
        cfg = hf.from_hf_config(stripped)
        assert cfg.first_k_dense_replace == theirs.first_k_dense_replace < 5 and cfg.n_routed_experts == 16 or \
            cls is DeepseekV2Config
        for field in ("routed_scaling_factor", "n_shared_experts", "num_experts_per_tok", "bos_token_id",
                      "eos_token_id", "pad_token_id", "initializer_range", "tie_word_embeddings", "q_lora_rank"):
            assert getattr(cfg, field) == getattr(theirs, field), (cls.__name__, field)
        assert cfg.rope_theta == theirs.rope_parameters["rope_theta"] and cfg.rope_scaling is None
        if cls is DeepseekV3Config:
            assert (cfg.norm_topk_prob, cfg.n_group, cfg.topk_group, cfg.rope_interleave) == \
                (theirs.norm_topk_prob, theirs.n_group, theirs.topk_group, theirs.rope_interleave)
    with pytest.raises(hf.HFConversionError, match="num_experts_per_tok"):
        hf.from_hf_config({k: v for k, v in v2().to_dict().items() if k != "num_experts_per_tok"})
    # and present keys are read, not defaulted
    full = v3(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}).to_dict()
    cfg = hf.from_hf_config({**full, "initializer_range": 0.01, "pad_token_id": 5, "bos_token_id": 4,
                             "tie_word_embeddings": True, "routed_scaling_factor": 2.0, "num_experts_per_tok": 3,
                             "norm_topk_prob": False})
    assert (cfg.initializer_range, cfg.pad_token_id, cfg.bos_token_id, cfg.tie_word_embeddings) == (0.01, 5, 4, True)
    assert (cfg.routed_scaling_factor, cfg.num_experts_per_tok, cfg.norm_topk_prob) == (2.0, 3, False)


def test_a_config_json_without_optional_keys_gives_the_logits_transformers_gives(tmp_path):
    """The oracle is transformers loading the same directory: keys left out of config.json (here
    set away from their defaults before being dropped) must change our model as they change its."""
    from transformers import AutoModelForCausalLM
    CASES["v3 non-default routing"] = lambda: v3(routed_scaling_factor=1.7, norm_topk_prob=False, rope_interleave=False,
                                                 bos_token_id=5, n_routed_experts=16)
    try:
        _, path = make_hf_dir("v3 non-default routing", tmp_path)
    finally:
        del CASES["v3 non-default routing"]
    cfg_file = path / "config.json"
    d = json.loads(cfg_file.read_text())
    for k in ("routed_scaling_factor", "norm_topk_prob", "rope_interleave", "n_group", "topk_group", "bos_token_id"):
        del d[k]
    cfg_file.write_text(json.dumps(d))
    original = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg, sd = read_hf_dir(path)
    assert (cfg.routed_scaling_factor, cfg.n_group, cfg.bos_token_id) == (2.5, 8, 0)
    ours = cfg.build(seed=0)
    ours.load_state_dict(sd, strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs, mine = original(ids).logits, ours.eval()(ids).logits
    assert (mine - theirs).norm() / theirs.norm() < 1e-5


def test_yarn_keys_left_out_and_refused():
    base = v3().to_dict()
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "original_max_position_embeddings": 32}
    with pytest.raises(hf.HFConversionError, match="factor"):             # transformers refuses it too
        hf.from_hf_config({**base, "rope_parameters": rope})
    rs = hf.from_hf_config({**base, "rope_parameters": {**rope, "factor": 8.0}}).rope_scaling
    assert rs.factor == 8.0 and (rs.beta_fast, rs.beta_slow) == (32.0, 1.0)
    with pytest.raises(hf.HFConversionError, match="truncate"):
        hf.from_hf_config({**base, "rope_parameters": {**rope, "factor": 4.0, "truncate": False}})


def test_yarn_fields_and_dense_or_null_expert_fields_import_as_written():
    """beta_fast / beta_slow are read (at small rope dims they may not move the logits, so the
    fields are checked); an all-dense config imports as the dense twin (no experts, top-1); null
    expert fields that transformers cannot load or run are refused, not guessed."""
    rs = hf.from_hf_config(v3(rope_parameters={**YARN, "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 1.0,
                                               "mscale_all_dim": 1.0}).to_dict()).rope_scaling
    assert (rs.beta_fast, rs.beta_slow, rs.mscale, rs.mscale_all_dim) == (16.0, 2.0, 1.0, 1.0)
    dense = hf.from_hf_config(v3(first_k_dense_replace=3, n_shared_experts=2, num_experts_per_tok=4).to_dict())
    assert (dense.n_routed_experts, dense.n_shared_experts, dense.num_experts_per_tok, dense.first_k_dense_replace) \
        == (0, 0, 1, 0)
    for bad, message in (({**v2().to_dict(), "n_shared_experts": None}, "n_shared_experts"),
                         ({**v3().to_dict(), "n_group": None}, "n_group / topk_group null"),
                         ({**v3().to_dict(), "topk_group": None}, "n_group / topk_group null")):
        with pytest.raises(hf.HFConversionError, match=message):
            hf.from_hf_config(bad)
