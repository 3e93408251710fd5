"""The typed run config (megamoe.train_config), the trainer state file and the schedule kept on
resume: unit checks that need no engine. The end-to-end resume checks are in
test_pretrain_distributed.py."""
from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch

from megamoe import checkpoint as ckpt
from megamoe.schedule import LRSchedule, flag_schedule_kept, lr_scheduler_factory
from megamoe.train_config import (DEMO_SCHEDULE_FLAGS, SECTIONS, ConfigConflict, TrainConfig, parse_args,
                                  reconcile_ds_config)

DS = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
      "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"weight_decay": 0.1}},
      "zero_optimization": {"stage": 2}}


def resolved(*extra, ds=DS, world=2) -> TrainConfig:
    cfg = parse_args(["--model-config", "tiny", "--data-path", "d", "--seq-length", "64", "--train-iters", "10",
                      "--deepspeed-config", "c.json", "--lr", "1e-3", *extra])
    cfg.ds_config = reconcile_ds_config(ds, cfg, world)
    return cfg


def test_the_demo_schedule_parses_to_wsd_decaying_over_the_last_fifth():
    # make demo and bench/quality.py pass these flags; CI runs neither, so a renamed flag shows here
    cfg = parse_args(["--model-config", "tiny", "--data-path", "d", "--seq-length", "64", "--train-iters", "300",
                      "--deepspeed-config", "c.json", *DEMO_SCHEDULE_FLAGS])
    o = cfg.optim
    assert (o.lr, o.min_lr, o.lr_warmup_iters, o.lr_decay_style) == (2e-3, 2e-5, 10, "wsd")
    f = LRSchedule(o.lr_decay_style, o.lr, o.min_lr, o.lr_warmup_iters, cfg.train_iters, o.lr_wsd_decay_iters)
    assert f(0) == pytest.approx(0.1) and f(9) == f(239) == 1.0      # warm-up, then constant to iteration 240
    assert 0.01 < f(240) < 1.0 and f(299) == pytest.approx(0.01)     # linear decay to min_lr / lr


def test_flags_land_in_typed_sections_and_resolve_fills_what_the_run_uses():
    cfg = resolved("--lr-mult", "router=0.5", "--model-override", "vocab_size=1024", "--log-interval", "3")
    assert cfg.optim.lr_mult == {"router": 0.5} and cfg.model.model_override == {"vocab_size": 1024}
    assert cfg.logging.log_interval == 3 and cfg.data.seq_length == 64 and cfg.data.data_path == ["d"]
    o = cfg.optim
    assert (o.micro_batch_size, o.gradient_accumulation_steps, o.global_batch_size) == (4, 2, 16)
    assert (o.lr, o.weight_decay, o.clip_grad, o.bf16, o.optimizer) == (1e-3, 0.1, 1.0, True, "adamw")
    assert (cfg.parallel.world_size, cfg.parallel.zero_stage) == (2, 2) and cfg.train_iters == 10
    assert cfg.ds_config["train_batch_size"] == 16
    # every flag has exactly one home, and every field comes from a flag
    fields = [f.name for sec in SECTIONS.values() for f in dataclasses.fields(sec)]
    assert len(fields) == len(set(fields))
    from megamoe.train_config import build_parser
    dests = {a.dest for a in build_parser()._actions} - {"help", "local_rank"}
    assert dests <= set(fields), dests - set(fields)
    assert set(fields) - dests == {"gradient_accumulation_steps", "optimizer", "world_size", "zero_stage"}


def test_describe_and_json_round_trip():
    cfg = resolved()
    text = cfg.describe()
    assert all(f"  {name}:" in text for name in SECTIONS) and "seq_length=64" in text
    saved = json.loads(json.dumps(cfg.to_dict()))
    assert resolved().resume_changes(saved) == []


def test_train_tokens_rounds_up_to_whole_iterations():
    cfg = parse_args(["--model-config", "tiny", "--data-path", "d", "--seq-length", "64", "--train-tokens", "10000",
                      "--deepspeed-config", "c.json", "--lr", "1e-3"])
    cfg.ds_config = reconcile_ds_config(DS, cfg, 2)
    assert cfg.train_iters == 10   # 16 x 64 = 1024 tokens per iteration


