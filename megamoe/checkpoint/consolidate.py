"""Rebuild one fp32 native state dict from a megamoe checkpoint, whatever ZeRO stage and EP size
wrote it; export (megamoe.export), generation and evaluation, and the trainer's weights-only
start all read checkpoints through `load_native_state_dict`.

Rebuilding the full model depends on how DeepSpeed sharded it, and DeepSpeed's own tools do the
un-sharding:

* no expert parallelism (dense models, MoE at ep 1), ZeRO 1/2/3: `deepspeed.utils.zero_to_fp32`
  merges the fp32 master partitions of the optimizer files.
* AutoEP (expert-parallel) checkpoints, ZeRO 1/2/3: zero_to_fp32 refuses them, so the checkpoint
  is first converted to DeepSpeed's *universal* format (`deepspeed.checkpoint.ds_to_universal`,
  into a temporary directory), whose `zero/<param>/fp32.pt` files hold every parameter's fp32
  master, experts stacked over all ranks ([E, I, H] w1/w3, [E, H, I] w2). Those are repacked into
  our fused layout by megamoe.parallel.expert.native_expert_state_dict (the one expert repack)
  and the router names AutoEP uses (`router.gate.weight`) mapped back to ours (`router.weight`).
* ZeRO-0 (no ZeRO): the module weights of `mp_rank_00_model_states.pt`.
* weights-only checkpoints (HF import): `model.safetensors`.

Optimizers other than Adam(W) (DeepSpeed's Muon: `ds_configs/muon.json`, `muonclip.json`):
DeepSpeed 0.19.8's ds_to_universal hard-codes Adam's moments (`state["exp_avg"]`,
`state["exp_avg_sq"]`) in its ZeRO-1/2 and ZeRO-3 extraction, its merges and its AutoEP expert
consolidation, and fails with `KeyError: 'exp_avg'` on a Muon checkpoint, whose Muon groups hold
a `momentum_buffer` instead. The fp32 master partitions it needs are there regardless of the
optimizer (`single_partition_of_fp32_groups` / `fp32_flat_groups`). For the export only the fp32
masters matter, so the conversion runs on an *Adam-shaped view* of the checkpoint
(`_adam_shaped_input`): a temporary directory that links every file except the optimizer
partitions, which are rewritten with each missing moment slot filled by a placeholder shaped as
DeepSpeed expects (the group's fp32 partition, plus its alignment padding at ZeRO-1/2). DeepSpeed's
own code then does all the un-sharding; the placeholder "moments" it writes are discarded with the
temporary directory and only `fp32.pt` is read. The result is the exact fp32 masters. (Such a
universal checkpoint is NOT a valid resume point: megamoe.checkpoint.universal refuses Muon.)

Buffers (the routers' `e_score_correction_bias`) are not optimizer state and come from the
model-state file. The result is checked against the shapes of a model built from the saved
ModelConfig: anything missing, extra or mis-shaped is an error naming the tensor.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from megamoe.checkpoint.pickles import deepspeed_classes_allowed, trusted, vet_dir
from megamoe.checkpoint.format import (STATE_FILE, WEIGHTS_FILE, CheckpointError, TrainerState, optimizer_kind,
                                       read_state, resolve_tag_dir)
from megamoe.config import ModelConfig
from megamoe.parallel.expert import native_expert_state_dict


@dataclass
class Checkpoint:
    """A located checkpoint: `path` is the tag directory, `state` its megamoe_state.json."""
    path: Path
    tag: str
    state: TrainerState
    config: ModelConfig
    weights_only: bool = False
    trust: bool = False     # --trust-checkpoint: unpickle whatever the files name (pickles.py)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer(self) -> Optional[str]:
        return self.state.tokenizer


# ----------------------------------------------------------------------------------------------
# locating a checkpoint
# ----------------------------------------------------------------------------------------------
def locate_checkpoint(path, tag: Optional[str] = None) -> Checkpoint:
    """SAVE_DIR (+ tag, default the one in SAVE_DIR/latest) or a tag directory itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; give the SAVE_DIR of a megamoe run")
    # a tag directory itself, or SAVE_DIR (+ tag, default the one `latest` names)
    tag_dir = path if tag is None and (path / STATE_FILE).exists() else resolve_tag_dir(path, tag)
    state = read_state(tag_dir)
    state_file = tag_dir / STATE_FILE
    try:
        cfg = ModelConfig.from_dict(state.model_config, source=str(state_file))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{state_file}: bad model_config: {e}") from None
    return Checkpoint(path=tag_dir, tag=tag_dir.name, state=state, config=cfg,
                      weights_only=state.weights_only)


