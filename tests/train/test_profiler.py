"""--profile (megamoe/profiler.py): the window, the files, the flags' errors."""
import json

import pytest
import torch

from megamoe.profiler import StepProfiler
from megamoe.train_config import ConfigConflict, LoggingConfig


def loop(prof: StepProfiler, iters: int) -> None:
    a = torch.randn(64, 64)
    for it in range(1, iters + 1):
        prof.before_step(it)
        with torch.profiler.record_function(f"iteration {it}"):
            a = torch.tanh(a @ a)
        prof.after_step(it)
    prof.close()


def test_profiles_exactly_the_window_and_writes_a_trace_and_an_op_table(tmp_path, capsys):
    log = LoggingConfig(profile=True, profile_step_start=2, profile_step_end=4, tensorboard_dir=str(tmp_path / "tb"))
    prof = StepProfiler.from_config(log, rank=0, device_type="cpu")
    loop(prof, 6)
    out = tmp_path / "tb" / "profile"
    assert sorted(p.name for p in out.iterdir()) == ["rank0.ops.txt", "rank0.trace.json"]   # no temp files left
    names = {e.get("name") for e in json.loads((out / "rank0.trace.json").read_text())["traceEvents"]}
    assert {"iteration 2", "iteration 3"} <= names and not names & {"iteration 1", "iteration 4", "iteration 5"}
    assert "aten::mm" in names
    ops = (out / "rank0.ops.txt").read_text()
    assert ops.startswith("rank 0, iterations 2-3, sorted by self_cpu_time_total") and "aten::mm" in ops
    assert "[64, 64]" in ops                                               # input shapes recorded
    assert "profile of iterations 2-3" in capsys.readouterr().out


def test_off_unless_asked_and_only_on_the_listed_ranks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for log, rank in ((LoggingConfig(), 0), (LoggingConfig(profile=True, profile_ranks=[1]), 0)):
        loop(StepProfiler.from_config(log, rank, "cpu"), 12)
        assert not (tmp_path / "profile").exists()
    loop(StepProfiler.from_config(LoggingConfig(profile=True, profile_ranks=[0, 1]), 1, "cpu"), 12)
    assert (tmp_path / "profile" / "rank1.trace.json").is_file()           # default window 10-11, ./profile


def test_a_run_that_stops_inside_the_window_still_writes_it(tmp_path, capsys):
    prof = StepProfiler.from_config(LoggingConfig(profile=True, profile_step_start=2, profile_step_end=9,
                                                  profile_dir=str(tmp_path / "p")), 0, "cpu")
    loop(prof, 3)                                                      # loop() closes, as Trainer.finish does
    assert (tmp_path / "p" / "rank0.trace.json").is_file()
    assert "profile of iterations 2-3" in capsys.readouterr().out


@pytest.mark.parametrize("start,end", [(0, 3), (5, 5), (6, 2)])
def test_a_window_that_is_not_one_to_the_end_names_the_flags(start, end):
    with pytest.raises(ConfigConflict, match="--profile-step-start .* 1 <= start < end"):
        StepProfiler.from_config(LoggingConfig(profile=True, profile_step_start=start, profile_step_end=end), 0, "cpu")
