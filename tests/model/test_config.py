import json

import pytest

from megamoe.config import ConfigError, ModelConfig, list_presets


def test_presets_load_and_have_expected_sizes():
    assert {"tiny", "small-moe", "small-dense", "deepseek-v2-lite", "deepseek-v3"} <= set(list_presets())
    assert ModelConfig.load("tiny").num_params()["total"] < 2_000_000
    v3 = ModelConfig.load("deepseek-v3").num_params()
    assert 660e9 < v3["total"] < 690e9 and 36e9 < v3["active"] < 39e9   # 671B total, 37B active
    lite = ModelConfig.load("deepseek-v2-lite").num_params()
    assert 15e9 < lite["total"] < 16.5e9
    moe, dense = ModelConfig.load("small-moe").num_params(), ModelConfig.load("small-dense").num_params()
    assert abs(moe["active"] - dense["active"]) / dense["active"] < 0.05   # matched active params


def test_built_model_parameter_count_matches_formula():
    cfg = ModelConfig.load("tiny")
    assert sum(p.numel() for p in cfg.build().parameters()) == cfg.num_params()["total"]


@pytest.mark.parametrize("overrides, field", [
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(n_group=3), "n_group"),
    (dict(n_group=2, topk_group=3), "topk_group"),
    (dict(n_group=4, topk_group=1, num_experts_per_tok=3), "topk_group"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(eos_token_id=512), "eos_token_id"),
    (dict(attention_backend="xformers"), "attention_backend"),
    (dict(num_nextn_predict_layers=-1), "num_nextn_predict_layers"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(router_jitter_noise=1.5), "router_jitter_noise"),
])
def test_bad_configs_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"ModelConfig\.{field}"):
        ModelConfig.load("tiny", **overrides)


def test_unknown_field_and_missing_file_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="unknown ModelConfig field.*'hidden'"):
        ModelConfig.load("tiny", hidden=3)
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"hidden_size": 64,\n "vocab_size": }')
    with pytest.raises(ConfigError, match="line 2"):
        ModelConfig.load(bad)
    with pytest.raises(ConfigError, match="unknown model preset"):
        ModelConfig.load("gpt-5")


def test_wrong_types_are_named_before_validation(tmp_path):
    """A typo'd override ("96=") or a quoted number in a file is named with its field, not a TypeError."""
    with pytest.raises(ConfigError, match=r"ModelConfig\.n_routed_experts must be an integer, not '96='"):
        ModelConfig.load("small-moe", n_routed_experts="96=")
    for over, want in ((dict(norm_topk_prob=1), "true or false"), (dict(num_experts_per_tok=True), "an integer"),
                       (dict(routed_scaling_factor="2.5"), "a number"), (dict(scoring_func=3), "a string")):
        with pytest.raises(ConfigError, match=f"must be {want}"):
            ModelConfig.load("tiny", **over)
    f = tmp_path / "m.yaml"
    f.write_text("hidden_size: '64'\n")
    with pytest.raises(ConfigError, match=rf"{f.name}: ModelConfig\.hidden_size must be an integer"):
        ModelConfig.load(f)
    # what fits stays accepted: an int for a float, None for an Optional
    assert ModelConfig.load("tiny", routed_scaling_factor=2, q_lora_rank=None).routed_scaling_factor == 2


def test_json_and_yaml_round_trip(tmp_path):
    cfg = ModelConfig.load("deepseek-v3")
    cfg.to_json(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg
    import yaml
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(json.loads(cfg.to_json())))
    assert ModelConfig.load(tmp_path / "c.yaml") == cfg
