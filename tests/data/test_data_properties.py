"""Property-based and brute-force checks of the data path: index files with random document
lengths against a reader written from Megatron's layout, packing against a plain concatenation,
and blending against a sample-by-sample replay of Megatron's greedy rule over many periods."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
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
        _, _, seqs, doc_idx, nbytes = independent_read(prefix)
        assert seqs == docs and doc_idx == list(range(len(docs) + 1)) and nbytes == 2 * sum(map(len, docs))
        ds = IndexedDataset(prefix)
        assert len(ds) == len(docs) and ds.sizes.tolist() == [len(x) for x in docs]
        for i, doc in enumerate(docs):
            assert ds[i].tolist() == doc
            if doc:
                off = len(doc) // 3
                assert ds.get(i, off, len(doc) - off).tolist() == doc[off:]


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
