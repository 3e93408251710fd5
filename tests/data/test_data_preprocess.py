"""End to end: text -> .bin/.idx -> text; worker-count independence; bad input; CLIs."""
import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megamoe.data.indexed import IndexedDataset
from megamoe.data.preprocess import preprocess, verify_dataset
from megamoe.data.text_sources import BadInputError
from megamoe.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]


def test_round_trip_text_bin_text(tmp_path, spm_path):
    docs = ["Now is the winter of our discontent\nMade glorious summer by this sun of York;",
            "A horse! a horse! my kingdom for a horse!", "ünïcode ✓ and digits 1592"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    stats = preprocess([str(tmp_path / "in.jsonl")], spm_path, str(tmp_path / "out"), append_eod=True,
                       progress=False)
    assert (stats.documents, stats.skipped) == (3, 0)
    tok = load_tokenizer(spm_path)
    ds = IndexedDataset(tmp_path / "out")
    assert ds.dtype == np.uint16 and len(ds) == 3 and stats.tokens == int(ds.sizes.sum())
    for i, d in enumerate(docs):
        ids = ds[i].tolist()
        assert ids[-1] == tok.eos_id
        assert tok.decode(ids[:-1]) == d


def test_tiktoken_vocab_gives_int32(tmp_path, o200k_path):
    (tmp_path / "a.txt").write_text("Hello there, world.")
    preprocess([str(tmp_path / "a.txt")], o200k_path, str(tmp_path / "o"), progress=False)
    ds = IndexedDataset(tmp_path / "o")
    tok = load_tokenizer(o200k_path)
    assert ds.dtype == np.int32 and tok.decode(ds[0]) == "Hello there, world."


def test_one_and_four_workers_identical(tmp_path, shakespeare_dir, small_spm):
    plays = sorted(str(p) for p in shakespeare_dir.glob("*.txt"))[:6]
    outs = []
    for w in (1, 4):
        prefix = tmp_path / f"w{w}"
        # blank-line blocks + small chunks: thousands of documents in dozens of chunks
        stats = preprocess(plays, small_spm, str(prefix), workers=w, append_eod=True, txt_mode="blank",
                           chunk_chars=20_000, progress=False)
        outs.append((prefix, stats))
    (a, sa), (b, sb) = outs
    assert sa.documents == sb.documents > 1000 and sa.tokens == sb.tokens
    assert filecmp.cmp(f"{a}.bin", f"{b}.bin", shallow=False)
    assert filecmp.cmp(f"{a}.idx", f"{b}.idx", shallow=False)


def test_split_outputs(tmp_path, small_spm):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": f"doc {i} text"}) + "\n" for i in range(400)))
    stats = preprocess([str(tmp_path / "in.jsonl")], small_spm, str(tmp_path / "s"), split=[0.9, 0.1],
                       progress=False)
    tr, va = IndexedDataset(tmp_path / "s_train"), IndexedDataset(tmp_path / "s_valid")
    assert len(tr) + len(va) == 400 and 20 <= len(va) <= 60
    assert stats.outputs["valid"]["documents"] == len(va)


def write_bad_corpus(d: Path) -> list:
    (d / "good.txt").write_text("a fine document")
    (d / "empty.txt").write_text("  \n\n")
    (d / "bad.jsonl").write_bytes(b'{"text": "ok one"}\n{"text": oops}\n{"body": "x"}\n'
                                  b'{"text": "bad \xff"}\n{"text": ""}\n{"text": "ok two"}\n')
    return [str(d / "good.txt"), str(d / "empty.txt"), str(d / "bad.jsonl"), str(d / "missing.txt")]


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_input_stops_or_is_counted(tmp_path, small_spm, workers):
    inputs = write_bad_corpus(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(BadInputError, match=r"bad\.jsonl:2: malformed JSON"):
        preprocess(inputs, small_spm, str(out), workers=workers, progress=False)
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())  # nothing half-written
    stats = preprocess(inputs, small_spm, str(out), workers=workers, skip_bad=True, progress=False)
    assert (stats.documents, stats.skipped_bad, stats.skipped_empty) == (3, 4, 2)
    assert "missing.txt: no such file" in stats.summary()
    assert "skipped      6 (4 bad, 2 empty)" in stats.summary()
    tok = load_tokenizer(small_spm)
    ds = IndexedDataset(out)
    assert [tok.decode(ds[i]) for i in range(3)] == ["a fine document", "ok one", "ok two"]


@pytest.mark.parametrize("content,msg", [
    (b'{"body": 1}\n', r"x\.jsonl:1: missing key 'text'"),
    (b'{"text": "a"}\n{"text": "\xc3\x28"}\n', r"x\.jsonl:2: invalid UTF-8"),
])
def test_each_bad_case_names_file_and_line(tmp_path, small_spm, content, msg):
    (tmp_path / "x.jsonl").write_bytes(content)
    with pytest.raises(BadInputError, match=msg):
        preprocess([str(tmp_path / "x.jsonl")], small_spm, str(tmp_path / "o"), progress=False)


def test_interrupted_run_leaves_no_output(tmp_path, small_spm, monkeypatch):
    import megamoe.data.preprocess as pp

    real = pp.iter_documents

    def interrupted(*a, **k):
        for n, rec in enumerate(real(*a, **k)):
            if n == 50:
                raise KeyboardInterrupt  # Ctrl-C in the middle of the corpus
            yield rec

    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(100)))
    monkeypatch.setattr(pp, "iter_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess([str(tmp_path / "in.jsonl")], small_spm, str(tmp_path / "o"), chunk_chars=10, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_unreadable_file_stops(tmp_path, small_spm):
    with pytest.raises(BadInputError, match=r"nope\.txt: no such file"):
        preprocess([str(tmp_path / "nope.txt")], small_spm, str(tmp_path / "o"), progress=False)


def run_tool(name, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, f"tools/{name}", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_clis(tmp_path, small_spm):
    corpus = tmp_path / "corpus"
    r = run_tool("prepare_corpus.py", "--output", corpus, "--bible", tmp_path / "kjv", "--wiki", tmp_path / "wiki")
    assert r.returncode == 0 and "38 plays" in r.stdout and "66 books of the Bible" in r.stdout, r.stderr
    assert "101 Wikipedia articles" in r.stdout
    assert len(list((tmp_path / "kjv").glob("*.txt"))) == 66 and len(list((tmp_path / "wiki").glob("*.txt"))) == 101
    plays = sorted(corpus.glob("*.txt"))[:2]
    r = run_tool("train_tokenizer.py", "--input", *plays, "--vocab-size", 400, "--output", tmp_path / "tok")
    assert r.returncode == 0, r.stderr
    model = tmp_path / "tok" / "tokenizer.model"
    assert load_tokenizer(model).vocab_size == 400
    r = run_tool("preprocess.py", "--input", str(corpus / "*.txt"), "--tokenizer", model, "--output-prefix",
                 tmp_path / "shk", "--append-eod", "--workers", 2)
    assert r.returncode == 0, r.stderr
    assert "documents    38" in r.stdout and "tokens/s" in r.stdout
    assert "doc/s" in r.stderr  # the tqdm progress bar
    r = run_tool("preprocess.py", "--verify", tmp_path / "shk", "--tokenizer", model)
    assert r.returncode == 0 and "consistent" in r.stdout and "ACT I" in r.stdout
    info = verify_dataset(str(tmp_path / "shk"), str(model))
    assert info["documents"] == 38 and info["max_token_id"] < 400
    b = tmp_path / "shk.bin"
    b.write_bytes(b.read_bytes()[:-2])
    r = run_tool("inspect_data.py", tmp_path / "shk")
    assert r.returncode == 1 and "truncated" in r.stderr
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n{oops\n')
    r = run_tool("preprocess.py", "--input", tmp_path / "bad.jsonl", "--tokenizer", model,
                 "--output-prefix", tmp_path / "b", "--no-progress")
    assert r.returncode == 1 and "bad.jsonl:2: malformed JSON" in r.stderr
