"""Our model vs transformers' DeepseekV3/V2ForCausalLM loaded from our converted weights."""
import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from megamoe import hf
from megamoe.config import ModelConfig, RopeScaling

BASE = ModelConfig.load("tiny")


def variant(**kw) -> ModelConfig:
    return dataclasses.replace(BASE, **kw).validate()


CONFIGS = {
    "tiny (q_lora, sigmoid, groups, renorm)": variant(),
    "no q_lora": variant(q_lora_rank=None),
    "no groups": variant(n_group=1, topk_group=1),
    "no renorm, scaling 2.5": variant(norm_topk_prob=False, routed_scaling_factor=2.5),
    "tied embeddings": variant(tie_word_embeddings=True),
    "dense only": variant(n_routed_experts=0, n_shared_experts=0),
    "no shared expert, top-3 of 8, 4 groups": variant(n_shared_experts=0, num_experts_per_tok=3, n_group=4, topk_group=2),
    "yarn": variant(rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=64, mscale=0.9,
                                             mscale_all_dim=0.9)),
    "half-rotation rope": variant(rope_interleave=False),
    "softmax (deepseek_v2)": variant(scoring_func="softmax", norm_topk_prob=False, n_group=1, topk_group=1),
}


def export_and_load(model, cfg, tmp_path):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "hf"
    hf.save_hf_dir(out, cfg, model.state_dict())
    model, info = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32,
                                                       output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    cfg = CONFIGS[name]
    model = cfg.build(seed=1).eval()
    # a non-zero routing bias must be carried over (it changes expert choice)
    for _, router in model.routers():
        if cfg.scoring_func == "sigmoid":
            router.e_score_correction_bias.normal_(0, 0.05)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = model(ids).logits
    theirs_model = export_and_load(model, cfg, tmp_path)
    assert type(theirs_model).__name__ == ("DeepseekV2ForCausalLM" if "softmax" in name else "DeepseekV3ForCausalLM")
    with torch.no_grad():
        theirs = theirs_model(ids).logits
    rel = (ours - theirs).norm() / theirs.norm()
    assert rel < 1e-5, f"{name}: relative error {rel:.2e}"


def test_hf_native_hf_round_trip_is_bit_exact(tmp_path):
    from transformers import DeepseekV3ForCausalLM
    cfg = CONFIGS["no renorm, scaling 2.5"]
    hf_model = DeepseekV3ForCausalLM(hf.to_hf_config(cfg))
    hf_model.save_pretrained(tmp_path / "orig")
    hf_sd = load_file(str(tmp_path / "orig" / "model.safetensors"))
    back_cfg = hf.from_hf_config(hf_model.config)
    assert back_cfg == cfg   # training-side fields ride along in config.json["megamoe"]
    native = hf.from_hf_state_dict(hf_sd, back_cfg)
    model = back_cfg.build()
    model.load_state_dict(native, strict=True)   # every native tensor present, nothing extra
    again = hf.to_hf_state_dict(native, back_cfg)
    assert set(again) == set(hf_sd)
    for k in hf_sd:
        assert torch.equal(again[k], hf_sd[k]), k


def test_fused_in_memory_hf_layout_is_accepted():
    from transformers import DeepseekV3ForCausalLM
    cfg = CONFIGS["tiny (q_lora, sigmoid, groups, renorm)"]
    hf_model = DeepseekV3ForCausalLM(hf.to_hf_config(cfg))
    native = hf.from_hf_state_dict(hf_model.state_dict(), cfg)
    model = cfg.build()
    model.load_state_dict(native, strict=True)
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids).logits, hf_model.eval()(ids).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw, message", [
    (dict(scoring_func="softmax", norm_topk_prob=True, n_group=1, topk_group=1), "norm_topk_prob"),
    (dict(scoring_func="softmax", norm_topk_prob=False), "group-limited"),
])
def test_unrepresentable_softmax_models_are_refused(kw, message):
    cfg = variant(**kw)
    with pytest.raises(hf.HFConversionError, match=message):
        hf.to_hf_config(cfg)


