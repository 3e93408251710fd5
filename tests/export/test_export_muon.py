"""HF export of checkpoints trained with DeepSpeed's Muon optimizer (ds_configs/muon.json,
muonclip.json): AutoEP at EP 2 on 2 CPU ranks, ZeRO-2 (the shipped configs' stage) and ZeRO-3.

DeepSpeed's universal converter assumes Adam's optimizer state (KeyError 'exp_avg' on Muon);
megamoe.export runs it on an Adam-shaped view of the optimizer partitions and reads only the
fp32 masters. The checks: the exported model's logits equal the training engine's (fp32 run),
the rebuilt tensors are bit-identical to the engine's own fp32 masters (every expert of every
EP rank), and tools/convert_checkpoint.py refuses Muon with a clear message.
"""
from pathlib import Path

import pytest
import torch

import multirank
from megamoe.checkpoint import load_native_state_dict
from megamoe.export import convert_to_hf

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
pytestmark = pytest.mark.slow

STAGES = (2, 3)


@pytest.fixture(scope="module")
def muon_checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("muon")
    out = {}
    for stage in STAGES:
        d = base / f"zero{stage}"
        rc, log = multirank.run([HERE / "make_checkpoint.py", d, stage, 2, "--muon"], timeout=300)
        assert rc == 0, log[-6000:]
        out[stage] = d
    return out


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_checkpoint_really_is_muon_without_adam_moments(muon_checkpoints, tmp_path):
    # what made DeepSpeed's converter fail: Muon groups hold a momentum buffer, not exp_avg.
    # If a DeepSpeed upgrade makes ds_to_universal accept Muon, this fails: the Adam-shaped view in
    # megamoe.export (and convert_checkpoint's refusal) can then be revisited.
    osd = torch.load(muon_checkpoints[2] / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                     weights_only=False)["optimizer_state_dict"]
    states = osd["base_optimizer_state"]["state"].values()
    assert any("momentum_buffer" in s and "exp_avg" not in s for s in states)
    with pytest.raises(KeyError, match="exp_avg"):   # DeepSpeed's own converter, unwrapped
        from argparse import Namespace
        from deepspeed.checkpoint import ds_to_universal
        src = muon_checkpoints[2] / "global_step3"
        args = Namespace(input_folder=str(src), output_folder=str(tmp_path / "attempt" / "global_step3"),
                         num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                         inject_missing_state=False)
        ds_to_universal.main(args)


@pytest.mark.parametrize("stage", STAGES)
def test_muon_rebuild_is_the_engines_fp32_masters(stage, muon_checkpoints):
    from make_checkpoint import master_mismatches
    sd, ck = load_native_state_dict(muon_checkpoints[stage])
    assert ck.extra["reconstruction"] == "universal"
    assert ck.extra["placeholder_moment_groups"] > 0     # the Muon groups went through the Adam-shaped view
    bad, experts = master_mismatches(sd, muon_checkpoints[stage])
    assert not bad, bad[:8]
    cfg = ck.config
    n_moe = sum(1 for i in range(cfg.num_hidden_layers) if f"layers.{i}.ffn.experts.gate_up_proj" in sd)
    assert experts == n_moe * cfg.n_routed_experts > 0     # every expert of every MoE layer, both EP ranks
    assert sd["layers.1.ffn.router.e_score_correction_bias"].abs().max() > 0


@pytest.mark.parametrize("stage", STAGES)
def test_muon_hf_logits_match_engine(stage, muon_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM
    with pytest.warns(UserWarning, match="no tokenizer"):
        hf_dir = convert_to_hf(muon_checkpoints[stage], tmp_path / "hf")
    ref = torch.load(muon_checkpoints[stage] / "reference.pt")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ref["input_ids"]).logits
    assert _rel(logits, ref["logits"]) < 1e-5


def test_convert_checkpoint_refuses_muon(muon_checkpoints, tmp_path):
    from megamoe.checkpoint import CheckpointError as ResumeCheckpointError
    from megamoe.checkpoint.universal import convert
    from megamoe.cli.convert_checkpoint import main
    with pytest.raises(ResumeCheckpointError, match="Muon.*only carries Adam.*convert_to_hf"):
        convert(str(muon_checkpoints[2]), str(tmp_path / "uni"))
    assert not (tmp_path / "uni").exists()
    assert main(["--input", str(muon_checkpoints[2]), "--output", str(tmp_path / "uni2")]) == 2
    assert not (tmp_path / "uni2").exists()
    # no optimizer recorded in megamoe_state.json: DeepSpeed's KeyError becomes the same clear refusal
    import json
    import shutil
    anon = shutil.copytree(muon_checkpoints[2], tmp_path / "anon")
    state_file = anon / "global_step3" / "megamoe_state.json"
    state_file.write_text(json.dumps(dict(json.loads(state_file.read_text()), ds_config={})))
    with pytest.raises(ResumeCheckpointError, match="without Adam's exp_avg.*convert_to_hf"):
        convert(str(anon), str(tmp_path / "uni3"))
    assert not (tmp_path / "uni3" / "global_step3").exists()
