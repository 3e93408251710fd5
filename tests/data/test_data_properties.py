"""Property-based and brute-force checks of the data path: index files with random document
lengths against a reader written from Megatron's layout, packing against a plain concatenation,
and blending against a sample-by-sample replay of Megatron's greedy rule over many periods."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megamoe.data.dataset import BLEND_PERIOD, BlendedDataset, PackedDataset
from megamoe.data.indexed import IndexedDataset, IndexedDatasetWriter

from test_data_indexed import independent_read  # noqa: E402  (pytest puts this folder on sys.path)

documents = st.lists(st.lists(st.integers(0, 65535), min_size=0, max_size=40), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(documents)
def test_index_round_trip_with_random_document_lengths(docs):
    with tempfile.TemporaryDirectory() as d:
        prefix = Path(d) / "ds"
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            for doc in docs:
                w.add_document(doc)
        assert w.num_tokens == sum(map(len, docs))
        _, _, seqs, doc_idx, nbytes = independent_read(prefix)
        assert seqs == docs and doc_idx == list(range(len(docs) + 1)) and nbytes == 2 * sum(map(len, docs))
        ds = IndexedDataset(prefix)
        assert len(ds) == len(docs) and ds.sizes.tolist() == [len(x) for x in docs]
        for i, doc in enumerate(docs):
            assert ds[i].tolist() == doc
            if doc:
                off = len(doc) // 3
                assert ds.get(i, off, len(doc) - off).tolist() == doc[off:]
                assert ds.get(i, off).tolist() == doc[off:]


class ListTokens:
    """An in-memory stand-in with the reader interface PackedDataset uses."""

    def __init__(self, docs):
        self.docs = [np.asarray(d, dtype=np.int64) for d in docs]
        self.sizes = np.array([len(d) for d in docs], dtype=np.int64)

    def get(self, i, offset=0, length=None):
        d = self.docs[i]
        return d[offset:] if length is None else d[offset:offset + length]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=20), st.integers(1, 16), st.integers(0, 1000))
def test_packing_is_a_shuffled_cut_of_the_concatenated_epoch(lengths, seq_length, seed):
    if sum(lengths) - 1 < seq_length:
        return
    docs = [list(range(1000 * i, 1000 * i + n)) for i, n in enumerate(lengths)]  # every token unique
    ds = PackedDataset(ListTokens(docs), np.arange(len(docs)), seq_length, seed)
    n = len(ds)
    assert n == (sum(lengths) - 1) // seq_length
    for epoch in range(2):
        samples = [ds[epoch * n + j] for j in range(n)]
        # the samples are the cuts [j*S, j*S + S + 1) of one ordering of whole documents, permuted
        firsts = {int(s[0]): s for s in samples}
        assert len(firsts) == n
        stream = np.concatenate([ds.indexed.docs[k] for k in ds._epoch(epoch)[0]])
        assert sorted(firsts) == sorted(int(stream[j * seq_length]) for j in range(n))
        for j in range(n):
            cut = stream[j * seq_length: j * seq_length + seq_length + 1]
            assert np.array_equal(firsts[int(cut[0])], cut)
        assert sorted(len(d) for d in ds.indexed.docs) == sorted(lengths)


class Labelled:
    """Component `c` returns (c, j) for its sample j, so a blend's output says where it came from."""

    def __init__(self, c):
        self.c = c

    def __len__(self):
        return 10

    def __getitem__(self, j):
        return (self.c, int(j))


def greedy_choice(weights: np.ndarray, period: int) -> list[int]:
    """Megatron's build_blending_indices, sample by sample: serve the dataset lagging its share most
    (first one on ties), restarting the error count every `period` samples (megamoe's documented rule)."""
    out, counts = [], np.zeros(len(weights))
    for k in range(period):
        err = [weights[c] * max(k, 1) - counts[c] for c in range(len(weights))]
        c = max(range(len(weights)), key=lambda i: (err[i], -i))
        out.append(c)
        counts[c] += 1
    return out


