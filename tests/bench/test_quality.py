"""bench/quality.py: equal-compute budgets and the curves it reads back from a run's TensorBoard."""
import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

from megamoe.config import ModelConfig
from megamoe.monitor import flops_per_token

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("quality", ROOT / "bench" / "quality.py")
quality = importlib.util.module_from_spec(spec)
sys.modules["quality"] = quality      # its dataclasses look their module up
spec.loader.exec_module(quality)


CONFIGS = ["small-moe", "fine=small-moe:n_routed_experts=32,moe_intermediate_size=128,num_experts_per_tok=4",
           "small-moe:num_nextn_predict_layers=1", "small-dense"]


def test_specs_parse_names_and_overrides():
    s = quality.parse_spec("fine=small-moe:n_routed_experts=32,scoring_func=softmax,bias_update_rate=0.001")
    assert s.name == "fine" and s.config.n_routed_experts == 32 and s.config.scoring_func == "softmax"
    assert s.config.bias_update_rate == 0.001 and s.config.hidden_size == ModelConfig.load("small-moe").hidden_size
    assert quality.parse_spec("small-dense").name == "small-dense"
    assert quality.parse_spec("small-moe:n_group=8,topk_group=4").name == "small-moe-n_group=8-topk_group=4"
    with pytest.raises(SystemExit, match="key=value"):
        quality.parse_spec("small-moe:n_routed_experts")


@pytest.mark.parametrize("budget_of", [0, 3])
def test_equal_flops_budget(budget_of):
    specs = [quality.parse_spec(c) for c in CONFIGS]
    cfgs = [s.config for s in specs]
    budget, iters = quality.equal_flops_iters(cfgs, 300, budget_of)
    per_token = [flops_per_token(c, quality.SEQ)["total"] for c in cfgs]     # the trainer's own count
    tokens = quality.tokens_per_iter()
    assert tokens == quality.SEQ * quality.MICRO * quality.NPROC
    assert budget == per_token[budget_of] * tokens * 300 and iters[budget_of] == 300
    for n, f in zip(iters, per_token):
        # the closest whole number of iterations: within half an iteration of the budget
        assert abs(n * tokens * f - budget) <= tokens * f / 2
        assert abs((n + 1) * tokens * f - budget) >= abs(n * tokens * f - budget) <= abs((n - 1) * tokens * f - budget)
    # the MTP config pays for its extra block and LM-head pass: fewer iterations for the same FLOPs
    assert iters[2] < iters[0]


def test_curves_come_from_the_runs_tensorboard(tmp_path):
    """read_curve turns the trainer's scalars (val/loss, train/consumed_samples, perf/train_seconds)
    into loss vs FLOPs and vs training time; eval steps between console lines are interpolated."""
    from torch.utils.tensorboard import SummaryWriter
    w = SummaryWriter(str(tmp_path))
    for step in range(1, 31):
        w.add_scalar("train/consumed_samples", 8 * step, step)
        if step % 10 == 0:
            w.add_scalar("perf/train_seconds", 2.0 * step, step)
        if step % 15 == 0:
            w.add_scalar("val/loss", 10.0 - step / 10, step)
    w.close()
    c = quality.read_curve(tmp_path, fpt=1e6, seq=256)
    assert c.steps == [15, 30] and c.val_loss == [8.5, 7.0]
    assert c.flops == [8 * 15 * 256 * 1e6, 8 * 30 * 256 * 1e6]
    assert c.seconds == [30.0, 60.0]
    # the trainer writes exactly these tags (a renamed tag would leave the curve empty)
    trainer = (ROOT / "megamoe" / "trainer.py").read_text()
    for tag in ("val/loss", "train/consumed_samples", "perf/train_seconds"):
        assert f'"{tag}"' in trainer


