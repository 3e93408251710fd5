"""Packing, shuffling, splits, blending, DP sharding and exact resume of the pretraining data."""
import numpy as np
import pytest
import torch

from megamoe.data.dataset import (BlendedDataset, DistributedBatchIterator, PackedDataset, Prefetcher,
                                  build_pretraining_data, parse_data_path, split_documents)
from megamoe.data.indexed import IndexedDataset, IndexedDatasetWriter

S = 16  # seq_length


def make(prefix, num_docs, base, seed=0):
    """Documents of random lengths whose tokens encode (dataset base, position) for checking."""
    rng = np.random.default_rng(seed)
    docs = []
    with IndexedDatasetWriter(prefix, np.int32) as w:
        pos = 0
        for _ in range(num_docs):
            n = int(rng.integers(1, 40))
            d = np.arange(pos, pos + n) + base
            pos += n
            w.add_document(d)
            docs.append(d)
    return str(prefix), docs


@pytest.fixture
def one(tmp_path):
    return make(tmp_path / "a", 300, base=0)


def test_packing_follows_the_epoch_permutation(one):
    prefix, docs = one
    ds = PackedDataset(IndexedDataset(prefix), np.arange(len(docs)), S, seed=3)
    total = sum(len(d) for d in docs)
    assert len(ds) == (total - 1) // S
    docs_in_order, _ends, perm = ds._epoch(0)
    stream = np.concatenate([docs[int(d)] for d in docs_in_order])  # int64[total]
    samples = np.stack([ds[i] for i in range(len(ds))])  # [N, S+1]
    assert samples.shape == (len(ds), S + 1) and samples.dtype == np.int64
    for i in range(len(ds)):
        k = int(perm[i])
        assert np.array_equal(samples[i], stream[k * S:k * S + S + 1])
    # every packed position of the epoch is served exactly once, crossing doc boundaries
    starts = sorted(int(s[0]) for s in samples)
    assert len(set(starts)) == len(ds)


def test_shuffle_is_deterministic_and_epochs_reshuffle(one):
    prefix, docs = one
    idx = IndexedDataset(prefix)
    a = PackedDataset(idx, np.arange(len(docs)), S, seed=7)
    b = PackedDataset(idx, np.arange(len(docs)), S, seed=7)
    c = PackedDataset(idx, np.arange(len(docs)), S, seed=8)
    n = len(a)
    assert all(np.array_equal(a[i], b[i]) for i in range(0, 3 * n, 7))
    assert not all(np.array_equal(a[i], c[i]) for i in range(10))
    epoch0 = np.stack([a[i] for i in range(n)])
    epoch1 = np.stack([a[n + i] for i in range(n)])
    assert not np.array_equal(epoch0, epoch1)  # a new epoch seed ...
    assert not np.array_equal(a._epoch(0)[0], a._epoch(1)[0])  # documents re-permuted too
    assert epoch1.min() >= 0 and len(np.unique(epoch1[:, 0])) == n  # ... still a full epoch


def test_splits_are_disjoint_documents(one):
    prefix, docs = one
    assert [len(x) for x in split_documents(10, (0.99, 0.01))] == [9, 1]  # valid gets >= 1 doc
    assert [len(x) for x in split_documents(300, (0.9, 0.05, 0.05))] == [270, 15, 15]
    train, valid = build_pretraining_data([prefix], S, seed=1, splits=(0.9, 0.1))
    assert len(train.documents) == 270 and len(valid.documents) == 30
    assert not set(train.documents.tolist()) & set(valid.documents.tolist())
    valid_tokens = set(np.concatenate([docs[i] for i in valid.documents]).tolist())
    assert all(set(valid[i].tolist()) <= valid_tokens for i in range(len(valid)))
    tr, va = build_pretraining_data(prefix, S, seed=1, splits=(1.0, 0.0))
    assert va is None and len(tr.documents) == 300