def replay(weights, period, n):
    """(component, its sample) for global samples 0..n-1 and the consumed counts after each prefix."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    choice = greedy_choice(w, period)
    served = [0] * len(w)
    seq, consumed = [], [list(served)]
    for i in range(n):
        c = choice[i % period]
        seq.append((c, served[c]))       # each component serves 0, 1, 2, ... in order, never restarting
        served[c] += 1
        consumed.append(list(served))
    return seq, consumed


def check_blend(weights, period, n, probes):
    blend = BlendedDataset([Labelled(c) for c in range(len(weights))], weights, period=period)
    seq, consumed = replay(weights, period, n)
    for i in probes:
        assert blend[i] == seq[i], (i, blend[i], seq[i])
        assert blend.consumed_per_dataset(i) == consumed[i], i
    return seq


def test_blend_beyond_several_default_periods():
    """Past BLEND_PERIOD (10,000) samples each component keeps counting up, and the served shares
    follow the weights over the whole range."""
    n = 3 * BLEND_PERIOD + 1234
    weights = [0.5, 0.3, 0.2]
    probes = list(range(0, n, 97)) + [BLEND_PERIOD - 1, BLEND_PERIOD, BLEND_PERIOD + 1, 2 * BLEND_PERIOD + 7, n - 1]
    seq = check_blend(weights, BLEND_PERIOD, n, probes)
    counts = np.bincount([c for c, _ in seq], minlength=3)
    assert np.allclose(counts / n, weights, atol=1e-3)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.01, 10.0), min_size=1, max_size=5), st.integers(1, 60), st.integers(0, 400))
def test_blend_with_random_weights_and_periods(weights, period, n_extra):
    n = 3 * period + n_extra
    check_blend(weights, period, n, range(n))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 3000), st.integers(1, 700), st.sampled_from(["uint16", "uint32", "int32"]))
def test_headerless_reader_against_the_raw_array(n, chunk, dtype):
    """Pseudo-documents of `chunk` tokens tile the file exactly; get() slices them like numpy,
    and the arrays Megatron's index would have (sizes, pointers, doc_idx) are consistent."""
    from megamoe.data.indexed import HeaderlessTokenDataset
    with tempfile.TemporaryDirectory() as d:
        toks = (np.arange(n, dtype=np.int64) * 7919 % 60000).astype(dtype)
        p = Path(d) / "train.bin"
        toks.tofile(p)
        ds = HeaderlessTokenDataset(p, dtype, chunk_tokens=chunk)
        k = -(-n // chunk)
        assert len(ds) == ds.num_documents == k and ds.num_tokens == n
        assert ds.sizes.tolist() == [min(chunk, n - i * chunk) for i in range(k)]
        assert ds.pointers.tolist() == [i * chunk * toks.itemsize for i in range(k)]
        assert ds.doc_idx.tolist() == list(range(k + 1))
        for i in range(k):
            doc = toks[i * chunk: (i + 1) * chunk]
            assert ds[i].tolist() == doc.tolist() and ds.get(i).tolist() == doc.tolist()
            off = len(doc) // 2
            assert ds.get(i, off).tolist() == doc[off:].tolist()
            assert ds.get(i, off, 1).tolist() == doc[off:off + 1].tolist()
        import pickle
        again = pickle.loads(pickle.dumps(ds))
        assert again.sizes.tolist() == ds.sizes.tolist() and all(
            again[i].tolist() == ds[i].tolist() for i in range(k))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 60), st.lists(st.one_of(st.just(0.0), st.floats(0.01, 5.0)), min_size=1, max_size=4))
def test_split_documents_properties(num_docs, fractions):
    """Contiguous, disjoint, covering ranges; sizes within one document of the fraction; every
    non-zero fraction served when there are enough documents (Megatron's rule)."""
    from megamoe.data.dataset import split_documents
    if sum(fractions) <= 0:
        return
    parts = split_documents(num_docs, fractions)
    assert len(parts) == len(fractions)
    assert np.concatenate(parts).tolist() == list(range(num_docs))
    assert all(p.dtype == np.int64 for p in parts)
    share = np.asarray(fractions) / sum(fractions)
    nonzero = int((share > 0).sum())
    for p, f in zip(parts, share):
        if f == 0:
            assert len(p) == 0
        elif nonzero <= num_docs:
            assert len(p) >= 1
        assert abs(len(p) - f * num_docs) <= len(fractions) + 1