# ----------------------------------------------------------------------------------------------
# expected tensors of a config
# ----------------------------------------------------------------------------------------------
def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Native state-dict names and shapes, from a model built on the meta device (no memory)."""
    model = cfg.build(device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> None:
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    bad = sorted(k for k in set(want) & set(sd) if tuple(sd[k].shape) != want[k])
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if extra:
        problems.append(f"unexpected tensor(s): {extra[:6]}{' ...' if len(extra) > 6 else ''}")
    if bad:
        problems.append("wrong shape: " + ", ".join(f"{k} {tuple(sd[k].shape)} (expected {want[k]})" for k in bad[:6]))
    if problems:
        raise CheckpointError(f"{source}: the weights do not match the model_config: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------
# rebuilding the fp32 state dict from DeepSpeed files
# ----------------------------------------------------------------------------------------------
def _torch_load(path, trust: bool = False) -> Any:
    """torch.load of a vetted file: tensors and DeepSpeed's checkpoint classes only, unless trusted."""
    try:
        if trusted(trust):
            return torch.load(path, map_location="cpu", weights_only=False)
        with deepspeed_classes_allowed():
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as e:  # truncated / corrupted zip or pickle
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {e}); the file is truncated or "
                              "damaged: use another checkpoint tag") from None


def _model_state_files(tag_dir: Path) -> list[Path]:
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt")) or sorted(tag_dir.glob("*zero_pp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{tag_dir} holds no DeepSpeed model-state file (mp_rank_00_model_states.pt or "
                              "zero_pp_rank_*_model_states.pt): not a DeepSpeed checkpoint or an incomplete copy")
    return files


