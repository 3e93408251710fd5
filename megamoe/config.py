"""ModelConfig: the one schema for a megamoe model.

Field names follow transformers' `DeepseekV3Config` wherever the concept is the same, so the
Hugging Face adapter (megamoe/hf.py) is a rename-free copy and users of DeepSeek checkpoints
recognise every knob. Fields that HF does not have (aux-loss coefficients, bias update rate,
scoring function choice, attention backend) are training-side knobs of the same model.

Configs load from a preset name (`megamoe/presets/<name>.json`), a .json or .yaml file, or a
dict; `validate()` rejects inconsistent values with a message naming the field.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

PRESET_DIR = Path(__file__).parent / "presets"

SCORING_FUNCS = ("softmax", "sigmoid")
ATTENTION_BACKENDS = ("auto", "fa3", "flash", "sdpa", "eager")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and what to do."""


_SCALARS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _type_mismatch(value: Any, hint: Any) -> Optional[str]:
    """What a scalar field wants when `value` is not it (None when it fits, or the field is not a
    scalar): "96=" for an int from a typo, or true for an int, must not reach validate() as is."""
    if typing.get_origin(hint) is typing.Union:          # Optional[X]
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint not in _SCALARS:
        return None
    if isinstance(value, bool) != (hint is bool):
        return _SCALARS[hint]
    fits = isinstance(value, (int, float)) if hint is float else isinstance(value, hint)
    return None if fits else _SCALARS[hint]


@dataclass
class RopeScaling:
    """YaRN context extension, DeepSeek-V3 / transformers semantics.

    cos/sin are multiplied by `attention_factor`, or when that is None by
    get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim); the softmax scale by
    get_mscale(factor, mscale_all_dim)**2 (1 when mscale_all_dim is 0). With mscale ==
    mscale_all_dim (DeepSeek's released configs) this is exactly DeepSeek's reference
    implementation; `attention_factor` carries transformers' explicit or inferred value for
    configs that leave mscale out.
    """
    type: str = "yarn"
    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    attention_factor: Optional[float] = None


