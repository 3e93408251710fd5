"""Megatron .bin/.idx writer and reader: layout, atomicity, refusal of damaged files."""
import os
import struct

import numpy as np
import pytest

from megamoe.data.indexed import (HeaderlessTokenDataset, IndexedDataset, IndexedDatasetError,
                                  IndexedDatasetWriter, best_dtype, open_token_dataset)

DOCS = [[5, 6, 7], [1], [], [65535, 0, 42, 9]]


def independent_read(prefix):
    """A reader written only from the published Megatron layout (no megamoe code)."""
    with open(str(prefix) + ".idx", "rb") as f:
        assert f.read(9) == b"MMIDIDX\x00\x00"
        (version,) = struct.unpack("<Q", f.read(8))
        (code,) = struct.unpack("<B", f.read(1))
        seq_count, doc_count = struct.unpack("<QQ", f.read(16))
        sizes = np.frombuffer(f.read(4 * seq_count), dtype="<i4")
        pointers = np.frombuffer(f.read(8 * seq_count), dtype="<i8")
        doc_idx = np.frombuffer(f.read(8 * doc_count), dtype="<i8")
        assert f.read() == b""
    dtype = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
             7: np.float32, 8: np.uint16}[code]
    raw = open(str(prefix) + ".bin", "rb").read()
    seqs = [np.frombuffer(raw, dtype=dtype, count=int(n), offset=int(p)).tolist()
            for n, p in zip(sizes, pointers)]
    return version, code, seqs, doc_idx.tolist(), len(raw)


def write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)


def test_layout_matches_independent_reader(tmp_path):
    prefix = tmp_path / "ds"
    write(prefix, DOCS)
    version, code, seqs, doc_idx, nbytes = independent_read(prefix)
    assert (version, code) == (1, 8)  # uint16
    assert seqs == DOCS and doc_idx == [0, 1, 2, 3, 4] and nbytes == 2 * 8
    ds = IndexedDataset(prefix)
    assert len(ds) == 4 and ds.dtype == np.uint16 and ds.num_documents == 4
    assert [ds[i].tolist() for i in range(4)] == DOCS
    assert ds.sizes.tolist() == [3, 1, 0, 4] and ds.doc_idx.tolist() == [0, 1, 2, 3, 4]
    assert ds.get(3, 1, 2).tolist() == [0, 42]
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]  # no temp files left


def test_int32_and_multi_sequence_documents(tmp_path):
    prefix = tmp_path / "wide"
    with IndexedDatasetWriter(prefix, np.int32) as w:
        w.add_item([200000, 1])
        w.add_item([3])
        w.end_document()
        w.add_document([199999])
    version, code, seqs, doc_idx, _ = independent_read(prefix)
    assert code == 4 and seqs == [[200000, 1], [3], [199999]] and doc_idx == [0, 2, 3]
    ds = IndexedDataset(str(prefix) + ".bin")  # PREFIX.bin accepted as well
    assert ds.num_documents == 2 and ds[0].dtype == np.int32


def test_best_dtype_rule():
    assert best_dtype(32000) == np.uint16 and best_dtype(65536) == np.uint16
    assert best_dtype(65537) == np.int32 and best_dtype(200019) == np.int32


def test_writer_refuses_ids_that_do_not_fit(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "x", np.uint16)
    with pytest.raises(ValueError, match="int32"):
        w.add_document(np.array([70000], dtype=np.int64))
    w.abort()
    assert os.listdir(tmp_path) == []


def test_interrupted_writer_leaves_nothing_and_keeps_old_output(tmp_path):
    prefix = tmp_path / "ds"
    write(prefix, DOCS)
    before = (prefix.with_suffix(".bin").read_bytes(), prefix.with_suffix(".idx").read_bytes())
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix) as w:
            w.add_document([1, 2, 3])
            assert any(".tmp-" in f for f in os.listdir(tmp_path))  # writing to temp names
            raise RuntimeError("killed")
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]
    assert (prefix.with_suffix(".bin").read_bytes(), prefix.with_suffix(".idx").read_bytes()) == before


@pytest.fixture
def pair(tmp_path):
    prefix = tmp_path / "ds"
    write(prefix, [[1, 2, 3, 4]] * 10)
    return prefix


def test_truncated_bin_refused(pair):
    b = pair.with_suffix(".bin")
    b.write_bytes(b.read_bytes()[:-3])
    with pytest.raises(IndexedDatasetError, match=r"\.bin is truncated.*preprocess"):
        IndexedDataset(pair)