def test_split_documents_regressions():
    """Rounding each count on its own once put document 3 of 3 into a split, and a zero split
    got the only document (now the second split has it: round half to even, as Megatron)."""
    from megamoe.data.dataset import split_documents
    assert [p.tolist() for p in split_documents(3, [1, 1, 0])] == [[0, 1], [2], []]
    assert [p.tolist() for p in split_documents(1, [1, 1, 0])] == [[], [0], []]
    assert [p.tolist() for p in split_documents(5, [0.5, 0.5, 0])] == [[0, 1], [2, 3, 4], []]
    assert [p.tolist() for p in split_documents(100, [99, 1])] == [list(range(99)), [99]]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(0, 20), st.integers(1, 40))
def test_batch_iterator_walks_global_samples_in_rank_slices(world, micro, consumed, total):
    """Step t gives rank r the global samples [c + r*B, c + (r+1)*B) with c = consumed + t*B*W, and
    stops before a step would pass num_samples."""
    import torch

    from megamoe.data.dataset import DistributedBatchIterator

    class Ids:
        def __getitem__(self, i):
            return np.array([i, i + 1000], dtype=np.int64)
    its = [DistributedBatchIterator(Ids(), micro, r, world, consumed_samples=consumed, num_samples=total)
           for r in range(world)]
    c = consumed
    while c + micro * world <= total:
        for r, it in enumerate(its):
            b = next(it)
            want = list(range(c + r * micro, c + (r + 1) * micro))
            assert b["input_ids"][:, 0].tolist() == want and b["labels"][:, 0].tolist() == [x + 1000 for x in want]
            assert b["input_ids"].dtype == torch.int64
            assert it.state_dict() == {"consumed_samples": c + micro * world, "consumed_per_dataset": None}
        c += micro * world
    for it in its:
        with pytest.raises(StopIteration):
            next(it)


def test_batch_iterator_rejects_a_rank_outside_the_world():
    from megamoe.data.dataset import DistributedBatchIterator
    for rank in (-1, 2):
        with pytest.raises(ValueError, match="dp_rank"):
            DistributedBatchIterator([], 1, rank, 2)


def test_blend_validation_and_zero_weights():
    with pytest.raises(ValueError, match="one weight per dataset"):
        BlendedDataset([Labelled(0), Labelled(1)], [1.0])
    with pytest.raises(ValueError, match="one weight per dataset"):
        BlendedDataset([], [])
    for bad in ([1.0, -0.5], [0.0, 0.0]):
        with pytest.raises(ValueError, match="non-negative"):
            BlendedDataset([Labelled(0), Labelled(1)], bad)
    blend = BlendedDataset([Labelled(0), Labelled(1), Labelled(2)], [0.5, 0.0, 0.5], period=50)
    assert {blend[i][0] for i in range(200)} == {0, 2}            # a zero weight is allowed, never served
    assert blend.consumed_per_dataset(200) == [100, 0, 100]


def test_parse_data_path_forms():
    from megamoe.data.dataset import parse_data_path
    assert parse_data_path(["a"]) == ([1.0], ["a"])
    assert parse_data_path("0.7 a 0.3 b") == ([0.7, 0.3], ["a", "b"])
    assert parse_data_path(["0.7 a", "0.3", "b"]) == ([0.7, 0.3], ["a", "b"])
    for bad in (["a", "b"], ["0.5", "a", "0.5"], ["a", "0.5", "b", "0.5"]):
        with pytest.raises(ValueError, match="WEIGHT PATH"):
            parse_data_path(bad)
    with pytest.raises(ValueError, match="empty"):
        parse_data_path([])


def _write(prefix, docs):
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for doc in docs:
            w.add_document(doc)
    return prefix


def test_golden_data_order(tmp_path):
    """The sample order for a fixed seed is part of the data contract (runs resumed across megamoe
    versions read on where they stopped): the first samples of a two-source blend, pinned."""
    from megamoe.data.dataset import build_pretraining_data
    a = _write(tmp_path / "a", [[1000 * d + t for t in range(3 + d % 5)] for d in range(40)])
    b = _write(tmp_path / "b", [[50000 + 100 * d + t for t in range(2 + d % 3)] for d in range(30)])
    train, valid = build_pretraining_data(["0.6", str(a), "0.4", str(b)], seq_length=4, seed=9, splits=(0.8, 0.2))
    firsts = [int(train[i][0]) for i in range(12)]
    assert firsts == GOLDEN_TRAIN, firsts
    assert [int(valid[i][0]) for i in range(4)] == GOLDEN_VALID
    assert [d.name for d in train.datasets] == [f"{a}[train]", f"{b}[train]"]