def test_softmax_with_trained_bias_is_refused():
    cfg = variant(scoring_func="softmax", norm_topk_prob=False, n_group=1, topk_group=1)
    model = cfg.build()
    next(r for _, r in model.routers()).e_score_correction_bias[0] = 0.1
    with pytest.raises(hf.HFConversionError, match="selection bias"):
        hf.to_hf_state_dict(model.state_dict(), cfg)


def test_mtp_tensors_are_refused_not_dropped():
    """A config announcing MTP layers imports (transformers' own default is 1 and it writes none);
    MTP tensors that are actually there are refused, never silently dropped."""
    from transformers import DeepseekV3Config
    hf_cfg = DeepseekV3Config(**{**hf.to_hf_config(BASE).to_dict(), "num_nextn_predict_layers": 1})
    assert hf.from_hf_config(hf_cfg).num_nextn_predict_layers == 0
    sd = hf.to_hf_state_dict(BASE.build().state_dict(), BASE)
    sd["model.layers.3.eh_proj.weight"] = torch.zeros(2, 2)  # an MTP layer's tensor
    with pytest.raises(hf.HFConversionError, match=r"multi-token-prediction layer\(s\) \[3\]"):
        hf.from_hf_state_dict(sd, BASE)


def test_export_refuses_to_overwrite(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        hf.save_hf_dir(tmp_path / "x", BASE, BASE.build().state_dict())
    assert (tmp_path / "x" / "keep.txt").read_text() == "user data"


def test_sharded_export_loads(tmp_path):
    from transformers import AutoModelForCausalLM
    model = BASE.build(seed=3).eval()
    hf.save_hf_dir(tmp_path / "hf", BASE, model.state_dict(), max_shard_bytes=100_000)
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True, dtype=torch.float32)
    ids = torch.randint(0, BASE.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-6)


def test_exported_directory_contents(tmp_path):
    """What inference servers and transformers read from the directory itself, checked against the
    model config and the tensors: architectures, dtype, generation config, shard layout, index."""
    import json

    from safetensors import safe_open
    cfg = dataclasses.replace(BASE, pad_token_id=0, initializer_range=0.01).validate()   # not transformers' default
    model = cfg.build(seed=5)
    for _, router in model.routers():
        router.e_score_correction_bias.normal_(0, 0.05)
    sd = model.state_dict()
    limit = 60_000
    out = tmp_path / "new" / "dirs" / "out"                        # parents are created
    hf.save_hf_dir(out, cfg, sd, dtype=torch.bfloat16, max_shard_bytes=limit)
    assert [p.name for p in out.parent.iterdir()] == ["out"]      # no temporary directory left
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == ["DeepseekV3ForCausalLM"] and conf["model_type"] == "deepseek_v3"
    assert conf["dtype"] == "bfloat16" and conf["num_nextn_predict_layers"] == 0
    assert conf["num_key_value_heads"] == cfg.num_attention_heads and conf["attention_dropout"] == 0.0
    assert (conf["bos_token_id"], conf["eos_token_id"], conf["pad_token_id"]) == (1, 2, 0)
    assert conf["initializer_range"] == cfg.initializer_range
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 0)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 1 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    total = 0
    expected = hf.to_hf_state_dict(sd, cfg)
    for f in files:
        with safe_open(str(out / f), "pt") as fh:
            assert fh.metadata() == {"format": "pt"}
            names = list(fh.keys())
            size = 0
            for k in names:
                t = fh.get_tensor(k)
                assert index["weight_map"][k] == f
                want = torch.float32 if k.endswith("e_score_correction_bias") else torch.bfloat16
                assert t.dtype == want, k
                assert torch.equal(t, expected[k].to(want)), k
                size += t.numel() * t.element_size()
            assert size <= limit or len(names) == 1    # a shard exceeds the limit only for one big tensor
            total += size
    assert set(index["weight_map"]) == set(expected)
    assert index["metadata"]["total_size"] == total