def test_bin_with_trailing_bytes_refused(pair):
    with open(pair.with_suffix(".bin"), "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(IndexedDatasetError, match="trailing bytes"):
        IndexedDataset(pair)


@pytest.mark.parametrize("offset,value,message", [
    (0, b"XXIDIDX\x00\x00", "bad magic"),
    (9, struct.pack("<Q", 2), "version 2"),
    (17, struct.pack("<B", 9), "dtype code 9"),
    (18, struct.pack("<Q", 11), "implies"),                 # header sequence count disagrees
    (34 + 4 * 3, struct.pack("<i", 7), "(truncated|pointer)"),  # a size changed
    (34 + 40 + 8 * 2, struct.pack("<q", 12), "pointer of sequence 2"),
    (34 + 40 + 80 + 8 * 10, struct.pack("<q", 9), "doc_idx"),
])
def test_corrupted_idx_refused(pair, offset, value, message):
    idx = pair.with_suffix(".idx")
    raw = bytearray(idx.read_bytes())
    raw[offset:offset + len(value)] = value
    idx.write_bytes(bytes(raw))
    with pytest.raises(IndexedDatasetError, match=message):
        IndexedDataset(pair)


def test_truncated_idx_and_missing_files(pair, tmp_path):
    idx = pair.with_suffix(".idx")
    idx.write_bytes(idx.read_bytes()[:-8])
    with pytest.raises(IndexedDatasetError, match="truncated"):
        IndexedDataset(pair)
    idx.write_bytes(b"MMID")
    with pytest.raises(IndexedDatasetError, match="header"):
        IndexedDataset(pair)
    with pytest.raises(IndexedDatasetError, match="no such file"):
        IndexedDataset(tmp_path / "missing")


def test_headerless_token_files(tmp_path):
    toks = np.arange(1000, dtype=np.uint16)
    p = tmp_path / "train.bin"
    toks.tofile(p)
    ds = open_token_dataset(f"{p}:uint16")
    assert isinstance(ds, HeaderlessTokenDataset) and ds.num_tokens == 1000
    small = HeaderlessTokenDataset(p, np.uint16, chunk_tokens=300)
    assert small.sizes.tolist() == [300, 300, 300, 100]
    assert np.concatenate([small[i] for i in range(len(small))]).tolist() == toks.tolist()
    assert open_token_dataset(p, dtype="uint32").num_tokens == 500
    with pytest.raises(IndexedDatasetError, match=":uint16"):
        open_token_dataset(p)  # no .idx and no dtype
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(IndexedDatasetError, match="not a multiple"):
        open_token_dataset(f"{p}:uint16")


def raw_pair(prefix, sizes, doc_idx, code=8, itemsize=2):
    """A .bin/.idx pair written byte by byte from the published layout (no megamoe code)."""
    sizes = np.asarray(sizes, dtype="<i4")
    pointers = np.concatenate([[0], np.cumsum(sizes[:-1].astype(np.int64) * itemsize)]).astype("<i8")[:len(sizes)]
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(sizes), len(doc_idx)))
        f.write(sizes.tobytes() + pointers.tobytes() + np.asarray(doc_idx, dtype="<i8").tobytes())
    with open(f"{prefix}.bin", "wb") as f:
        f.write(np.arange(int(sizes.sum()), dtype=np.uint16).tobytes())
    return prefix


def test_reader_edge_cases(tmp_path):
    """Empty datasets, documents without sequences, index bounds and get() defaults."""
    write(tmp_path / "empty", [])
    empty = IndexedDataset(tmp_path / "empty")
    assert (len(empty), empty.num_tokens, empty.num_documents) == (0, 0, 0)
    # a document with no sequence (doc_idx repeats an entry) is valid Megatron layout
    ds = IndexedDataset(raw_pair(tmp_path / "gap", [2, 3], [0, 1, 1, 2]))
    assert (ds.num_documents, ds.num_tokens) == (3, 5) and ds[1].tolist() == [2, 3, 4]
    for doc_idx in ([0, 2, 1, 2], []):   # decreasing; no entry at all
        with pytest.raises(IndexedDatasetError, match="doc_idx must start at 0"):
            IndexedDataset(raw_pair(tmp_path / "bad", [2, 3], doc_idx))
    write(tmp_path / "ds", DOCS)
    ds = IndexedDataset(tmp_path / "ds")
    assert ds.num_tokens == sum(len(d) for d in DOCS)
    assert ds[-len(ds)].tolist() == DOCS[0] and ds[len(ds) - 1].tolist() == DOCS[-1]
    for i in (len(ds), -len(ds) - 1):
        with pytest.raises(IndexError):
            ds[i]
    assert ds.get(3).tolist() == DOCS[3] and ds.get(3, 1, 2).tolist() == DOCS[3][1:3]