def test_resume_and_dp_sharding_give_the_same_batches(one):
    prefix, _ = one
    train, _ = build_pretraining_data([prefix], S, seed=5)
    steps = 3 * len(train) // 8 + 5  # crosses epoch boundaries
    full = DistributedBatchIterator(train, micro_batch_size=8)
    uninterrupted = [next(full) for _ in range(steps)]
    b = uninterrupted[0]
    assert b["input_ids"].shape == (8, S) and b["input_ids"].dtype == torch.long
    assert torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:])  # labels are next tokens
    # resume at consumed_samples = k from a fresh process-like object
    k_steps = 11
    resumed = DistributedBatchIterator(train, 8, consumed_samples=k_steps * 8)
    for t in range(k_steps, steps):
        got = next(resumed)
        assert torch.equal(got["input_ids"], uninterrupted[t]["input_ids"])
        assert torch.equal(got["labels"], uninterrupted[t]["labels"])
    assert resumed.consumed_samples == steps * 8
    # 2 ranks x micro batch 4 cover the same global samples as 1 rank x 8, in rank order
    ranks = [DistributedBatchIterator(train, 4, dp_rank=r, dp_world_size=2, consumed_samples=88) for r in (0, 1)]
    for t in range(k_steps, k_steps + 5):
        both = torch.cat([next(ranks[0])["input_ids"], next(ranks[1])["input_ids"]])
        assert torch.equal(both, uninterrupted[t]["input_ids"])
    it = DistributedBatchIterator(train, 4, num_samples=10)
    assert len(list(it)) == 2