def _preflight(ck: Checkpoint, model_state: dict) -> None:
    """Check that every file DeepSpeed will need exists and is readable, before converting."""
    tag_dir = ck.path
    dp = int(model_state.get("dp_world_size", 1))
    zero_stage = _zero_stage(ck)
    optim = sorted(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"))
    if zero_stage > 0 or optim:
        # ZeRO writes one optimizer partition per data-parallel rank
        ranks = {int(p.name.split("zero_pp_rank_")[1].split("_")[0]) for p in optim}
        missing = sorted(set(range(dp)) - ranks)
        if missing:
            raise CheckpointError(f"{tag_dir}: optimizer partition(s) of data-parallel rank(s) {missing} are missing "
                                  f"(expected zero_pp_rank_{{0..{dp - 1}}}_mp_rank_00_optim_states.pt); the checkpoint "
                                  "is incomplete")
        if zero_stage == 3:
            mranks = {int(p.name.split("zero_pp_rank_")[1].split("_")[0])
                      for p in tag_dir.glob("zero_pp_rank_*_model_states.pt")}
            missing = sorted(set(range(dp)) - mranks)
            if missing:
                raise CheckpointError(f"{tag_dir}: ZeRO-3 model-state file(s) of rank(s) {missing} are missing")
    for layer in model_state.get("ds_autoep_layers") or []:
        # ZeRO-1/2 AutoEP checkpoints hold one file per expert
        per_expert = list(tag_dir.glob(f"layer_{layer['moe_layer_id']}_expert_*_model_states.pt"))
        if zero_stage in (0, 1, 2) or per_expert:
            for e in range(layer["num_experts"]):
                f = tag_dir / f"layer_{layer['moe_layer_id']}_expert_{e}_mp_rank_00_model_states.pt"
                if not f.exists():
                    raise CheckpointError(f"{f} is missing: expert {e} of MoE layer {layer['module_path']} cannot be "
                                          "rebuilt; the checkpoint is incomplete")
    for f in sorted(tag_dir.glob("*.pt")):
        if f.stat().st_size == 0:
            raise CheckpointError(f"{f} is empty (truncated write); use another checkpoint tag")


def _run_quiet(fn, *args, what: str, **kwargs):
    """Run a DeepSpeed tool, keeping its progress prints for the error message only."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    except CheckpointError:
        raise
    except Exception as e:
        tail = "\n".join(buf.getvalue().strip().splitlines()[-8:])
        raise CheckpointError(f"{what} failed: {type(e).__name__}: {e}"
                              + (f"\n--- DeepSpeed output ---\n{tail}" if tail else "")) from e


ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")   # what ds_to_universal reads from every optimizer group
# (+ "step", which its AutoEP expert consolidation requires)


def _zero_stage(ck: Checkpoint) -> int:
    return -1 if ck.state.zero_stage is None else int(ck.state.zero_stage)


def _group_states(osd: dict) -> tuple[list, list[torch.Tensor], list[int]]:
    """(per-group optimizer-state dicts, fp32 master partitions, alignment paddings) of one rank's
    `optimizer_state_dict`, ZeRO-1/2 or ZeRO-3 layout; the state dicts are the checkpoint's own
    (mutable) objects, created empty where a group has no state yet."""
    if "single_partition_of_fp32_groups" in osd:            # ZeRO-1/2
        fp32 = osd["single_partition_of_fp32_groups"]
        base = osd["base_optimizer_state"]
        # saved without padding; DeepSpeed's reader strips `group_paddings` from the moments
        paddings = [int(x) for x in osd.get("group_paddings") or [0] * len(fp32)]
        if isinstance(base, list):                           # elastic layout: one state per group
            states = base
        else:
            states = [base["state"].setdefault(g, {}) for g in range(len(fp32))]
        return states, fp32, paddings
    if "fp32_flat_groups" in osd:                             # ZeRO-3
        fp32 = osd["fp32_flat_groups"]
        state = osd["optimizer_state_dict"]["state"]
        return [state.setdefault(g, {}) for g in range(len(fp32))], fp32, [0] * len(fp32)
    raise CheckpointError("unknown ZeRO optimizer-state layout (neither single_partition_of_fp32_groups nor "
                          f"fp32_flat_groups; keys {sorted(osd)[:8]})")


def _adam_shaped_input(tag_dir: Path, work_dir: Path, step: int, trust: bool = False) -> tuple[Path, int]:
    """A view of `tag_dir` that ds_to_universal can read whatever the optimizer (see the module
    docstring): every file linked, the `*_optim_states.pt` rewritten with each group's missing
    exp_avg / exp_avg_sq set to one placeholder tensor shaped like the moment DeepSpeed expects
    (and a missing "step" to the checkpoint's global step, as Adam records it).
    The fp32 partitions are untouched. Returns (directory, number of groups given placeholders)."""
    view = work_dir / "input" / tag_dir.name
    view.mkdir(parents=True)
    filled = 0
    for f in sorted(tag_dir.iterdir()):
        if not f.name.endswith("_optim_states.pt"):
            os.symlink(f.resolve(), view / f.name)
            continue
        sd = _torch_load(f, trust)
        osd = sd.get("optimizer_state_dict")
        if not isinstance(osd, dict):
            raise CheckpointError(f"{f} has no optimizer_state_dict: not a DeepSpeed ZeRO optimizer partition")
        try:
            states, fp32, paddings = _group_states(osd)
        except CheckpointError as e:
            raise CheckpointError(f"{f}: {e}") from None
        for st, master, pad in zip(states, fp32, paddings):
            if all(k in st for k in ADAM_MOMENTS):
                continue
            # one tensor for both slots (torch.save stores it once); never read back
            placeholder = torch.cat([master.detach(), master.new_zeros(pad)]) if pad else master.detach()
            st.pop("momentum_buffer", None)   # Muon's momentum: not needed for the export, saves disk
            for k in ADAM_MOMENTS:
                st.setdefault(k, placeholder)
            st.setdefault("step", torch.tensor(float(step)))
            filled += 1
        torch.save(sd, view / f.name)
        del sd, osd, states, fp32
    return view, filled


def _from_universal(ck: Checkpoint, model_state: dict, work_dir: Path) -> dict[str, torch.Tensor]:
    """AutoEP checkpoints: DeepSpeed universal conversion, then our names and fused layout."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    src = ck.path
    optimizer = optimizer_kind(model_state.get("ds_config"))
    if optimizer not in ("adam", "adamw"):
        # Muon (or any optimizer without Adam's moments): DeepSpeed's converter on an Adam-shaped view
        src, filled = _adam_shaped_input(ck.path, work_dir, int(model_state.get("global_steps") or 0), ck.trust)
        ck.extra["placeholder_moment_groups"] = filled
    out = work_dir / ck.tag
    args = Namespace(input_folder=str(src), output_folder=str(out), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    _run_quiet(ds_to_universal.main, args, what=f"DeepSpeed universal conversion of {ck.path}"
               + (f" (optimizer {optimizer!r}, Adam-shaped view {src})" if src != ck.path else ""))
    zero_dir = out / "zero"
    raw: dict[str, torch.Tensor] = {}
    for d in sorted(zero_dir.iterdir()):
        f = d / "fp32.pt"
        if d.is_dir() and f.exists():
            obj = _torch_load(f)   # {"param": t, ...} (ZeRO-1/2, experts) or a bare tensor (ZeRO-3)
            raw[d.name] = obj["param"] if isinstance(obj, dict) else obj
    # ZeRO-3 universal files hold non-expert parameters flattened: restore the saved shapes
    shapes = model_state.get("param_shapes") or []
    ds_shapes = {k: tuple(v) for group in (shapes if isinstance(shapes, list) else [shapes]) for k, v in group.items()}
    for name, t in raw.items():
        shape = ds_shapes.get(name)
        if shape is not None and t.dim() == 1 and tuple(t.shape) != shape:  # experts: local shapes, skip
            if t.numel() != torch.Size(shape).numel():
                raise CheckpointError(f"{ck.path}: universal tensor {name} has {t.numel()} elements, the "
                                      f"checkpoint's param_shapes say {shape}")
            raw[name] = t.view(shape)
    # AutoEP's TokenChoiceTopKRouter keeps the router weight at router.gate.weight
    raw = {k.replace(".router.gate.weight", ".router.weight"): t for k, t in raw.items()}
    try:
        return native_expert_state_dict(raw)   # experts.w1/w3/w2 -> gate_up_proj / down_proj
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{ck.path}: universal conversion produced incomplete expert weights: "
                              f"{e.args[0]}") from None


def _from_zero_to_fp32(ck: Checkpoint) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return _run_quiet(get_fp32_state_dict_from_zero_checkpoint, str(ck.path.parent), tag=ck.tag,
                      what=f"deepspeed zero_to_fp32 on {ck.path}")


def load_native_state_dict(path, tag: Optional[str] = None,
                           trust: bool = False) -> tuple[dict[str, torch.Tensor], Checkpoint]:
    """The full fp32 native state dict of a megamoe checkpoint (any ZeRO stage, any EP size, or a
    weights-only checkpoint from convert_from_hf), checked against its ModelConfig. No file is
    unpickled unless it names only tensors and DeepSpeed's checkpoint classes (or `trust`)."""
    ck = locate_checkpoint(path, tag)
    ck.trust = trust
    if ck.weights_only:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        f = ck.path / WEIGHTS_FILE
        if not f.exists():
            raise CheckpointError(f"{f} is missing (weights-only checkpoint)")
        try:
            sd = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {f}: {e}; the file is truncated or damaged") from None
        check_state_dict(sd, ck.config, str(f))
        return sd, ck

    files = _model_state_files(ck.path)
    for f in sorted(ck.path.glob("*.pt")):   # a damaged file anywhere gives a clear message, not a pickle trace
        if f.stat().st_size == 0:
            raise CheckpointError(f"{f} is empty (truncated write); use another checkpoint tag")
        _check_readable(f)
    vet_dir(ck.path, trust)                  # before DeepSpeed's own loaders (weights_only=False) see a file
    model_state = _torch_load(files[0], trust)
    _preflight(ck, model_state)
    buffers = {k: model_state["module"][k].float() for k in model_state.get("buffer_names") or []
               if k in (model_state.get("module") or {})}
    zero_stage = _zero_stage(ck)
    has_optim_partitions = bool(list(ck.path.glob("*zero_pp_rank_*_optim_states.pt")))
    if model_state.get("ds_autoep_layers"):
        with tempfile.TemporaryDirectory(prefix="megamoe-universal-") as tmp:
            sd = _from_universal(ck, model_state, Path(tmp))
        how = "universal"
    elif has_optim_partitions:
        sd = {k: v.float() for k, v in _from_zero_to_fp32(ck).items()}
        how = "zero_to_fp32"
    else:
        if zero_stage not in (0, -1):
            raise CheckpointError(f"{ck.path}: zero_stage is {zero_stage} but there are no optimizer partition files")
        module = model_state["module"]
        if any(v.dtype != torch.float32 for v in module.values()):
            warnings.warn(f"{files[0]}: ZeRO-0 checkpoint without fp32 master partitions; exporting the "
                          f"{next(iter(module.values())).dtype} module weights")
        sd = {k: v.float() for k, v in module.items()}
        how = "module"
    sd.update(buffers)
    sd = {k: v.contiguous() for k, v in sd.items()}
    check_state_dict(sd, ck.config, str(ck.path))
    ck.extra["reconstruction"] = how
    return sd, ck


def _check_readable(f: Path) -> None:
    import zipfile
    try:
        with zipfile.ZipFile(f) as z:
            bad = z.testzip()
        if bad is not None:
            raise CheckpointError(f"{f}: member {bad} is corrupted; use another checkpoint tag")
    except zipfile.BadZipFile:
        raise CheckpointError(f"{f} is truncated or not a torch.save file; use another checkpoint tag") from None