def test_resume_applies_schedule_changes_and_refuses_corrupting_ones():
    saved = json.loads(json.dumps(resolved().to_dict()))
    now = resolved("--train-iters", "20", "--lr-decay-style", "constant", "--log-interval", "5",
                   "--save", "elsewhere", "--expert-model-parallel-size", "2")
    assert now.resume_changes(saved) == ["train_iters: 10 -> 20", "lr_decay_style: 'cosine' -> 'constant'",
                                         "log_interval: 10 -> 5"]   # --save and the layout: not compared here
    with pytest.raises(ConfigConflict) as e:
        resolved("--seq-length", "128", "--seed", "5", "--tokenizer", "t.model", "--data-path", "a", "b",
                 "--no-weight-decay-on").resume_changes(saved, where="ck/global_step3")
    msg = str(e.value)
    for part in ("ck/global_step3", "seq_length: 64 -> 128", "seed: 1234 -> 5", "tokenizer: None -> 't.model'",
                 "data_path: ['d'] -> ['a', 'b']", "no_weight_decay_on",
                 "--allow-resume-change data_path tokenizer seq_length seed no_weight_decay_on"):
        assert part in msg, (part, msg)
    ok = resolved("--seq-length", "128", "--allow-resume-change", "seq_length")
    assert ok.resume_changes(saved) == ["seq_length: 64 -> 128"]
    blend = json.loads(json.dumps(resolved("--data-path", "0.7", "a", "0.3", "b").to_dict()))
    assert resolved("--data-path", "0.5", "a", "0.5", "b").resume_changes(blend) == [
        "data_path: ['0.7', 'a', '0.3', 'b'] -> ['0.5', 'a', '0.5', 'b'] (blend weights only: a curriculum step)"]
    with pytest.raises(ConfigConflict, match="data_path"):
        resolved("--data-path", "0.5", "a", "0.5", "c").resume_changes(blend)
    muon = dict(DS, optimizer={"type": "Muon", "params": {}}, gradient_clipping=0.0)
    with pytest.raises(ConfigConflict, match="optimizer: 'adamw' -> 'muon'"):
        resolved(ds=muon).resume_changes(saved)
    assert resolved().resume_changes({}) == []   # weights-only / older checkpoints carry no config


def test_batch_sizes_must_be_integers_in_the_deepspeed_config():
    with pytest.raises(ConfigConflict, match="c.json: train_micro_batch_size_per_gpu must be an integer, got '4'"):
        cfg = parse_args(["--model-config", "tiny", "--data-path", "d", "--seq-length", "64", "--train-iters", "1",
                          "--deepspeed-config", "c.json", "--lr", "1e-3"])
        reconcile_ds_config(dict(DS, train_micro_batch_size_per_gpu="4"), cfg, 2, source="c.json")


def _steps(sched, n):
    for _ in range(n):
        sched.optimizer.step()
        sched.step()