def test_blending_proportions_and_consumed_counts(tmp_path):
    pa, _ = make(tmp_path / "a", 200, base=0, seed=1)
    pb, _ = make(tmp_path / "b", 100, base=1_000_000, seed=2)
    pc, _ = make(tmp_path / "c", 100, base=2_000_000, seed=3)
    assert parse_data_path(["0.5", pa, "0.3 " + pb, "0.2", pc]) == ([0.5, 0.3, 0.2], [pa, pb, pc])
    assert parse_data_path(pa) == ([1.0], [pa])
    with pytest.raises(ValueError):
        parse_data_path([pa, pb])
    train, valid = build_pretraining_data(["5", pa, "3", pb, "2", pc], S, seed=9)
    assert isinstance(train, BlendedDataset) and isinstance(valid, BlendedDataset)
    n = 6000  # several epochs of the small components
    src = np.array([int(train[i][0]) // 1_000_000 for i in range(n)])
    frac = np.bincount(src, minlength=3) / n
    assert np.allclose(frac, [0.5, 0.3, 0.2], atol=0.01)
    assert np.allclose(np.bincount(src[:100], minlength=3) / 100, [0.5, 0.3, 0.2], atol=0.02)
    for m in (0, 1, 99, 4321, n):
        assert train.consumed_per_dataset(m) == np.bincount(src[:m], minlength=3).tolist()
    big = 10 ** 9 + 17  # O(1) for any count
    assert abs(sum(train.consumed_per_dataset(big)) - big) == 0
    # each component serves its own samples in order 0, 1, 2, ...
    c, j = train.dataset_index(4321)
    assert j == train.consumed_per_dataset(4321)[c]
    assert np.array_equal(train[4321], train.datasets[c][j])
    # resume through a blended dataset
    it = DistributedBatchIterator(train, 4)
    seq = [next(it)["input_ids"] for _ in range(30)]
    it2 = DistributedBatchIterator(train, 4, consumed_samples=80)
    assert all(torch.equal(next(it2)["input_ids"], seq[t]) for t in range(20, 30))
    assert it2.state_dict()["consumed_per_dataset"] == train.consumed_per_dataset(120)


def test_headerless_and_too_small(tmp_path):
    toks = np.arange(5000, dtype=np.uint16)
    toks.tofile(tmp_path / "train.bin")
    train, valid = build_pretraining_data([f"{tmp_path}/train.bin:uint16"], 64, seed=0, splits=(1, 0))
    x = train[0]
    assert np.array_equal(np.diff(x), np.ones(64))  # contiguous stream slices
    assert len(train) == (5000 - 1) // 64
    with pytest.raises(ValueError, match="not enough for one sample"):
        build_pretraining_data([f"{tmp_path}/train.bin:uint16"], 8192, seed=0)


def test_datasets_pickle_without_copying_tokens(tmp_path):
    import pickle

    pa, _ = make(tmp_path / "a", 200, base=0, seed=1)
    pb, _ = make(tmp_path / "b", 100, base=1_000_000, seed=2)
    train, _ = build_pretraining_data(["1", pa, "1", pb], S, seed=4)
    blob = pickle.dumps(train)
    assert len(blob) < 400_000  # index arrays only; the token memmaps are reopened by path
    again = pickle.loads(blob)
    assert all(np.array_equal(again[i], train[i]) for i in range(0, 500, 13))


def test_prefetcher_reads_one_ahead_but_counts_what_it_handed_out(one):
    """The batch after the current one is already moved; a checkpoint taken after k batches still
    resumes at sample k x B (the batch read ahead is read again, not skipped)."""
    prefix, _ = one
    train, _ = build_pretraining_data([prefix], S, seed=5)
    plain = DistributedBatchIterator(train, 4)
    expected = [next(plain) for _ in range(6)]
    moved = []
    pre = Prefetcher(DistributedBatchIterator(train, 4), lambda b: moved.append(b) or b)
    assert pre.consumed_samples == 0 and not moved          # nothing read before the first request
    for k in range(1, 4):
        assert torch.equal(next(pre)["input_ids"], expected[k - 1]["input_ids"])
        assert pre.consumed_samples == 4 * k and len(moved) == k + 1   # one ahead, counted as not consumed
    resumed = DistributedBatchIterator(train, 4, consumed_samples=pre.consumed_samples)
    assert torch.equal(next(resumed)["input_ids"], expected[3]["input_ids"])
    assert pre.consumed_per_dataset() is None or sum(pre.consumed_per_dataset()) == 12
    short = Prefetcher(DistributedBatchIterator(train, 4, num_samples=10), lambda b: b)
    assert len(list(short)) == 2 and short.consumed_samples == 8


def test_batches_carry_their_documents_when_asked(one):
    from megamoe.kernels.attention import documents_of
    prefix, _ = one
    train, _ = build_pretraining_data([prefix], S, seed=5)
    eos = int(next(DistributedBatchIterator(train, 4))["input_ids"][0, 3])   # some token that occurs
    b = next(DistributedBatchIterator(train, 4, eos_id=eos))
    d = b["documents"]
    want = documents_of(b["input_ids"], eos)
    assert torch.equal(d.doc_ids_BS, want.doc_ids_BS) and torch.equal(d.cu_seqlens, want.cu_seqlens)
    assert d.cu_seqlens[-1] == 4 * S and len(d.cu_seqlens) > 5   # the rows, and at least one split inside
    assert "documents" not in next(DistributedBatchIterator(train, 4))


def test_prefetched_blend_reports_per_dataset_counts_of_what_it_handed_out(tmp_path):
    """Over a blend, the Prefetcher's per-dataset counts are the blend's counts at the samples
    handed out (not at the one read ahead); len and repr of a blend name its parts."""
    pa, _ = make(tmp_path / "a", 200, base=0, seed=1)
    pb, _ = make(tmp_path / "b", 100, base=1_000_000, seed=2)
    blend, _ = build_pretraining_data(["3", pa, "1", pb], S, seed=4)
    assert len(blend) == sum(len(d) for d in blend.datasets)
    assert repr(blend) == f"BlendedDataset([0.750:{blend.datasets[0]!r}, 0.250:{blend.datasets[1]!r}])"
    pre = Prefetcher(DistributedBatchIterator(blend, 4), lambda b: b)
    for _ in range(5):
        next(pre)
    assert pre.consumed_per_dataset() == blend.consumed_per_dataset(20) and sum(pre.consumed_per_dataset()) == 20
