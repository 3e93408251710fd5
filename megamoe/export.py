"""Convert megamoe checkpoints to and from Hugging Face transformers (`deepseek_v3`, `deepseek_v2`).

To HF: the checkpoint is consolidated into one fp32 native state dict (megamoe.checkpoint.
consolidate, any ZeRO stage and EP size), mapped to transformers' names (megamoe.hf) and written
with its tokenizer. From HF: `convert_from_hf` writes the other kind of megamoe checkpoint, a
*weights-only* one: `DIR/global_step0/model.safetensors` (native names, fp32) +
`megamoe_state.json` with `weights_only: true` + `DIR/latest`. It holds no optimizer or engine
state, so it loads at any ZeRO stage / EP size / world size: the trainer loads it into the model
before deepspeed.initialize and starts a fresh optimizer at step 0.
Both directions write into a temporary sibling and rename at the end: on any error nothing exists
at the output.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch

from megamoe.checkpoint import (WEIGHTS_FILE, CheckpointError, TrainerState, check_state_dict,
                                load_native_state_dict, locate_checkpoint, tag_for, write_latest)
from megamoe.checkpoint.format import publish, refuse_nonempty, stage_dir
from megamoe.config import ModelConfig


# ----------------------------------------------------------------------------------------------
# megamoe -> Hugging Face
# ----------------------------------------------------------------------------------------------
def _dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype {name!r}: use float32 or bfloat16")
    return table[name]


def convert_to_hf(checkpoint, output, tag: Optional[str] = None, dtype="float32",
                  max_shard_bytes: int = 5 * 1024**3, tokenizer: Optional[str] = "auto",
                  drop_mtp: bool = False, trust: bool = False) -> Path:
    """Write a transformers `deepseek_v3` (or `deepseek_v2`) directory from a megamoe checkpoint.

    Weights come from the fp32 master copies, cast to `dtype` (the routing bias stays fp32).
    `tokenizer`: "auto" = the checkpoint's megamoe_state.json "tokenizer", None = none, or a path.
    Everything is written to a temporary sibling and renamed at the end: on any error nothing
    exists at `output`. Raises CheckpointError / HFConversionError / FileExistsError.
    A model trained with multi-token-prediction modules exports only with `drop_mtp=True`
    (transformers has no place for them; they leave the main model's logits unchanged).
    `trust`: unpickle checkpoint files that name classes beyond DeepSpeed's (checkpoint/pickles.py).
    """
    from megamoe.hf import check_exportable, save_hf_dir
    from megamoe.tokenizer_export import export_tokenizer

    refuse_nonempty(output)
    ck = locate_checkpoint(checkpoint, tag)
    check_exportable(ck.config, drop_mtp=drop_mtp)  # refuse before the (slow) reconstruction
    sd, ck = load_native_state_dict(checkpoint, tag, trust=trust)
    check_exportable(ck.config, sd, drop_mtp=drop_mtp)
    tok_path = ck.tokenizer if tokenizer == "auto" else tokenizer
    tmp, stage = stage_dir(output)
    try:
        save_hf_dir(stage, ck.config, sd, dtype=_dtype(dtype), max_shard_bytes=max_shard_bytes, drop_mtp=drop_mtp)
        if tok_path:
            export_tokenizer(tok_path, stage, ck.config)
        else:
            warnings.warn(f"{ck.path}: the checkpoint names no tokenizer; the export has none "
                          "(pass --tokenizer PATH to include one)")
        (stage / "README.md").write_text(model_card(ck, _dtype(dtype), drop_mtp))
        (stage / "megamoe_export.json").write_text(json.dumps({
            "source": str(ck.path.resolve()), "tag": ck.tag, "step": ck.state.step,
            "dtype": str(_dtype(dtype)).replace("torch.", ""), "reconstruction": ck.extra.get("reconstruction"),
            "tokenizer": tok_path, "dropped_mtp_modules": ck.config.num_nextn_predict_layers if drop_mtp else 0},
            indent=2) + "\n")
        publish(stage, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Path(output)


def model_card(ck, dtype: torch.dtype, drop_mtp: bool) -> str:
    """The export's README.md, from the checkpoint's own state: what the model is, what trained it,
    on what, for how long, to which losses."""
    cfg, st = ck.config, ck.state
    n = cfg.num_params()
    run = st.config or {}
    data, optim = run.get("data") or {}, run.get("optim") or {}
    seq = data.get("seq_length")
    tokens = st.consumed_samples * seq if seq else None

    def fmt(v, spec=""):
        return "unknown" if v is None else format(v, spec)
    routed = (f"{cfg.n_routed_experts} routed experts (top-{cfg.num_experts_per_tok}, {cfg.scoring_func}), "
              f"{cfg.n_shared_experts} shared, first {cfg.first_k_dense_replace} layer(s) dense"
              if cfg.n_routed_experts else "dense (no experts)")
    rows = [("architecture", f"DeepSeek-V3-style, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
                             f"{cfg.num_attention_heads} MLA heads, {routed}"),
            ("parameters", f"{n['total']:,} total, {n['active']:,} active per token"),
            ("vocabulary / context", f"{cfg.vocab_size} / {cfg.max_position_embeddings}"),
            ("trained for", f"{st.step} steps, {fmt(tokens, ',')} tokens ({st.consumed_samples:,} samples of "
                            f"{fmt(seq)} tokens)"),
            ("data (--data-path)", " ".join(map(str, data.get("data_path") or [])) or "unknown"),
            ("optimizer", f"{fmt(optim.get('optimizer'))}, peak lr {fmt(optim.get('lr'))}, "
                          f"{fmt(optim.get('lr_decay_style'))} decay"),
            ("final train loss", fmt(st.train_loss, ".4f")), ("final validation loss", fmt(st.val_loss, ".4f")),
            ("tokenizer", str(st.tokenizer or "none")),
            ("weights", f"{str(dtype).replace('torch.', '')} from the fp32 masters of {ck.path.name}"
                        + (f"; {cfg.num_nextn_predict_layers} MTP module(s) left out" if drop_mtp else "")),
            ("megamoe", fmt(st.megamoe_version))]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    command = " ".join(st.command) if st.command else "unknown"
    return (f"---\nlibrary_name: transformers\ntags: [megamoe, deepseek_v3, moe]\n---\n\n"
            f"# {ck.path.parent.name or 'megamoe model'}\n\n"
            f"Trained with megamoe and exported by `convert_to_hf`; every number below comes from the "
            f"checkpoint's `megamoe_state.json`.\n\n| | |\n|---|---|\n{table}\n\n"
            f"Training command:\n\n```\n{command}\n```\n")


# ----------------------------------------------------------------------------------------------
# Hugging Face -> megamoe
# ----------------------------------------------------------------------------------------------
def read_hf_dir(hf_dir) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """ModelConfig + native state dict of a transformers deepseek_v3 / deepseek_v2 directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from megamoe.hf import from_hf_config, from_hf_state_dict

    hf_dir = Path(hf_dir)
    cfg_file = hf_dir / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{cfg_file} is missing: {hf_dir} is not a Hugging Face model directory")
    try:
        hf_cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    cfg = from_hf_config(hf_cfg)
    index = hf_dir / "model.safetensors.index.json"
    if (hf_dir / "model.safetensors").exists():
        files = [hf_dir / "model.safetensors"]
    elif index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [hf_dir / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that do not exist: {missing[:4]}")
    else:
        bins = list(hf_dir.glob("*.bin"))
        raise CheckpointError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json"
                              + ("; only PyTorch .bin weights, re-save with safe_serialization" if bins else ""))
    hf_sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            hf_sd.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {f}: {e}; the file is truncated or damaged") from None
    sd = from_hf_state_dict(hf_sd, cfg)
    check_state_dict(sd, cfg, str(hf_dir))
    return cfg, sd


def _hf_tokenizer_files(hf_dir: Path) -> list[Path]:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")
    return [hf_dir / n for n in names if (hf_dir / n).exists()]


def convert_from_hf(hf_dir, output, dtype="float32") -> Path:
    """A transformers deepseek_v3/v2 directory -> a weights-only megamoe checkpoint at `output`:
    `output/latest` ("global_step0"), `output/global_step0/{model.safetensors, megamoe_state.json}`
    and `output/tokenizer/` (the HF tokenizer files, if any). Atomic; refuses a non-empty output."""
    from safetensors.torch import save_file

    hf_dir, output = Path(hf_dir), Path(output)
    refuse_nonempty(output)
    cfg, sd = read_hf_dir(hf_dir)
    dt = _dtype(dtype)
    sd = {k: (v.float() if k.endswith("e_score_correction_bias") else v.to(dt)).contiguous() for k, v in sd.items()}
    tmp, stage = stage_dir(output)
    try:
        tag_dir = stage / tag_for(0)
        tag_dir.mkdir(parents=True)
        save_file(sd, str(tag_dir / WEIGHTS_FILE), metadata={"format": "pt", "source": str(hf_dir.resolve())})
        tok_files = _hf_tokenizer_files(hf_dir)
        tok_ref = None
        if tok_files:
            (stage / "tokenizer").mkdir()
            for f in tok_files:
                shutil.copy2(f, stage / "tokenizer" / f.name)
            # megamoe.data.load_tokenizer reads tokenizer.json, else the sentencepiece model
            main = "tokenizer.json" if (stage / "tokenizer" / "tokenizer.json").exists() else "tokenizer.model"
            if (stage / "tokenizer" / main).exists():
                tok_ref = str((output / "tokenizer" / main).resolve())
        else:
            warnings.warn(f"{hf_dir} has no tokenizer files; the checkpoint records tokenizer=null")
        TrainerState(step=0, model_config=cfg.to_dict(), tokenizer=tok_ref, weights_only=True,
                     converted_from=str(hf_dir.resolve()), reason=f"HF import ({str(dt).replace('torch.', '')})"
                     ).write(tag_dir)
        write_latest(stage, tag_for(0))
        publish(stage, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def is_hf_dir(path) -> bool:
    p = Path(path) / "config.json"
    if not p.exists():
        return False
    try:
        return json.loads(p.read_text()).get("model_type") in ("deepseek_v3", "deepseek_v2")
    except (json.JSONDecodeError, AttributeError):
        return False