def test_flag_schedule_kept_positions_the_new_schedule_at_the_resumed_step():
    w = torch.nn.Parameter(torch.zeros(2))
    old = lr_scheduler_factory(LRSchedule("cosine", 3e-3, 3e-4, 2, 8))(
        torch.optim.SGD([{"params": [w], "lr": 3e-3}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 3e-4}]))
    _steps(old, 8)
    state, opt_state = old.state_dict(), old.optimizer.state_dict()
    assert old.get_last_lr()[0] == pytest.approx(3e-4)

    new_sched = LRSchedule("constant", 1e-3, 0.0, 0, 20)
    new = lr_scheduler_factory(new_sched)(torch.optim.SGD([{"params": [w], "lr": 1e-3},
                                                           {"params": [torch.nn.Parameter(torch.zeros(1))],
                                                            "lr": 1e-4}]))
    with flag_schedule_kept(new):
        new.optimizer.load_state_dict(opt_state)   # what DeepSpeed's load_checkpoint does
        new.load_state_dict(state)
    assert new.last_epoch == 8 and new.lr_lambdas[0].style == "constant" and new.lr_lambdas[0].total == 20
    assert [g["lr"] for g in new.optimizer.param_groups] == pytest.approx([1e-3, 1e-4])
    _steps(new, 1)
    assert new.get_last_lr() == pytest.approx([1e-3, 1e-4])
    # without the guard the checkpoint's schedule would win (the bug this prevents)
    plain = lr_scheduler_factory(LRSchedule("constant", 1e-3, 0.0, 0, 20))(
        torch.optim.SGD([{"params": [w]}, {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=1e-3))
    plain.load_state_dict(state)
    assert plain.lr_lambdas[0].style == "cosine"


def test_trainer_state_round_trip_keeps_unknown_keys(tmp_path):
    st = ckpt.TrainerState(step=3, model_config={"hidden_size": 8}, ds_config={"optimizer": {"type": "Muon"}},
                           extra={"from_a_newer_version": 1})
    st.write(tmp_path)
    back = ckpt.read_state(tmp_path)
    assert back == st and back.optimizer() == "muon"
    raw = json.loads((tmp_path / ckpt.STATE_FILE).read_text())
    assert raw["from_a_newer_version"] == 1 and "extra" not in raw and raw["format"] == ckpt.FORMAT
    (tmp_path / ckpt.STATE_FILE).write_text(json.dumps({"format": ckpt.FORMAT, "step": 1}))
    with pytest.raises(ckpt.CheckpointError, match="missing model_config"):
        ckpt.read_state(tmp_path)


def test_rng_states_load_without_unpickling(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.rand(1)   # a cached gaussian in numpy's state
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    want = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.normal(), torch.rand(3))
    assert got[0] == want[0] and got[1] == want[1] and torch.equal(got[2], want[2])


def test_resume_point_without_latest_takes_the_newest_complete_tag(tmp_path):
    def tag(step, complete=True):
        d = tmp_path / ckpt.tag_for(step)
        d.mkdir()
        if complete:
            ckpt.TrainerState(step=step, model_config={}).write(d)
    assert ckpt.resume_point(tmp_path) == (None, None)            # empty: a fresh start, nothing to say
    tag(3, complete=False)                                         # killed inside its first save
    found, note = ckpt.resume_point(tmp_path)
    assert found is None and "only incomplete checkpoints (global_step3" in note and "from scratch" in note
    tag(2), tag(10), tag(9), tag(12, complete=False)
    (found_tag, state), note = ckpt.resume_point(tmp_path)
    assert found_tag == "global_step10" and state.step == 10   # by step, not by name (global_step9 > ..10)
    assert "no `latest`" in note and "global_step3, global_step12" in note
    ckpt.write_latest(tmp_path, "global_step2")
    assert ckpt.resume_point(tmp_path) == (("global_step2", ckpt.read_state(tmp_path / "global_step2")), None)


def test_load_and_save_locations_are_checked_before_any_work(tmp_path):
    ckpt.check_locations(None, None)
    with pytest.raises(ckpt.CheckpointError, match="--load .*ckpt_typo does not exist.*--save .*--load"):
        ckpt.check_locations(str(tmp_path / "ckpt_typo"), str(tmp_path / "ckpt"))
    ckpt.check_locations(str(tmp_path / "new"), str(tmp_path / "new"))   # auto-resume idiom: created
    assert (tmp_path / "new").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ckpt.CheckpointError, match="a file is in the way"):
        ckpt.check_locations(None, str(tmp_path / "file" / "ckpt"))
    with pytest.raises(ckpt.CheckpointError, match="a file is in the way"):
        ckpt.check_locations(None, str(tmp_path / "file"))
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    import os
    if os.geteuid() != 0:   # root writes anywhere: the mode check means nothing there
        with pytest.raises(ckpt.CheckpointError, match="not writable"):
            ckpt.check_locations(None, str(ro))


def test_a_repeated_stop_signal_is_one_request_until_the_grace_period_ends():
    import signal
    from megamoe.trainer import StopRequest
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop = StopRequest()
        stop._handler(signal.SIGTERM, None)
        stop._handler(signal.SIGTERM, None)   # the launcher's forwarded copy: same request
        assert stop.signum == signal.SIGTERM and stop.agreed()
        assert signal.getsignal(signal.SIGTERM) == stop._handler
        stop.first_at -= StopRequest.GRACE_S + 1
        with pytest.raises(KeyboardInterrupt):
            stop._handler(signal.SIGINT, None)   # a second request later: the default action
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_vocabulary_comes_from_the_tokenizer_padded_like_megatron(tmp_path):
    from megamoe.data.tokenizer import train_sentencepiece
    from megamoe.trainer import build_model_config
    text = "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. " * 50
    tok = str(train_sentencepiece([text], tmp_path, vocab_size=300, num_threads=1))

    def model(*extra):
        return build_model_config(parse_args(["--model-config", "tiny", "--data-path", "d", "--seq-length", "64",
                                              "--train-iters", "1", "--deepspeed-config", "c.json",
                                              "--tokenizer", tok, *extra]))
    assert model().vocab_size == 384                                       # 300 -> a multiple of 128
    assert model("--make-vocab-size-divisible-by", "64").vocab_size == 320
    assert model("--model-override", "vocab_size=1000").vocab_size == 1000  # larger: kept
    with pytest.raises(ConfigConflict, match="vocab_size=256 is smaller than the 300 tokens"):
        model("--model-override", "vocab_size=256")
    with pytest.raises(SystemExit):
        model("--make-vocab-size-divisible-by", "0")


def test_shipped_configs_are_gpu_right_and_the_cpu_adaptation_is_said():
    from pathlib import Path

    from megamoe.train_config import adapt_to_accelerator, load_ds_config
    root = Path(__file__).resolve().parents[2] / "ds_configs"
    for name in ("zero1", "zero2", "zero3", "zero2_offload"):
        ds = load_ds_config(str(root / f"{name}.json"))
        zero = ds["zero_optimization"]
        if zero["stage"] >= 2:
            assert zero["overlap_comm"] is True, name
        if name != "zero2_offload":
            assert ds["optimizer"]["params"]["fused"] is True and ds["optimizer"]["params"]["torch_adam"]
        gpu = json.loads(json.dumps(ds))
        assert adapt_to_accelerator(gpu, "cuda") == [] and gpu == ds        # a GPU run gets the file as is
        changes = adapt_to_accelerator(ds, "cpu")
        assert ("zero_optimization.overlap_comm: true -> false" in " ".join(changes)) == (zero["stage"] >= 2)
        assert not ds["zero_optimization"].get("overlap_comm")
    off = load_ds_config(str(root / "zero2_offload.json"))
    assert off["zero_optimization"]["offload_optimizer"]["pin_memory"] is True
    assert any("pin_memory: true -> false" in c for c in adapt_to_accelerator(off, "cpu"))