@dataclass
class ModelConfig:
    # --- sizes -------------------------------------------------------------------------------
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 688          # dense FFN (first_k_dense_replace layers, dense models)
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 2048
    # --- Multi-head Latent Attention -------------------------------------------------------
    q_lora_rank: Optional[int] = None     # None: plain q projection; else low-rank q with RMSNorm
    kv_lora_rank: int = 64                # the latent that the KV cache stores
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16            # decoupled rope key, shared by all heads
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    rope_interleave: bool = True          # DeepSeek's interleaved pairs (x0,x1),(x2,x3),...
    rope_scaling: Optional[RopeScaling] = None
    attention_backend: str = "auto"       # auto: FlashAttention-3, then -2, where usable, else PyTorch SDPA
    # --- Mixture of Experts ------------------------------------------------------------------
    n_routed_experts: int = 0             # 0: dense model (every layer a SwiGLU MLP)
    n_shared_experts: int = 0
    num_experts_per_tok: int = 2          # top-k
    moe_intermediate_size: int = 128      # per expert (shared experts: times n_shared_experts)
    first_k_dense_replace: int = 0        # the first k layers stay dense
    scoring_func: str = "sigmoid"         # sigmoid (DeepSeek-V3) or softmax (V2, Mixtral)
    n_group: int = 1                      # group-limited routing: n_group groups ...
    topk_group: int = 1                   # ... of which topk_group are kept (top-2-sum score)
    norm_topk_prob: bool = True           # renormalise the k selected weights to sum 1
    routed_scaling_factor: float = 1.0
    # --- load balancing and router regularisation (training-side) ----------------------------
    aux_loss_alpha: float = 0.0           # DeepSeek-V3 sequence-wise balance loss coefficient
    router_z_loss_coef: float = 0.0       # ST-MoE router z-loss coefficient
    bias_update_rate: float = 0.001       # aux-loss-free balancing: gamma of DeepSeek-V3 (0 = off)
    router_jitter_noise: float = 0.0      # training only: router input times U(1-eps, 1+eps) (Switch)
    capacity_factor: Optional[float] = None  # None: dropless; else per-expert capacity
                                          # ceil(factor * tokens * top_k / n_experts), lowest scores dropped
    # --- misc --------------------------------------------------------------------------------
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    num_nextn_predict_layers: int = 0     # DeepSeek-V3 multi-token prediction depth (0 = off)
    mtp_loss_weight: float = 0.3          # lambda of the MTP loss (averaged over the depths)
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    pad_token_id: Optional[int] = None

    # ------------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.is_moe and layer_idx >= self.first_k_dense_replace

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    # ------------------------------------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        def bad(field_name: str, msg: str):
            raise ConfigError(f"ModelConfig.{field_name}: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(name, f"must be a positive integer, got {getattr(self, name)!r}")
        if self.qk_nope_head_dim < 0:
            bad("qk_nope_head_dim", f"must be >= 0, got {self.qk_nope_head_dim}")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", f"RoPE rotates pairs, so it must be even, got {self.qk_rope_head_dim}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            bad("q_lora_rank", f"must be a positive integer or null (no q compression), got {self.q_lora_rank}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            bad("attention_backend", f"must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.intermediate_size <= 0 and (not self.is_moe or self.first_k_dense_replace > 0):
            bad("intermediate_size", "dense layers need a positive intermediate_size")
        if self.rms_norm_eps <= 0:
            bad("rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
        if self.n_routed_experts < 0:
            bad("n_routed_experts", f"must be >= 0 (0 = dense model), got {self.n_routed_experts}")
        if self.is_moe:
            E = self.n_routed_experts
            if self.scoring_func not in SCORING_FUNCS:
                bad("scoring_func", f"must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
            if not 1 <= self.num_experts_per_tok <= E:
                bad("num_experts_per_tok", f"top-k must be in [1, n_routed_experts={E}], got {self.num_experts_per_tok}")
            if self.moe_intermediate_size <= 0:
                bad("moe_intermediate_size", f"must be positive, got {self.moe_intermediate_size}")
            if self.n_shared_experts < 0:
                bad("n_shared_experts", f"must be >= 0, got {self.n_shared_experts}")
            if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
                bad("first_k_dense_replace", f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
            if self.n_group < 1 or E % self.n_group:
                bad("n_group", f"must divide n_routed_experts={E}, got {self.n_group}")
            if not 1 <= self.topk_group <= self.n_group:
                bad("topk_group", f"must be in [1, n_group={self.n_group}], got {self.topk_group}")
            if self.n_group > 1:
                per_group = E // self.n_group
                if per_group < 2:
                    bad("n_group", f"group scores sum each group's top-2 experts, so each group needs >= 2 "
                                   f"experts; {E} experts in {self.n_group} groups gives {per_group}")
                if self.topk_group * per_group < self.num_experts_per_tok:
                    bad("topk_group", f"the {self.topk_group} kept groups hold {self.topk_group * per_group} "
                                      f"experts, fewer than num_experts_per_tok={self.num_experts_per_tok}")
            if self.routed_scaling_factor <= 0:
                bad("routed_scaling_factor", f"must be > 0, got {self.routed_scaling_factor}")
            for name in ("aux_loss_alpha", "router_z_loss_coef", "bias_update_rate"):
                if getattr(self, name) < 0:
                    bad(name, f"must be >= 0, got {getattr(self, name)}")
            if not 0 <= self.router_jitter_noise < 1:
                bad("router_jitter_noise", f"must be in [0, 1), got {self.router_jitter_noise}")
            if self.capacity_factor is not None and self.capacity_factor <= 0:
                bad("capacity_factor", f"must be > 0 or null (dropless), got {self.capacity_factor}")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if rs.type != "yarn":
                bad("rope_scaling.type", f"only 'yarn' is supported, got {rs.type!r}")
            if rs.factor < 1:
                bad("rope_scaling.factor", f"must be >= 1, got {rs.factor}")
            if rs.original_max_position_embeddings <= 0:
                bad("rope_scaling.original_max_position_embeddings", "must be positive")
        if self.num_nextn_predict_layers < 0:
            bad("num_nextn_predict_layers", f"must be >= 0, got {self.num_nextn_predict_layers}")
        if self.mtp_loss_weight < 0:
            bad("mtp_loss_weight", f"must be >= 0, got {self.mtp_loss_weight}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < self.vocab_size:
                bad(name, f"{v} is outside the vocabulary [0, {self.vocab_size})")
        return self

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - known.keys())
        if unknown:
            raise ConfigError(f"{source}: unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}")
        d = dict(d)
        hints = typing.get_type_hints(cls)
        for name, value in d.items():
            if (wrong := _type_mismatch(value, hints[name])) is not None:
                raise ConfigError(f"{source}: ModelConfig.{name} must be {wrong}, not {value!r} "
                                  f"(its default: {known[name].default!r})")
        if isinstance(d.get("rope_scaling"), dict):
            rs_known = {f.name for f in fields(RopeScaling)}
            rs_unknown = sorted(set(d["rope_scaling"]) - rs_known)
            if rs_unknown:
                raise ConfigError(f"{source}: unknown rope_scaling field(s) {rs_unknown}; known: {sorted(rs_known)}")
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d).validate()

    @classmethod
    def load(cls, name_or_path: str | Path, **overrides: Any) -> "ModelConfig":
        """A preset name (see `list_presets()`), or a .json / .yaml file; then field overrides."""
        path = Path(name_or_path)
        if path.suffix in (".json", ".yaml", ".yml"):
            if not path.exists():
                raise ConfigError(f"model config file {path} does not exist")
            text = path.read_text()
            if path.suffix == ".json":
                try:
                    d = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
            else:
                import yaml
                d = yaml.safe_load(text)
            if not isinstance(d, dict):
                raise ConfigError(f"{path}: expected a mapping of ModelConfig fields")
            source = str(path)
        else:
            preset = PRESET_DIR / f"{name_or_path}.json"
            if not preset.exists():
                raise ConfigError(f"unknown model preset {str(name_or_path)!r}; presets: {list_presets()}, "
                                  "or give a .json/.yaml file")
            d = json.loads(preset.read_text())
            source = f"preset {name_or_path}"
        d.update(overrides)
        return cls.from_dict(d, source=source)

    # ------------------------------------------------------------------------------------------
    def build(self, seed: int = 0, device=None, dtype=None, defer_experts_of: Optional[str] = None,
              partition=None):
        """The causal LM for this config, built on the meta device and materialised on `device`
        (default CPU; "meta": shapes only) with initial values that depend on `seed` and each
        parameter's name alone (megamoe.model.init). `defer_experts_of`, `partition`: see
        `materialize`; megamoe.parallel.build uses them to build only what a rank keeps."""
        import torch

        from megamoe.model.init import build_on_meta, materialize
        model = build_on_meta(self)
        if device is not None and torch.device(device).type == "meta":
            return model
        return materialize(model, seed, device or "cpu", dtype, defer_experts_of, partition)

    def num_params(self) -> dict[str, int]:
        """Total and active (per token) parameter counts, from the shapes alone; `norm`: the norm
        weights among the active ones, `mtp_matmul`: the matmul weights an MTP depth applies per
        token (its eh_proj, block and the shared LM head; not in `active`, which is the inference model)."""
        H, h = self.hidden_size, self.num_attention_heads
        attn_norms = (self.q_lora_rank or 0) + self.kv_lora_rank      # q_a_norm, kv_a_norm
        if self.q_lora_rank is None:
            attn = H * h * self.qk_head_dim
        else:
            attn = H * self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim
        attn += H * (self.kv_lora_rank + self.qk_rope_head_dim)
        attn += self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
        attn += h * self.v_head_dim * H + attn_norms
        dense_mlp = 3 * H * self.intermediate_size
        expert = 3 * H * self.moe_intermediate_size
        total = active = 0
        for i in range(self.num_hidden_layers):
            layer = attn + 2 * H
            if self.is_moe_layer(i):
                shared = self.n_shared_experts * expert
                router = self.n_routed_experts * H
                total += layer + shared + router + self.n_routed_experts * expert
                active += layer + shared + router + self.num_experts_per_tok * expert
            else:
                total += layer + dense_mlp
                active += layer + dense_mlp
        moe_active = (self.n_shared_experts * expert + self.n_routed_experts * H + self.num_experts_per_tok * expert
                      if self.is_moe else dense_mlp)
        mtp_matmul = self.num_nextn_predict_layers * (2 * H * H + attn - attn_norms + moe_active + self.vocab_size * H)
        for d in range(self.num_nextn_predict_layers):
            # enorm, hnorm, eh_proj [H, 2H], final norm, and one block (MoE if the model is)
            mtp = 3 * H + 2 * H * H + attn + 2 * H
            if self.is_moe:
                expert_total = self.n_routed_experts * expert
                mtp += self.n_shared_experts * expert + self.n_routed_experts * H
                total += mtp + expert_total
            else:
                total += mtp + dense_mlp
        embed = self.vocab_size * H
        head = 0 if self.tie_word_embeddings else self.vocab_size * H
        total += embed + head + H
        active += embed + head + H
        norm = self.num_hidden_layers * (2 * H + attn_norms) + H
        return {"total": total, "active": active, "embedding": embed, "norm": norm, "mtp_matmul": mtp_matmul}


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