def test_summary_reports_gaps_per_seed():
    rows = []
    for seed, (moe, dense) in {1: (5.0, 5.1), 2: (5.2, 5.26)}.items():
        for name, loss in (("moe", moe), ("dense", dense)):
            rows.append(dict(run=f"{name}-s{seed}", config=name, seed=seed, iters=300, tokens=614400, flops=2.4e13,
                             seconds=100.0, wall=120.0, val_loss=loss,
                             evals={"held-out": [loss, 1.0], "KJV": [loss + 1, 1.5], "news": [2 * loss, 2.0]}))
    table = quality.summary(rows, "dense")
    assert "| held-out loss | held-out bpb | KJV loss | KJV bpb | news loss | news bpb |" in table
    assert "| config | seeds | held-out loss | KJV loss | news loss | gap to baseline: held-out | KJV | news |" in table
    moe_row = next(line for line in table.splitlines() if line.startswith("| moe |")).split("|")
    assert math.isclose(float(moe_row[3].split("±")[0]), 5.1) and math.isclose(float(moe_row[5].split("±")[0]), 10.2)
    assert "0.0800 ± 0.0283 (min 0.0600)" in moe_row[6] and "0.0800 ± 0.0283" in moe_row[7]
    assert "0.1600 ± 0.0566 (min 0.1200)" in moe_row[8]
    assert all(len(line.split("|")) == len(moe_row) for line in table.splitlines()
               if line.startswith("| moe") and "-s" not in line)
    # the mean gaps' 95% t-intervals: 2 seeds, gaps 0.10 and 0.06 -> 0.08 ± 12.706 * 0.0283 / sqrt(2)
    line = next(line for line in table.splitlines() if line.startswith("- moe, 2 seeds:"))
    assert "held-out +0.0800 [-0.1741, +0.3341]" in line and "news +0.1600 [-0.3482, +0.6682]" in line
    lo, hi = quality.interval95([0.1, 0.12, 0.08, 0.11, 0.09])     # 5 seeds: t = 2.776
    assert math.isclose(hi - 0.1, 2.776 * statistics.stdev([0.1, 0.12, 0.08, 0.11, 0.09]) / math.sqrt(5))
    assert math.isclose(lo + hi, 0.2)
    assert "t-interval" not in quality.summary(rows[:2], "dense")     # one seed: no interval
    # one maker is named once (its git revision may differ: the sources' digest decides);
    # runs of other sources, hardware or torch are named run by run
    for i, r in enumerate(rows):
        r["made_by"] = {"code": "c0de", "git": f"rev{i}", "device": "CPU X", "torch": "2.13.0"}
    one = "\nTrained by megamoe sources c0de (git rev0) on CPU X, torch 2.13.0.\n"
    assert quality.summary(rows, "dense").endswith(one)
    rows[1]["made_by"] = dict(rows[1]["made_by"], device="GPU Y")
    del rows[2]["made_by"]
    table = quality.summary(rows, "dense")
    assert "The runs mix code, devices or torch versions" in table and "Trained by" not in table
    assert "- dense-s1: megamoe sources c0de (git rev1) on GPU Y, torch 2.13.0\n" in table
    assert "- moe-s1: megamoe sources c0de (git rev0) on CPU X" in table
    assert "- moe-s2: not recorded (an older run)\n" in table


def test_eval_texts_name_their_columns(tmp_path):
    data = {"held_out": tmp_path / "held.txt", "kjv": tmp_path / "kjv.txt", "wiki": tmp_path / "wiki.txt"}
    (tmp_path / "news.txt").write_text("news")
    texts = quality.eval_texts(data, [f"news={tmp_path / 'news.txt'}"])
    assert list(texts) == ["held-out", "KJV", "wiki", "news"] and texts["news"] == tmp_path / "news.txt"
    for bad, why in ((f"{tmp_path / 'news.txt'}", "NAME=FILE"), (f"KJV={tmp_path / 'news.txt'}", "new NAME"),
                     (f"web={tmp_path / 'none.txt'}", "none.txt is not a file")):
        with pytest.raises(SystemExit, match=why):
            quality.eval_texts(data, [bad])


def test_the_two_genre_corpus_keeps_the_evaluation_books_out(tmp_path):
    plays_only, held = quality.training_texts(tmp_path / "a", "plays")
    train, held2 = quality.training_texts(tmp_path / "b", "plays+kjv")
    assert [p.name for p in held] == [p.name for p in held2] and len(held) == len(quality.HELD_OUT_PLAYS)
    assert not {p.name for p in held} & {p.name for p in train}
    books = [p for p in train if p.parent.name == "bible"]
    assert [p.name for p in train if p not in books] == [p.name for p in plays_only]
    assert len(books) == 66 - len(quality.KJV_BOOKS)
    text = "".join(p.read_text() for p in books)
    assert text.startswith("Genesis 1\n\nIn the beginning God created") and "\nRevelation 22\n" in text
    for book in quality.KJV_BOOKS:                      # the evaluation books: not one chapter heading
        assert f"\n{book} 1\n" not in text and not text.startswith(f"{book} 1\n")
    with pytest.raises(SystemExit, match="choose from"):
        quality.training_texts(tmp_path / "c", "plays+web")