GOLDEN_TRAIN = [17000, 50801, 27003, 51900, 2003, 13002, 52101, 3003, 50901, 19004, 14002, 52200]
GOLDEN_VALID = [39000, 52903, 39004, 52600]


def test_a_source_too_small_for_validation_leaves_the_others(tmp_path):
    """A tiny validation split of one source is skipped, not the rest of the sources after it."""
    from megamoe.data.dataset import build_pretraining_data
    small = _write(tmp_path / "small", [[5, 6, 7, 8, 9, 10]] * 9 + [[1]])     # valid: one 1-token document
    big = _write(tmp_path / "big", [list(range(100 * d, 100 * d + 20)) for d in range(10)])
    train, valid = build_pretraining_data(["0.5", str(small), "0.5", str(big)], seq_length=4, seed=1,
                                          splits=(0.9, 0.1))
    assert len(train.datasets) == 2
    assert [d.name for d in valid.datasets] == [f"{big}[valid]"]
    with pytest.raises(ValueError, match="not enough"):
        build_pretraining_data(["0.5", str(big), "0.5", str(_write(tmp_path / "tiny", [[1, 2]]))], 4, 1, (1.0, 0.0))


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "-1"])
def test_blend_weights_must_be_finite_and_non_negative(weight):
    from megamoe.data.dataset import BlendedDataset, parse_data_path
    with pytest.raises(ValueError, match=f"finite numbers >= 0; got {weight} \\(for b\\)"):
        parse_data_path(["1", "a", weight, "b"])
    with pytest.raises(ValueError, match="positive sum"):
        parse_data_path(["0", "a", "0", "b"])
    with pytest.raises(ValueError, match="non-negative"):
        BlendedDataset([[0], [1]], [1.0, float(weight)])


def test_batches_with_token_ids_beyond_the_vocabulary_are_refused(tmp_path):
    from megamoe.data import DataError, DistributedBatchIterator, IndexedDatasetWriter, build_pretraining_data
    for name, hi in (("ok", 100), ("wide", 5000)):
        with IndexedDatasetWriter(str(tmp_path / name), np.uint16) as w:
            for d in range(20):
                w.add_document(list(range(d, d + 30)) + [hi - 1])
    blend, = build_pretraining_data(["1", str(tmp_path / "ok"), "1", str(tmp_path / "wide")], 16, splits=(1.0,))
    it = DistributedBatchIterator(blend, 4, vocab_size=4096)
    with pytest.raises(DataError, match=r"token id 4999 >= the model's vocab_size 4096 in global sample \d+ \(.*wide"):
        for _ in range(10):
            next(it)
    ok, = build_pretraining_data([str(tmp_path / "ok")], 16, splits=(1.0,))
    it = DistributedBatchIterator(ok, 4, vocab_size=100)
    for _ in range(5):
        next(it)   # ids up to 99 < 100: fine
    with pytest.raises(DataError, match="token id 99 >= the model's vocab_size 99"):
        for _ in range(5):
            next(DistributedBatchIterator(ok, 4, vocab_size=99))   # id 99 is one past the last row


def test_an_empty_train_split_is_a_clear_error(tmp_path):
    from megamoe.data import DataError, IndexedDatasetWriter
    from megamoe.trainer import build_data
    from megamoe.train_config import DataConfig
    with IndexedDatasetWriter(str(tmp_path / "d"), np.uint16) as w:
        for d in range(10):
            w.add_document(list(range(40)))
    with pytest.raises(DataError, match="--split 0,1 leaves no training documents"):
        build_data(DataConfig(data_path=[str(tmp_path / "d")], split="0,1", seq_length=16))
    with pytest.raises(DataError, match="finite numbers >= 0"):
        build_data(DataConfig(data_path=["nan", str(tmp_path / "d")], seq_length=16))
    train, valid = build_data(DataConfig(data_path=[str(tmp_path / "d")], split="1,0", seq_length=16))
    assert train is not None and valid is None