def test_dense_export_is_all_dense_layers():
    cfg = CONFIGS["dense only"]
    conf = hf.to_hf_config(cfg).to_dict()
    assert conf["first_k_dense_replace"] == cfg.num_hidden_layers
    assert conf["architectures"] == ["DeepseekV3ForCausalLM"]
    assert hf.to_hf_config(CONFIGS["softmax (deepseek_v2)"]).architectures == ["DeepseekV2ForCausalLM"]


def test_eos_list_takes_the_first_id():
    d = hf.to_hf_config(BASE).to_dict()
    d["eos_token_id"] = [2, 7]
    assert hf.from_hf_config(d).eos_token_id == 2


def test_shards_fill_greedily_up_to_the_exact_limit_and_only_sharded_exports_have_an_index(tmp_path):
    """A shard takes tensors (sorted by name) while their bytes stay <= max_shard_bytes: a limit equal
    to the first two tensors' bytes puts exactly those two in shard 1; one byte less than the
    whole model gives exactly two shards (and an index); no limit gives one file and no index."""
    import json

    from safetensors import safe_open
    sd = BASE.build(seed=1).state_dict()
    hf_sd = hf.to_hf_state_dict(sd, BASE)
    names = sorted(hf_sd)
    nbytes = {k: hf_sd[k].numel() * 4 for k in names}                   # exported as fp32
    hf.save_hf_dir(tmp_path / "exact", BASE, sd, max_shard_bytes=nbytes[names[0]] + nbytes[names[1]])
    index = json.loads((tmp_path / "exact" / "model.safetensors.index.json").read_text())
    first = sorted(k for k, f in index["weight_map"].items() if f.startswith("model-00001-"))
    assert first == names[:2]
    # a later shard filled to exactly the limit too: the greedy rule, shard by shard
    def greedy(limit):
        shards, size = [[]], 0
        for k in names:
            if shards[-1] and size + nbytes[k] > limit:
                shards, size = shards + [[]], 0
            shards[-1].append(k)
            size += nbytes[k]
        return shards
    limit = next(a for a in sorted({nbytes[x] + nbytes[y] for x, y in zip(names, names[1:])})
                 if any(sum(nbytes[k] for k in sh) == a for sh in greedy(a)[1:]))
    hf.save_hf_dir(tmp_path / "later", BASE, sd, max_shard_bytes=limit)
    index = json.loads((tmp_path / "later" / "model.safetensors.index.json").read_text())
    expect = greedy(limit)
    assert [sorted(k for k, f in index["weight_map"].items() if f.startswith(f"model-{i + 1:05d}-"))
            for i in range(len(expect))] == [sorted(sh) for sh in expect]
    hf.save_hf_dir(tmp_path / "two", BASE, sd, max_shard_bytes=sum(nbytes.values()) - 1)
    index = json.loads((tmp_path / "two" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                          "model-00002-of-00002.safetensors"]
    assert [k for k, f in index["weight_map"].items() if f.startswith("model-00002-")] == [names[-1]]
    hf.save_hf_dir(tmp_path / "one", BASE, sd)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["config.json", "generation_config.json",
                                                                     "model.safetensors"]
    with safe_open(str(tmp_path / "one" / "model.safetensors"), "pt") as fh:
        assert sorted(fh.keys()) == names


def test_export_builds_in_a_hidden_sibling_and_cleans_up_on_failure(tmp_path, monkeypatch):
    """The export is assembled in `.NAME.tmp-*` next to the target (so the final rename stays on one
    filesystem) and removed if anything fails, leaving no target behind."""
    import os
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (seen.append((src, dst)), real_replace(src, dst)))
    hf.save_hf_dir(tmp_path / "out", BASE, BASE.build().state_dict())
    (src, dst), = seen
    assert src.parent == tmp_path and src.name.startswith(".out.tmp-") and dst == tmp_path / "out"

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        hf.save_hf_dir(tmp_path / "failed", BASE, BASE.build().state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]        # no target, no temporary left