def test_the_three_genre_corpus_keeps_the_evaluation_articles_out(tmp_path):
    two, held = quality.training_texts(tmp_path / "a", "plays+kjv")
    three, held3 = quality.training_texts(tmp_path / "b", "plays+kjv+wiki")
    assert [p.name for p in held3] == [p.name for p in held]
    articles = [p for p in three if p.parent.name == "wiki"]
    assert [p.name for p in three if p not in articles] == [p.name for p in two]
    assert len(articles) == 101 - len(quality.WIKI_ARTICLES)
    titles = {p.read_text().split("\n", 1)[0] for p in articles}
    assert "Anarchism" in titles and not titles & set(quality.WIKI_ARTICLES)


def fake_train(record):
    """A stand-in for quality.train: calls record(spec, extra), writes the scalars read_curve reads."""
    def train(spec, seed, iters, data, run_dir, extra):
        from torch.utils.tensorboard import SummaryWriter
        record(spec, extra)
        w = SummaryWriter(str(run_dir / "tensorboard"))
        for tag, value in (("train/consumed_samples", 8.0), ("perf/train_seconds", 3.0), ("val/loss", 6.0)):
            w.add_scalar(tag, value, 1)
        w.close()
        return 4.0
    return train


def test_a_finished_run_is_reused_and_evaluated_again_on_new_texts(tmp_path, monkeypatch):
    """The same command trains once; when an evaluation text changes (kjv_text's layout did) the
    checkpoint is evaluated again without training; other training data or another config trains afresh."""
    calls = []
    train = fake_train(lambda spec, extra: calls.append(("train", spec.name)))

    def evaluate(ckpt, text):
        calls.append(("evaluate", Path(text).read_text()))
        return len(Path(text).read_text()), 1.0
    monkeypatch.setattr(quality, "train", train)
    monkeypatch.setattr(quality, "evaluate", evaluate)
    ds = tmp_path / "ds.json"
    ds.write_text("{}")
    data = {"held_out": tmp_path / "held.txt", "kjv": tmp_path / "kjv.txt", "wiki": tmp_path / "wiki.txt",
            "ds_config": ds, "train": tmp_path / "train"}
    data["held_out"].write_text("plays")
    data["kjv"].write_text("Ruth 1 in paragraphs")
    data["wiki"].write_text("Albedo")
    (tmp_path / "train.idx").write_bytes(b"plays")
    data["evals"] = quality.eval_texts(data)
    spec = quality.parse_spec("small-dense")
    row, _ = quality.run_one(spec, 1, 1, data, tmp_path / "run", [])
    assert calls == [("train", "small-dense"), ("evaluate", "plays"), ("evaluate", "Ruth 1 in paragraphs"),
                     ("evaluate", "Albedo")]
    made = quality.provenance()
    assert row["made_by"] == made and made["torch"] == torch.__version__ and len(made["code"]) == 12
    with monkeypatch.context() as m:        # the digest follows the sources' content
        m.setattr(quality, "ROOT", tmp_path / "ROOT")
        (tmp_path / "ROOT" / "megamoe").mkdir(parents=True)
        (tmp_path / "ROOT" / "megamoe" / "a.py").write_text("x = 1")
        first = quality.provenance()["code"]
        (tmp_path / "ROOT" / "megamoe" / "a.py").write_text("x = 2")
        assert quality.provenance()["code"] != first
    calls.clear()
    assert quality.run_one(spec, 1, 1, data, tmp_path / "run", [])[0] == row and calls == []
    data["kjv"].write_text("Ruth 1\nin verses")
    row2, _ = quality.run_one(spec, 1, 1, data, tmp_path / "run", [])
    assert calls == [("evaluate", "plays"), ("evaluate", "Ruth 1\nin verses"), ("evaluate", "Albedo")]
    assert row2["evals"]["KJV"][0] == len("Ruth 1\nin verses") and row2["seconds"] == row["seconds"] == 3.0
    calls.clear()
    (tmp_path / "train.idx").write_bytes(b"plays and the Bible")     # other training data: trained again
    quality.run_one(spec, 1, 1, data, tmp_path / "run", [])
    assert calls[0] == ("train", "small-dense")
    calls.clear()
    quality.run_one(quality.parse_spec("small-dense:hidden_size=128"), 1, 1, data, tmp_path / "run", [])
    assert calls[0] == ("train", "small-dense-hidden_size=128")
    assert len(list(tmp_path.glob("run~*"))) == 2        # both earlier runs kept aside, neither trained over
    calls.clear()
    (tmp_path / "train.idx").write_bytes(b"plays")      # the first data again: its kept run is found, not retrained
    assert quality.run_one(spec, 1, 1, data, tmp_path / "run", [])[0] == row2 and calls == []
    assert (tmp_path / "run").is_symlink() and len(list(tmp_path.glob("run~*"))) == 3