def test_split_documents_refusals_and_repairs():
    """Fractions must be non-negative with a positive sum; a non-zero fraction that Megatron's
    rounding leaves empty takes one document from the largest split (when there are enough)."""
    from megamoe.data.dataset import split_documents
    for bad in ([0, 0], [0.0], [-0.5, 1.5], [1.0, -0.1]):
        with pytest.raises(ValueError, match="non-negative with a positive sum"):
            split_documents(5, bad)
    parts = lambda n, fr: [p.tolist() for p in split_documents(n, fr)]   # noqa: E731
    assert parts(2, [0.9, 0.1]) == [[0], [1]]            # as many non-zero fractions as documents
    assert parts(2, [0.1, 0.9]) == [[0], [1]]            # the donor is the largest split, not the first
    assert parts(2, [0.9, 0.0, 0.1]) == [[0], [], [1]]   # zero fractions do not count as needing one
    assert parts(4, [0.05, 0.05, 0.9]) == [[0], [1], [2, 3]]
    assert parts(2, [0.5, 0.3, 0.2]) == [[0], [1], []]   # more non-zero fractions than documents: plain rounding


def test_build_pretraining_data_splits_names_and_defaults(tmp_path):
    """Every split of every source is built (a skipped one does not end the loop), named
    prefix[train|valid|test|k]; the default seed is Megatron's 1234; headerless_dtype applies to
    paths without a :dtype suffix; a split whose fraction rounds to no document is None."""
    from megamoe.data.dataset import build_pretraining_data, sample_source
    a = _write(tmp_path / "a", [list(range(100 * d, 100 * d + 20)) for d in range(20)])
    four = build_pretraining_data([str(a)], 4, seed=3, splits=(0.4, 0.0, 0.3, 0.3))
    assert four[1] is None and [d.name for d in (four[0], four[2], four[3])] == [f"{a}[train]", f"{a}[test]", f"{a}[3]"]
    five = build_pretraining_data([str(a)], 4, seed=3, splits=(0.4, 0.2, 0.2, 0.1, 0.1))
    assert [d.name for d in five] == [f"{a}[{s}]" for s in ("train", "valid", "test", 3, 4)]
    # a tiny middle split of one source (one 1-token document) is skipped, the one after it is not
    b = _write(tmp_path / "b", [list(range(10))] * 8 + [[1]] + [list(range(10))])
    train, tiny, last = build_pretraining_data([str(b)], 4, seed=3, splits=(0.8, 0.1, 0.1))
    assert tiny is None and last is not None and last.name == f"{b}[test]"
    default = build_pretraining_data([str(a)], 4)[0]
    assert all(np.array_equal(default[i], build_pretraining_data([str(a)], 4, seed=1234)[0][i]) for i in range(8))
    assert not all(np.array_equal(default[i], build_pretraining_data([str(a)], 4, seed=1235)[0][i]) for i in range(8))
    np.arange(500, dtype=np.uint16).tofile(tmp_path / "raw.bin")
    raw, = build_pretraining_data([str(tmp_path / "raw.bin")], 8, splits=(1.0,), headerless_dtype="uint16")
    assert len(raw) == (500 - 1) // 8 and np.array_equal(np.diff(raw[0]), np.ones(8))
    one = _write(tmp_path / "one", [list(range(30))])
    empty, valid = build_pretraining_data([str(one)], 4, splits=(0.01, 0.99))   # train rounds to 0 docs
    assert empty is None and valid is not None
    # where a sample came from: the component's name, through nested blends; repr without a name
    blend = build_pretraining_data(["1", str(a), "1", str(b)], 4, splits=(1.0,))[0]
    assert blend.seq_length == 4
    nested = BlendedDataset([blend, four[3]], [0.5, 0.5])
    for i in range(0, 200, 7):
        c, j = nested.dataset_index(i)
        inner = nested.datasets[c]
        expect = inner.name if c == 1 else inner.datasets[inner.dataset_index(j)[0]].name
        assert sample_source(nested, i) == expect
    assert sample_source([[1, 2]], 0) == "[[1, 2]]"


def test_packed_dataset_names_itself_after_its_source():
    class Tokens:                     # any reader with sizes and get(); no prefix attribute
        sizes = np.array([10, 10])

        def get(self, idx, offset=0, length=None):
            return np.arange(offset, offset + length)

    ds = PackedDataset(Tokens(), np.arange(2), 4, seed=0)
    assert ds.name == "dataset" and PackedDataset(Tokens(), np.arange(2), 4, seed=0, name="x").name == "x"
    Tokens.prefix = "/data/corpus"
    assert PackedDataset(Tokens(), np.arange(2), 4, seed=0).name == "/data/corpus"