def test_readers_never_write_to_the_token_files(tmp_path):
    """Every array a reader hands out is a read-only view: a caller's in-place edit raises instead
    of rewriting the dataset on disk."""
    write(tmp_path / "ds", DOCS)
    ds = IndexedDataset(tmp_path / "ds")
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "raw.bin")
    raw = HeaderlessTokenDataset(tmp_path / "raw.bin", np.uint16, chunk_tokens=30)
    for a in (ds.sizes, ds.pointers, ds.doc_idx, ds[0], ds.get(3, 1), raw[0], raw.get(1, 2, 5)):
        assert not a.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            a[...] = 0


def test_prefix_spellings_and_headerless_specs(tmp_path):
    """PREFIX, PREFIX.bin and PREFIX.idx name the same pair, unless the prefix itself ends in .bin;
    a `:dtype` suffix is split at the last colon; an explicit dtype takes the path literally."""
    write(tmp_path / "ds", DOCS)
    for spec in ("ds", "ds.bin", "ds.idx"):
        assert IndexedDataset(tmp_path / spec).prefix == str(tmp_path / "ds")
        assert isinstance(open_token_dataset(tmp_path / spec), IndexedDataset)
    write(tmp_path / "corpus.bin", DOCS)            # files corpus.bin.bin + corpus.bin.idx
    assert IndexedDataset(tmp_path / "corpus.bin").prefix == str(tmp_path / "corpus.bin")
    colon = tmp_path / "run:v1"
    colon.mkdir()
    np.arange(64, dtype=np.uint16).tofile(colon / "train.bin")
    ds = open_token_dataset(f"{colon}/train.bin:uint16")
    assert ds.path == str(colon / "train.bin") and ds.num_tokens == 64 and type(ds.num_tokens) is int
    np.arange(64, dtype=np.uint16).tofile(tmp_path / "literal.bin:uint16")
    assert open_token_dataset(tmp_path / "literal.bin:uint16", dtype="uint32").num_tokens == 32
    assert ds.sizes.dtype == np.int32 and ds.doc_idx.dtype == np.int64   # IndexedDataset's interface


def test_writer_lifecycle_leaves_no_stray_files(tmp_path, monkeypatch):
    """Temp files live beside the output (not in the working directory); finalize is idempotent;
    a forgotten writer removes its temp files when collected; finalize after abort writes nothing;
    float dtypes are written without an integer range check."""
    import gc
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    out.mkdir(), cwd.mkdir()
    monkeypatch.chdir(cwd)
    w = IndexedDatasetWriter(out / "a", np.uint16)
    w.add_document([1, 2, 3])
    moves = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moves.append((a, b)), real_replace(a, b)))
    w.finalize()
    w.finalize()
    monkeypatch.setattr(os, "replace", real_replace)
    # both temp files were written beside their targets: the renames are atomic (same filesystem)
    assert len(moves) == 2 and all(os.path.dirname(a) == os.path.dirname(b) == str(out) for a, b in moves)
    assert sorted(os.listdir(out)) == ["a.bin", "a.idx"] and IndexedDataset(out / "a")[0].tolist() == [1, 2, 3]
    forgotten = IndexedDatasetWriter(out / "b", np.uint16)
    forgotten.add_document([4])
    del forgotten
    gc.collect()
    assert sorted(os.listdir(out)) == ["a.bin", "a.idx"]
    aborted = IndexedDatasetWriter(out / "c", np.uint16)
    aborted.add_document([5])
    aborted.abort()
    aborted.finalize()
    assert sorted(os.listdir(out)) == ["a.bin", "a.idx"] and os.listdir(cwd) == []
    with IndexedDatasetWriter(out / "f", np.float32) as fw:
        fw.add_document([0.5, -1e9, 3.25])
    assert IndexedDataset(out / "f")[0].tolist() == [0.5, -1e9, 3.25]
