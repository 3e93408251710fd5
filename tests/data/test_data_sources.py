"""Readers for txt / jsonl / json.gz / parquet / csv and their file:line errors."""
import gzip
import json

import pytest

from megamoe.data.text_sources import BadInputError, expand_inputs, iter_documents, iter_records


def texts(path, **kw):
    return [r.text for r in iter_records(str(path), **kw)]


def test_txt_modes(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first block\nline two\n\n\n  \nsecond block\n\nthird\n")
    assert texts(p) == [p.read_text()]
    assert texts(p, txt_mode="blank") == ["first block\nline two", "second block", "third"]
    assert [r.line for r in iter_records(str(p), txt_mode="blank")] == [1, 6, 8]
    assert texts(p, txt_mode="line") == ["first block", "line two", "second block", "third"]


def test_jsonl_json_gz_array_parquet_csv(tmp_path):
    rows = [{"text": "alpha", "id": 1}, {"text": "beta\nwith newline", "id": 2}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    with gzip.open(tmp_path / "b.json.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "c.json").write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"id": [1, 2], "content": ["alpha", "beta\nwith newline"]}), tmp_path / "d.parquet")
    (tmp_path / "e.csv").write_text('id,text\n1,alpha\n2,"beta\nwith newline"\n')
    expect = ["alpha", "beta\nwith newline"]
    for name in ("a.jsonl", "b.json.gz", "c.json", "e.csv"):
        assert texts(tmp_path / name) == expect, name
    assert texts(tmp_path / "d.parquet", json_key="content") == expect
    # extension override: a .log file read as jsonl
    (tmp_path / "f.log").write_text(json.dumps(rows[0]) + "\n")
    assert texts(tmp_path / "f.log", fmt="jsonl") == ["alpha"]
    assert [r.line for r in iter_records(str(tmp_path / "e.csv"))] == [2, 3]


def bad(path, **kw):
    recs = [r for r in iter_records(str(path), **kw) if r.error]
    assert recs, "expected a bad record"
    return recs[0]


def test_bad_records_name_file_and_line(tmp_path):
    j = tmp_path / "x.jsonl"
    j.write_bytes(b'{"text": "ok"}\n{"text": "broken\n{"other": 1}\n{"text": "bad \xff byte"}\n{"text": null}\n')
    errs = [(r.line, r.error) for r in iter_records(str(j)) if r.error]
    assert [e[0] for e in errs] == [2, 3, 4, 5]
    assert "malformed JSON" in errs[0][1] and "missing key 'text'" in errs[1][1]
    assert "invalid UTF-8" in errs[2][1] and "NoneType" in errs[3][1]
    with pytest.raises(BadInputError, match=r"x\.jsonl:2: malformed JSON.*--skip-bad"):
        list(iter_documents([str(j)]))
    recs = list(iter_documents([str(j)], skip_bad=True))
    assert [r.text for r in recs if r.error is None] == ["ok"] and sum(r.error is not None for r in recs) == 4

    t = tmp_path / "y.txt"
    t.write_bytes(b"fine\nfine\nbad \xc3\x28 here\n")
    r = bad(t)
    assert (r.line, r.error) == (3, "invalid UTF-8")
    c = tmp_path / "z.csv"
    c.write_bytes(b"text\nok\n\"bad \xff\"\n")
    assert bad(c).line == 3
    c.write_bytes(b"id,body\n1,x\n")
    assert "missing column 'text'" in bad(c).error


def test_unreadable_files(tmp_path):
    r = bad(tmp_path / "missing.jsonl")
    assert r.error == "no such file" and r.location.endswith("missing.jsonl")
    g = tmp_path / "trunc.jsonl.gz"
    data = gzip.compress(b"".join(b'{"text": "%d"}\n' % (i * 7919) for i in range(3000)))
    g.write_bytes(data[: len(data) // 2])
    assert "error" in bad(g).error
    p = tmp_path / "junk.parquet"
    p.write_bytes(b"not parquet at all")
    assert "unreadable parquet" in bad(p).error
    assert "cannot tell the input format" in bad(tmp_path / "file.xyz").error


def test_expand_inputs_is_sorted_and_strict(tmp_path):
    for n in ("b.txt", "a.txt", "c.jsonl"):
        (tmp_path / n).write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.csv").write_text("text\nx\n")
    assert [p.split("/")[-1] for p in expand_inputs([str(tmp_path / "*.txt")])] == ["a.txt", "b.txt"]
    assert [p.split("/")[-1] for p in expand_inputs([str(tmp_path)])] == ["a.txt", "b.txt", "c.jsonl", "d.csv"]
    with pytest.raises(ValueError, match="matches no files"):
        expand_inputs([str(tmp_path / "*.parquet")])
