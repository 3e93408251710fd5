"""The one native <-> Hugging Face transformers adapter (config and state dict).

Target: `deepseek_v3` (DeepseekV3ForCausalLM) for sigmoid-scored models and dense models;
`deepseek_v2` for softmax-scored ones where it is exact. State dicts use the released DeepSeek
checkpoint layout (one tensor per expert: mlp.experts.{j}.{gate,up,down}_proj.weight), which is
what transformers writes with save_pretrained and what inference servers read; transformers'
in-memory fused layout (mlp.experts.gate_up_proj / down_proj) is accepted on input too.

No weight permutation is needed: q_b_proj rows are head-major [nope | rope], kv_a rows are
[latent | rope], kv_b rows head-major [k_nope | v] in both, and transformers' rope_interleave=True
rotates DeepSeek's interleaved pairs exactly as we do.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from megamoe.config import ModelConfig, RopeScaling, yarn_get_mscale


class HFConversionError(ValueError):
    """The model uses something the transformers model cannot represent (or the input is not ours)."""


# native suffix <-> HF suffix for everything that maps one to one
_ATTN = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
         "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
_LAYER_RENAMES = [("attn_norm.weight", "input_layernorm.weight"),
                  ("ffn_norm.weight", "post_attention_layernorm.weight")]
_LAYER_RENAMES += [(f"attn.{n}.weight", f"self_attn.{h}.weight") for n, h in _ATTN.items()]
_LAYER_RENAMES += [(f"ffn.{p}.weight", f"mlp.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")]
_LAYER_RENAMES += [(f"ffn.shared_experts.{p}.weight", f"mlp.shared_experts.{p}.weight")
                   for p in ("gate_proj", "up_proj", "down_proj")]
_LAYER_RENAMES += [("ffn.router.weight", "mlp.gate.weight"),
                   ("ffn.router.e_score_correction_bias", "mlp.gate.e_score_correction_bias")]
_TOP_RENAMES = [("embed_tokens.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"),
                ("lm_head.weight", "lm_head.weight")]


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
# Training-side fields transformers has no name for. They ride along in config.json under
# "megamoe" (transformers keeps unknown keys and ignores them), so HF -> megamoe -> HF and
# megamoe -> HF -> megamoe lose nothing; a config from elsewhere gets ModelConfig's defaults.
TRAINING_FIELDS = ("aux_loss_alpha", "router_z_loss_coef", "bias_update_rate", "router_jitter_noise",
                   "capacity_factor", "mtp_loss_weight", "attention_backend")

def hf_model_type(cfg: ModelConfig) -> str:
    return "deepseek_v2" if cfg.is_moe and cfg.scoring_func == "softmax" else "deepseek_v3"


def check_exportable(cfg: ModelConfig, state_dict: Mapping[str, torch.Tensor] | None = None,
                     drop_mtp: bool = False) -> str:
    """The HF model_type this model converts to exactly; HFConversionError naming what cannot.

    Multi-token-prediction modules are training-only and transformers has no place for them: they
    are refused unless `drop_mtp` says to leave them out (the main model's logits are unaffected)."""
    if cfg.num_nextn_predict_layers and not drop_mtp:
        raise HFConversionError(f"this model has {cfg.num_nextn_predict_layers} multi-token-prediction "
                                "module(s), which transformers cannot hold; they only add a training "
                                "loss, so export without them: --drop-mtp (drop_mtp=True)")
    model_type = hf_model_type(cfg)
    if model_type == "deepseek_v2":
        why = []
        if cfg.norm_topk_prob:
            why.append("norm_topk_prob=true (deepseek_v2 never renormalises the top-k weights)")
        if cfg.n_group > 1:
            why.append("group-limited routing (deepseek_v2 scores groups by their max, we by the top-2 sum)")
        if state_dict is not None:
            biased = [k for k, v in state_dict.items() if k.endswith("e_score_correction_bias") and v.abs().max() > 0]
            if biased:
                why.append(f"a non-zero selection bias (aux-loss-free balancing) in {biased[0]} "
                           "(deepseek_v2 has no bias)")
        if why:
            raise HFConversionError("softmax-scored MoE maps to transformers' deepseek_v2, which cannot express: "
                                    + "; ".join(why) + ". Use scoring_func='sigmoid' (deepseek_v3) for exportable "
                                    "models with these features.")
    return model_type


def to_hf_config(cfg: ModelConfig, state_dict: Mapping[str, torch.Tensor] | None = None, dtype: str = "float32",
                 drop_mtp: bool = False):
    """The transformers config (DeepseekV3Config or DeepseekV2Config) of an exportable model."""
    from transformers import DeepseekV2Config, DeepseekV3Config
    model_type = check_exportable(cfg, state_dict, drop_mtp)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": rs.factor,
                "original_max_position_embeddings": rs.original_max_position_embeddings,
                "beta_fast": rs.beta_fast, "beta_slow": rs.beta_slow,
                "mscale": rs.mscale, "mscale_all_dim": rs.mscale_all_dim}
        if rs.attention_factor is not None:
            rope["attention_factor"] = rs.attention_factor
    moe = cfg.is_moe
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=cfg.max_position_embeddings,
        q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        # a dense model is a deepseek model whose every layer is one of the first dense ones
        n_routed_experts=cfg.n_routed_experts if moe else 1,
        n_shared_experts=cfg.n_shared_experts if moe else 0,
        num_experts_per_tok=cfg.num_experts_per_tok if moe else 1,
        moe_intermediate_size=cfg.moe_intermediate_size,
        first_k_dense_replace=cfg.first_k_dense_replace if moe else cfg.num_hidden_layers,
        n_group=cfg.n_group if moe else 1, topk_group=cfg.topk_group if moe else 1,
        routed_scaling_factor=cfg.routed_scaling_factor,
        hidden_act="silu", rms_norm_eps=cfg.rms_norm_eps, initializer_range=cfg.initializer_range,
        tie_word_embeddings=cfg.tie_word_embeddings, rope_parameters=rope,
        attention_bias=False, attention_dropout=0.0,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        dtype=dtype,
    )
    if model_type == "deepseek_v3":
        hf = DeepseekV3Config(**common, norm_topk_prob=cfg.norm_topk_prob, rope_interleave=cfg.rope_interleave,
                              num_nextn_predict_layers=0)
    else:
        if not cfg.rope_interleave:
            raise HFConversionError("deepseek_v2 only implements interleaved rope; set rope_interleave=true")
        hf = DeepseekV2Config(**common, topk_method="greedy")
    hf.megamoe = {name: getattr(cfg, name) for name in TRAINING_FIELDS}
    hf.architectures = ["DeepseekV3ForCausalLM" if model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"]
    return hf


def from_hf_config(hf: Any) -> ModelConfig:
    """ModelConfig of a transformers deepseek_v3 / deepseek_v2 config (object or dict)."""
    model_type = hf.get("model_type") if isinstance(hf, dict) else hf.model_type
    if model_type not in ("deepseek_v3", "deepseek_v2"):
        raise HFConversionError(f"model_type {model_type!r} is not supported; expected deepseek_v3 or deepseek_v2")
    d = _as_transformers_reads(hf)
    # num_nextn_predict_layers is not read: transformers' model has no MTP layers either (its own
    # DeepseekV3Config defaults to 1), so a directory it wrote has none. MTP tensors that are
    # present (DeepSeek's model.layers.{L}.*) are refused by from_hf_state_dict.
    if d["attention_bias"]:
        raise HFConversionError("attention_bias=true is not supported by megamoe's MLA")
    if d["hidden_act"] != "silu":
        raise HFConversionError(f"hidden_act {d['hidden_act']!r} is not supported (SwiGLU with silu only)")
    rope = d["rope_parameters"]
    rope_type, theta = rope["rope_type"], rope["rope_theta"]
    rope_scaling = None
    if rope_type == "yarn":
        rope_scaling = _yarn_from_hf(rope)
    elif rope_type != "default":
        raise HFConversionError(f"rope type {rope_type!r} is not supported (default or yarn)")
    L = d["num_hidden_layers"]
    dense = d["first_k_dense_replace"] >= L
    if not dense and not d["num_experts_per_tok"]:   # DeepseekV2Config has no default for it
        raise HFConversionError(f"{model_type} config with MoE layers has no num_experts_per_tok")
    if model_type == "deepseek_v2":
        if d["topk_method"] != "greedy":
            raise HFConversionError(f"deepseek_v2 topk_method {d['topk_method']!r} (group max scoring) is not "
                                    "supported; only 'greedy'")
        scoring, norm_topk = "softmax", False
        n_group = topk_group = 1
    else:
        scoring, norm_topk = "sigmoid", bool(d["norm_topk_prob"])
        n_group, topk_group = d["n_group"], d["topk_group"]
        if n_group is None or topk_group is None:   # transformers' router cannot run it either
            raise HFConversionError("deepseek_v3 config with n_group / topk_group null; set both (1 and 1: no "
                                    "group-limited routing)")
    cfg = dict(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        num_hidden_layers=L, num_attention_heads=d["num_attention_heads"],
        max_position_embeddings=d["max_position_embeddings"], q_lora_rank=d["q_lora_rank"],
        kv_lora_rank=d["kv_lora_rank"], qk_nope_head_dim=d["qk_nope_head_dim"],
        qk_rope_head_dim=d["qk_rope_head_dim"], v_head_dim=d["v_head_dim"], rope_theta=theta,
        # deepseek_v2 has no rope_interleave field: it only rotates interleaved pairs
        rope_interleave=bool(d.get("rope_interleave", True)), rope_scaling=rope_scaling,
        n_routed_experts=0 if dense else d["n_routed_experts"],
        n_shared_experts=0 if dense else d["n_shared_experts"],
        num_experts_per_tok=d["num_experts_per_tok"] if not dense else 1, moe_intermediate_size=d["moe_intermediate_size"],
        first_k_dense_replace=0 if dense else d["first_k_dense_replace"],
        scoring_func=scoring, n_group=n_group, topk_group=topk_group, norm_topk_prob=norm_topk,
        routed_scaling_factor=d["routed_scaling_factor"], rms_norm_eps=d["rms_norm_eps"],
        tie_word_embeddings=bool(d["tie_word_embeddings"]), initializer_range=d["initializer_range"],
        bos_token_id=d["bos_token_id"], eos_token_id=_first(d["eos_token_id"]), pad_token_id=d["pad_token_id"],
    )
    training = d.get("megamoe") or {}
    cfg.update({k: v for k, v in training.items() if k in TRAINING_FIELDS})
    return ModelConfig(**cfg).validate()


def _as_transformers_reads(hf: Any) -> dict:
    """The config with every field transformers' model would use: a config.json dict goes through
    transformers' own config class, so a key the file leaves out takes transformers' default
    (DeepseekV3Config: routed_scaling_factor 2.5, first_k_dense_replace 3, n_group 8, q_lora_rank
    1536), not a guess of ours, and legacy spellings (rope_scaling, top-level rope_theta) are
    normalised the way transformers loads them."""
    if not isinstance(hf, dict):
        return hf.to_dict()
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig
    try:
        return AutoConfig.for_model(**hf).to_dict()
    except (KeyError, ValueError, TypeError, StrictDataclassError) as e:   # transformers refuses to load it
        raise HFConversionError(f"transformers cannot read this {hf['model_type']} config: {e}") from None


def _yarn_from_hf(rope: dict) -> RopeScaling:
    """transformers' YaRN parameters (modeling_rope_utils._compute_yarn_parameters and DeepSeek's
    yarn_apply_mscale), including configs that leave mscale / mscale_all_dim out."""
    if rope.get("truncate", True) is False:
        raise HFConversionError("YaRN with truncate=false is not supported (DeepSeek's YaRN rounds the "
                                "correction range)")
    original = rope["original_max_position_embeddings"]
    factor = rope["factor"]   # transformers requires it
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    attention_factor = rope.get("attention_factor")
    if attention_factor is None and not (mscale and mscale_all_dim):
        attention_factor = yarn_get_mscale(factor)  # transformers' rule when either is missing
    return RopeScaling(factor=factor, original_max_position_embeddings=original,
                       beta_fast=rope.get("beta_fast") or 32.0, beta_slow=rope.get("beta_slow") or 1.0,
                       mscale=mscale or 1.0, mscale_all_dim=mscale_all_dim or 0.0,  # 0: no softmax rescale
                       attention_factor=attention_factor)


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------------------------
# state dict
# ----------------------------------------------------------------------------------------------
def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig,
                     drop_mtp: bool = False) -> dict[str, torch.Tensor]:
    """Native -> HF (per-expert checkpoint layout). Every native tensor is used exactly once
    (MTP tensors are left out only with drop_mtp)."""
    check_exportable(cfg, state_dict, drop_mtp)
    out: dict[str, torch.Tensor] = {}
    used = {k for k in state_dict if k.startswith("mtp.")} if drop_mtp else set()
    for native, hf in _TOP_RENAMES:
        if native in state_dict:
            out[hf] = state_dict[native]
            used.add(native)
    for i in range(cfg.num_hidden_layers):
        pre, hpre = f"layers.{i}.", f"model.layers.{i}."
        for native, hf in _LAYER_RENAMES:
            if pre + native in state_dict:
                out[hpre + hf] = state_dict[pre + native]
                used.add(pre + native)
        if cfg.is_moe_layer(i):
            gate_up, down = state_dict[pre + "ffn.experts.gate_up_proj"], state_dict[pre + "ffn.experts.down_proj"]
            used.update({pre + "ffn.experts.gate_up_proj", pre + "ffn.experts.down_proj"})
            I = cfg.moe_intermediate_size
            for j in range(cfg.n_routed_experts):
                out[f"{hpre}mlp.experts.{j}.gate_proj.weight"] = gate_up[j, :I]
                out[f"{hpre}mlp.experts.{j}.up_proj.weight"] = gate_up[j, I:]
                out[f"{hpre}mlp.experts.{j}.down_proj.weight"] = down[j]
        if cfg.is_moe_layer(i) and cfg.n_shared_experts == 0:
            # transformers always builds shared experts; zero-sized ones make it a no-op, as ours
            H = cfg.hidden_size
            ref = state_dict[pre + "ffn.router.weight"]
            for p, shape in (("gate_proj", (0, H)), ("up_proj", (0, H)), ("down_proj", (H, 0))):
                out[f"{hpre}mlp.shared_experts.{p}.weight"] = ref.new_zeros(shape)
        if cfg.is_moe_layer(i) and hf_model_type(cfg) == "deepseek_v2":
            out.pop(hpre + "mlp.gate.e_score_correction_bias")  # checked zero above; v2 has none
    left = sorted(set(state_dict) - used)
    if left:
        raise HFConversionError(f"native tensors with no transformers counterpart: {left[:5]}"
                                f"{' ...' if len(left) > 5 else ''}")
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(hf_sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF (per-expert or fused experts) -> native. Unknown or missing tensors are errors."""
    inverse_top = {hf: n for n, hf in _TOP_RENAMES}
    inverse_layer = {hf: n for n, hf in _LAYER_RENAMES}
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    unknown = []
    expert_re = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
    fused_re = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
    layer_re = re.compile(r"model\.layers\.(\d+)\.(.+)")
    for k, v in hf_sd.items():
        if k in inverse_top:
            out[inverse_top[k]] = v
        elif m := expert_re.fullmatch(k):
            experts.setdefault((int(m[1]), int(m[2])), {})[m[3]] = v
        elif m := fused_re.fullmatch(k):
            out[f"layers.{m[1]}.ffn.experts.{m[2]}"] = v
        elif (m := layer_re.fullmatch(k)) and m[2] in inverse_layer:
            if m[2].startswith("mlp.shared_experts.") and cfg.n_shared_experts == 0 and v.numel() == 0:
                continue  # the zero-sized shared experts written for transformers
            if int(m[1]) >= cfg.num_hidden_layers:
                unknown.append(k)
            else:
                out[f"layers.{m[1]}.{inverse_layer[m[2]]}"] = v
        else:
            unknown.append(k)
    mtp = sorted({int(m[1]) for k in unknown if (m := layer_re.fullmatch(k)) and int(m[1]) >= cfg.num_hidden_layers})
    if mtp:
        raise HFConversionError(f"tensors of multi-token-prediction layer(s) {mtp} (model.layers.{mtp[0]}.*): "
                                "megamoe cannot import DeepSeek's MTP format; delete those tensors to import the "
                                "main model (transformers ignores them the same way)")
    if unknown:
        raise HFConversionError(f"tensors megamoe cannot place (a different architecture?): "
                                f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    for i in cfg.moe_layer_indices:
        if f"layers.{i}.ffn.experts.gate_up_proj" in out:
            continue
        per = [experts.get((i, j)) for j in range(cfg.n_routed_experts)]
        missing = [j for j, e in enumerate(per) if e is None or len(e) != 3]
        if missing:
            raise HFConversionError(f"layer {i}: expert(s) {missing[:8]} are missing or incomplete")
        out[f"layers.{i}.ffn.experts.gate_up_proj"] = torch.stack(
            [torch.cat([e["gate_proj"], e["up_proj"]], dim=0) for e in per])
        out[f"layers.{i}.ffn.experts.down_proj"] = torch.stack([e["down_proj"] for e in per])
    for i in cfg.moe_layer_indices:
        out.setdefault(f"layers.{i}.ffn.router.e_score_correction_bias",
                       torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]  # the model ties them; both names load
    return out


# ----------------------------------------------------------------------------------------------
# writing a transformers directory
# ----------------------------------------------------------------------------------------------
def save_hf_dir(out_dir, cfg: ModelConfig, state_dict: Mapping[str, torch.Tensor],
                dtype: torch.dtype = torch.float32, max_shard_bytes: int = 2 * 1024**3,
                drop_mtp: bool = False) -> None:
    """Write config.json, generation_config.json and sharded safetensors with an index.

    Everything is written into a temporary sibling directory that is renamed at the end, so an
    interrupted export never leaves a directory that looks complete. Refuses to overwrite.
    """
    import json
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new --output directory")
    hf_sd = to_hf_state_dict(state_dict, cfg, drop_mtp)
    hf_cfg = to_hf_config(cfg, state_dict, dtype=str(dtype).replace("torch.", ""), drop_mtp=drop_mtp)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        hf_cfg.save_pretrained(tmp)
        GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                         pad_token_id=cfg.pad_token_id).save_pretrained(tmp)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name in sorted(hf_sd):
            t = hf_sd[name]
            t = t.to(torch.float32) if name.endswith("e_score_correction_bias") else t.to(dtype)
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t.contiguous().clone()
            size += nbytes
        n = len(shards)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            for k, t in shard.items():
                weight_map[k] = fname
                total += t.numel() * t.element_size()
        if n > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