def test_train_args_for_one_config_and_a_folder_per_comparison():
    specs = [quality.parse_spec(c) for c in ("lo=small-moe", "small-moe", "small-dense")]
    quality.attach_train_args(specs, ["lo=--lr-mult router=0.5 --seed 3", "lo=--lr 1e-3"])
    assert specs[0].train_args == ["--lr-mult", "router=0.5", "--seed", "3", "--lr", "1e-3"]
    assert specs[1].train_args == specs[2].train_args == []
    with pytest.raises(SystemExit, match="NAME one of"):
        quality.attach_train_args(specs, ["dense=--lr 1e-3"])
    with pytest.raises(SystemExit, match="NAME=FLAGS"):
        quality.attach_train_args(specs, ["lo"])
    assert quality.comparison_name(specs) == "lo+small-moe-vs-small-dense"
    assert quality.comparison_name(specs[2:]) == "small-dense"
    many = [quality.parse_spec(f"variant{i:02d}=small-moe:bias_update_rate=0.00{i}") for i in range(1, 10)]
    long = quality.comparison_name(many + specs[2:])
    assert len(long) == 93 and long.startswith("variant01+variant02+")
    other = quality.comparison_name(many[:-1] + [quality.parse_spec("variant99=small-moe")] + specs[2:])
    assert other[:80] == long[:80] and other != long       # differs only past the kept start: the digest tells


def test_main_gives_each_config_its_flags_and_writes_its_comparison_folder(tmp_path, monkeypatch):
    """Two comparisons in one --out share the baseline's runs and keep their own summaries."""
    trained = []
    train = fake_train(lambda spec, extra: trained.append((spec.name, extra)))

    def prepare_data(out, corpus):
        out.mkdir(parents=True, exist_ok=True)
        (out / "train.idx").write_bytes(b"tokens")
        (out / "held.txt").write_text("plays")
        (out / "kjv.txt").write_text("Ruth 1")
        (out / "wiki.txt").write_text("Albedo")
        return {"held_out": out / "held.txt", "kjv": out / "kjv.txt", "wiki": out / "wiki.txt", "train": out / "train"}
    monkeypatch.setattr(quality, "train", train)
    monkeypatch.setattr(quality, "evaluate", lambda ckpt, text: (5.0, 2.0))
    monkeypatch.setattr(quality, "prepare_data", prepare_data)
    out = tmp_path / "q"
    common = ["--out", str(out), "--precision", "fp32", "--budget-iters", "2"]
    assert quality.main([*common, "--configs", "lo=small-moe", "small-dense", "--train-args", "--log-interval 1",
                         "--train-args-for", "lo=--lr-mult router=0.5"]) == 0
    assert trained == [("small-dense", ["--log-interval", "1"]),
                       ("lo", ["--log-interval", "1", "--lr-mult", "router=0.5"])]
    trained.clear()
    assert quality.main([*common, "--configs", "small-moe", "small-dense", "--train-args", "--log-interval 1"]) == 0
    assert trained == [("small-moe", ["--log-interval", "1"])]          # the dense runs are reused
    for name, runs in (("lo-vs-small-dense", ["small-dense-s1234", "lo-s1234"]),
                       ("small-moe-vs-small-dense", ["small-dense-s1234", "small-moe-s1234"])):
        assert [r["run"] for r in json.loads((out / name / "results.json").read_text())] == runs
        assert (out / name / "curves.png").stat().st_size > 0
        assert "| " + runs[1] + " |" in (out / name / "summary.md").read_text()
    # the same run under another name (a variant that became the preset): linked, not trained again
    trained.clear()
    assert quality.main([*common, "--configs", "same=small-moe", "small-dense", "--train-args", "--log-interval 1"]) == 0
    assert trained == [] and (out / "runs" / "same-s1234").readlink() == Path("small-moe-s1234")
    assert [(r["run"], r["config"]) for r in json.loads((out / "same-vs-small-dense" / "results.json").read_text())] \
        == [("small-dense-s1234", "small-dense"), ("same-s1234", "same")]
    # no longer the same run: the link goes and the run trains in its own folder, the twin untouched
    twin = (out / "runs" / "small-moe-s1234" / "result.json").read_text()
    assert quality.main([*common, "--configs", "same=small-moe:bias_update_rate=0.01", "small-dense",
                         "--train-args", "--log-interval 1"]) == 0
    assert trained == [("same", ["--log-interval", "1"])] and not (out / "runs" / "same-s1234").is_symlink()
    assert (out / "runs" / "small-moe-s1234" / "result.json").read_text() == twin