def test_state_dict_round_trip_without_shared_experts_is_exact():
    """n_shared_experts=0: the zero-sized shared experts written for transformers are dropped again
    on import, and every other tensor comes back bit-exact under its own name."""
    cfg = CONFIGS["no shared expert, top-3 of 8, 4 groups"]
    native = cfg.build(seed=2).state_dict()
    hf_sd = hf.to_hf_state_dict(native, cfg)
    assert any("shared_experts" in k and v.numel() == 0 for k, v in hf_sd.items())
    back = hf.from_hf_state_dict(hf_sd, cfg)
    assert set(back) == set(native) and all(torch.equal(back[k], native[k]) for k in native)


def test_bad_hf_state_dicts_are_named_errors():
    """Unknown tensors, a main-model tensor at layer index L (an MTP layer), and missing or
    incomplete experts each give HFConversionError naming them, never a KeyError or TypeError."""
    sd = hf.to_hf_state_dict(BASE.build().state_dict(), BASE)
    L = BASE.num_hidden_layers
    for extra, message in (({"lm_head.bias": torch.zeros(2)}, r"cannot place.*'lm_head\.bias'"),
                           ({"model.layers.0.mlp.foo.weight": torch.zeros(2)}, r"cannot place.*mlp\.foo"),
                           ({f"model.layers.{L}.input_layernorm.weight": torch.zeros(2)},
                            rf"multi-token-prediction layer\(s\) \[{L}\]")):
        with pytest.raises(hf.HFConversionError, match=message):
            hf.from_hf_state_dict({**sd, **extra}, BASE)
    i = BASE.moe_layer_indices[0]
    for drop, message in ((f"model.layers.{i}.mlp.experts.3.up_proj.weight", r"expert\(s\) \[3\] are missing or incomplete"),
                          (f"model.layers.{i}.mlp.experts.1.", r"expert\(s\) \[1\] are missing")):
        with pytest.raises(hf.HFConversionError, match=message):
            hf.from_hf_state_dict({k: v for k, v in sd.items() if not k.startswith(drop)}, BASE)


def test_native_state_dict_export_checks():
    """Export refuses MTP modules unless drop_mtp (the default is to refuse, in every entry point),
    refuses native tensors without a counterpart, leaves lm_head out when tied, and to_hf_config
    checks the state dict it is given."""
    mtp = variant(num_nextn_predict_layers=1)
    sd = mtp.build().state_dict()
    for call in (lambda: hf.check_exportable(mtp), lambda: hf.to_hf_config(mtp), lambda: hf.to_hf_state_dict(sd, mtp)):
        with pytest.raises(hf.HFConversionError, match="drop-mtp"):
            call()
    assert not any(k.startswith("mtp") for k in hf.to_hf_state_dict(sd, mtp, drop_mtp=True))
    with pytest.raises(hf.HFConversionError, match=r"no transformers counterpart: \['stray'\]"):
        hf.to_hf_state_dict({**BASE.build().state_dict(), "stray": torch.zeros(1)}, BASE)
    tied = CONFIGS["tied embeddings"]
    assert "lm_head.weight" not in hf.to_hf_state_dict(tied.build().state_dict(), tied)
    soft = variant(scoring_func="softmax", norm_topk_prob=False, n_group=1, topk_group=1)
    model = soft.build()
    next(r for _, r in model.routers()).e_score_correction_bias[0] = 0.1
    with pytest.raises(hf.HFConversionError, match="selection bias"):
        hf.to_hf_config(soft, model.state_dict())


def test_yarn_export_keeps_rope_theta():
    cfg = variant(rope_theta=50000.0, rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=64))
    assert hf.to_hf_config(cfg).rope_parameters["rope_theta"] == 50000.0
    assert hf.from_hf_config(hf.to_hf_config(cfg).to_dict()).rope_theta == 50000.0
