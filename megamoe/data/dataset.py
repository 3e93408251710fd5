"""Pretraining datasets: document packing, deterministic shuffling, splits, blending, DP loading.

Sample semantics (all deterministic from ``seed``; nothing depends on the number of ranks):

* **Split.** Each source's documents are split into contiguous ranges by ``splits``
  (Megatron: ``0.99, 0.01`` -> first 99 % train, rest valid). A non-zero fraction gets at least
  one document when there are enough documents.
* **Packing.** In epoch ``e`` the split's documents are permuted with ``rng(seed, e)`` and
  concatenated into one token stream. Sample ``j`` of the epoch is stream tokens
  ``[j*S, j*S + S + 1)`` (``S = seq_length``), crossing document boundaries; consecutive samples
  overlap by the one token that is the last label of one and the first input of the next (as in
  Megatron). An epoch has ``(tokens - 1) // S`` samples; the tail is dropped.
* **Shuffling.** Within an epoch the sample order is permuted with ``rng(seed, e)`` too.
* **Epochs.** ``ds[i]`` is defined for every ``i >= 0``: ``i // len(ds)`` is the epoch and each
  epoch reshuffles with a new epoch seed, so training can run any number of iterations.
  ``len(ds)`` is the number of samples in one epoch.
* **Blending** (Megatron ``--data-path w1 p1 w2 p2``): weights are normalised; sample ``i``
  comes from the dataset chosen by Megatron's greedy rule (pick the dataset whose served count
  lags its weight most), computed over a fixed period of ``BLEND_PERIOD`` samples and repeated,
  so the choice for any ``i`` and the per-dataset consumed counts for any ``n`` are O(1).
  Each component serves its own samples in order ``0, 1, 2, ...`` (its own epochs).
* **Loading.** :class:`DistributedBatchIterator` walks global sample indices
  ``consumed, consumed+1, ...``; each step takes ``micro_batch_size * dp_world_size`` of them
  and rank ``r`` gets its contiguous slice. Resuming with ``consumed_samples=k`` yields exactly
  what an uninterrupted run would yield next, whatever ``dp_world_size`` is.
"""
from __future__ import annotations

import math

import threading
from collections import OrderedDict
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from .indexed import open_token_dataset

__all__ = ["PackedDataset", "BlendedDataset", "DistributedBatchIterator", "parse_data_path",
           "split_documents", "build_pretraining_data", "BLEND_PERIOD"]

BLEND_PERIOD = 10_000


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *keys])))


class PackedDataset:
    """Packs a subset of an indexed dataset's documents into ``seq_length + 1``-token samples.

    ``indexed``: an IndexedDataset / HeaderlessTokenDataset; ``documents``: int64[D] indices of
    the sequences in this split (order irrelevant, the epoch permutation decides).
    ``ds[i] -> np.ndarray[int64] of shape [seq_length + 1]`` for any ``i >= 0``.
    """

    def __init__(self, indexed, documents: np.ndarray, seq_length: int, seed: int, name: str = "",
                 cache_epochs: int = 2):
        self.indexed = indexed
        self.documents = np.asarray(documents, dtype=np.int64)
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.name = name or str(getattr(indexed, "prefix", "dataset"))
        doc_sizes = np.asarray(indexed.sizes, dtype=np.int64)[self.documents]  # int64[D]
        self.num_tokens = int(doc_sizes.sum())
        self.samples_per_epoch = max(0, (self.num_tokens - 1) // self.seq_length)
        if self.samples_per_epoch == 0:
            raise ValueError(f"{self.name}: {self.num_tokens} tokens in {len(self.documents)} documents "
                             f"are not enough for one sample of seq_length {self.seq_length} + 1")
        self._doc_sizes = doc_sizes
        self._cache: "OrderedDict[int, tuple]" = OrderedDict()
        self._cache_epochs = cache_epochs
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getstate__(self):  # picklable for DataLoader workers: drop the lock and the epoch cache
        state = dict(self.__dict__)
        state["_lock"], state["_cache"] = None, OrderedDict()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _epoch(self, epoch: int):
        """(docs_in_order int64[D], doc_ends int64[D] cumulative token ends, sample_perm int64[N])."""
        with self._lock:
            hit = self._cache.get(epoch)
            if hit is not None:
                self._cache.move_to_end(epoch)
                return hit
        rng = _rng(self.seed, 0x5EED, epoch)
        order = rng.permutation(len(self.documents))
        docs = self.documents[order]
        ends = np.cumsum(self._doc_sizes[order])
        perm = rng.permutation(self.samples_per_epoch)
        entry = (docs, ends, perm)
        with self._lock:
            self._cache[epoch] = entry
            while len(self._cache) > self._cache_epochs:
                self._cache.popitem(last=False)
        return entry

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if i < 0:
            raise IndexError("negative sample index")
        epoch, j = divmod(i, self.samples_per_epoch)
        docs, ends, perm = self._epoch(epoch)
        start = int(perm[j]) * self.seq_length
        need = self.seq_length + 1
        out = np.empty(need, dtype=np.int64)  # int64[S + 1]
        d = int(np.searchsorted(ends, start, side="right"))  # first doc ending after `start`
        offset = start - (int(ends[d - 1]) if d else 0)
        filled = 0
        while filled < need:
            size = int(ends[d] - (ends[d - 1] if d else 0))
            take = min(size - offset, need - filled)
            if take > 0:
                out[filled:filled + take] = self.indexed.get(int(docs[d]), offset, take)
                filled += take
            d += 1
            offset = 0
        return out

    def __repr__(self) -> str:
        return (f"PackedDataset({self.name!r}, docs={len(self.documents)}, tokens={self.num_tokens}, "
                f"samples/epoch={self.samples_per_epoch}, seq_length={self.seq_length})")


class BlendedDataset:
    """Weighted blend of datasets (Megatron semantics, see the module docstring).

    ``ds[i]`` is defined for all ``i >= 0``; ``len(ds)`` is the sum of the components' epoch
    lengths (a nominal epoch). ``dataset_index(i) -> (component, component_sample)`` and
    ``consumed_per_dataset(n)`` (samples each component served among the first ``n``) are what a
    trainer stores in checkpoints.
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float], period: int = BLEND_PERIOD):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("need one weight per dataset")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"blend weights must be non-negative with a positive sum, got {list(weights)}")
        self.datasets = list(datasets)
        self.weights = w / w.sum()
        self.period = int(period)
        # Megatron's greedy blending (helpers.cpp build_blending_indices) over one period.
        choice = np.empty(self.period, dtype=np.int64)     # int64[P] component of each slot
        within = np.empty(self.period, dtype=np.int64)     # int64[P] its count before this slot
        counts = np.zeros(len(w), dtype=np.int64)
        for k in range(self.period):
            err = self.weights * max(k, 1) - counts
            c = int(np.argmax(err))
            choice[k], within[k] = c, counts[c]
            counts[c] += 1
        self._choice, self._within, self._period_counts = choice, within, counts
        # prefix[k, c] = samples of component c among the first k slots of a period.
        self._prefix = np.zeros((self.period + 1, len(w)), dtype=np.int64)
        np.add.at(self._prefix, (np.arange(1, self.period + 1), choice), 1)
        np.cumsum(self._prefix, axis=0, out=self._prefix)
        self.seq_length = getattr(self.datasets[0], "seq_length", None)

    def __len__(self) -> int:
        return int(sum(len(d) for d in self.datasets))

    def dataset_index(self, i: int) -> tuple[int, int]:
        q, r = divmod(int(i), self.period)
        c = int(self._choice[r])
        return c, int(q * self._period_counts[c] + self._within[r])

    def consumed_per_dataset(self, consumed_samples: int) -> list[int]:
        """How many samples each component served among global samples ``[0, consumed_samples)``."""
        q, r = divmod(int(consumed_samples), self.period)
        return [int(x) for x in q * self._period_counts + self._prefix[r]]

    def __getitem__(self, i: int) -> np.ndarray:
        c, j = self.dataset_index(i)
        return self.datasets[c][j]

    def __repr__(self) -> str:
        parts = ", ".join(f"{w:.3f}:{d!r}" for w, d in zip(self.weights, self.datasets))
        return f"BlendedDataset([{parts}])"


def parse_data_path(data_path: Union[str, Sequence[str]]) -> tuple[list[float], list[str]]:
    """Megatron ``--data-path``: ``[p]`` or ``[w1, p1, w2, p2, ...]`` (strings may hold spaces)."""
    items = data_path.split() if isinstance(data_path, str) else [t for s in data_path for t in str(s).split()]
    if not items:
        raise ValueError("empty data path")
    if len(items) == 1:
        return [1.0], items

    def is_number(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    if len(items) % 2 or not all(is_number(items[k]) for k in range(0, len(items), 2)):
        raise ValueError(f"data path must be PATH or WEIGHT PATH [WEIGHT PATH ...], got {items}")
    weights, paths = [float(items[k]) for k in range(0, len(items), 2)], [items[k] for k in range(1, len(items), 2)]
    bad = [f"{items[2 * k]} (for {p})" for k, (w, p) in enumerate(zip(weights, paths)) if not (math.isfinite(w) and w >= 0)]
    if bad:
        raise ValueError(f"data path weights must be finite numbers >= 0; got {', '.join(bad)}")
    if sum(weights) <= 0:
        raise ValueError(f"data path weights must have a positive sum, got {weights}")
    return weights, paths


def split_documents(num_documents: int, splits: Sequence[float]) -> list[np.ndarray]:
    """Contiguous document ranges per split fraction (normalised). A non-zero fraction gets at
    least one document when there are at least as many documents as non-zero fractions."""
    fr = np.asarray(splits, dtype=np.float64)
    if np.any(fr < 0) or fr.sum() <= 0:
        raise ValueError(f"split fractions must be non-negative with a positive sum: {list(splits)}")
    fr = fr / fr.sum()
    # Megatron's rule: round the cumulative boundaries, so the ranges tile [0, num_documents) and a
    # zero fraction stays empty (rounding each count separately can overshoot into a missing doc).
    bounds = np.round(np.concatenate([[0.0], np.cumsum(fr)]) * num_documents).astype(np.int64)
    bounds[-1] = num_documents
    counts = np.diff(bounds)
    if (fr > 0).sum() <= num_documents:
        for k in np.flatnonzero((fr > 0) & (counts <= 0)):
            donor = int(np.argmax(counts))
            counts[donor] -= 1
            counts[k] += 1
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [np.arange(bounds[k], bounds[k + 1], dtype=np.int64) for k in range(len(fr))]


def build_pretraining_data(data_path: Union[str, Sequence[str]], seq_length: int, seed: int = 1234,
                           splits: Sequence[float] = (0.99, 0.01), headerless_dtype=None):
    """Build one dataset per split from a Megatron-style data path.

    ``data_path``: ``["PREFIX"]`` or ``["w1", "P1", "w2", "P2", ...]``; a path may be a headerless
    token file written ``file.bin:uint16`` (or pass ``headerless_dtype``). Returns a tuple with
    one entry per split (``(train_ds, valid_ds)`` for two fractions): a :class:`PackedDataset`
    for one source, a :class:`BlendedDataset` for several, or ``None`` for a split without any
    documents or tokens (e.g. ``splits=(1, 0)``). Component ``k`` of split ``s`` is seeded with
    ``(seed, k, s)`` so splits and components shuffle independently.
    """
    weights, paths = parse_data_path(data_path)
    per_split: list[list] = [[] for _ in splits]
    per_split_w: list[list] = [[] for _ in splits]
    for k, (w, p) in enumerate(zip(weights, paths)):
        indexed = open_token_dataset(p, headerless_dtype)
        for s, docs in enumerate(split_documents(len(indexed), splits)):
            if len(docs) == 0 or float(splits[s]) == 0:
                continue
            try:
                ds = PackedDataset(indexed, docs, seq_length, seed=seed * 1000003 + k * 101 + s,
                                   name=f"{p}[{('train', 'valid', 'test')[s] if s < 3 else s}]")
            except ValueError:
                if s == 0:
                    raise
                continue  # a tiny validation split: no samples from this source
            per_split[s].append(ds)
            per_split_w[s].append(w)
    out = []
    for s in range(len(splits)):
        if not per_split[s]:
            out.append(None)
        elif len(per_split[s]) == 1 and len(paths) == 1:
            out.append(per_split[s][0])
        else:
            out.append(BlendedDataset(per_split[s], per_split_w[s]))
    return tuple(out)


class DataError(ValueError):
    """Training data the model cannot use; the message names the dataset and the fix."""


def sample_source(dataset, i: int) -> str:
    """The dataset (by its name: prefix and split) that global sample `i` comes from."""
    if isinstance(dataset, BlendedDataset):
        c, j = dataset.dataset_index(i)
        return sample_source(dataset.datasets[c], j)
    return getattr(dataset, "name", "") or repr(dataset)


def per_dataset(dataset, consumed_samples: int) -> Optional[list[int]]:
    """Samples taken from each dataset of a blend after `consumed_samples` (None: not a blend)."""
    f = getattr(dataset, "consumed_per_dataset", None)
    return f(consumed_samples) if f else None


class DistributedBatchIterator:
    """Yields ``{"input_ids": LongTensor[B, S], "labels": LongTensor[B, S]}`` for one DP rank.

    Step ``t`` (counting from the resume point) covers global samples
    ``[c, c + B*W)`` with ``c = consumed_samples + t*B*W`` (``B`` micro batch, ``W`` DP world size);
    rank ``r`` gets ``[c + r*B, c + (r+1)*B)``. ``labels`` are the next tokens
    (``sample[1:]``), ``input_ids`` is ``sample[:-1]``. ``.consumed_samples`` is the global count
    after the last yielded step: store it in checkpoints and pass it back to resume.
    ``num_samples`` (optional) stops before exceeding that many global samples; otherwise the
    iterator is infinite (datasets continue into new epochs).
    """

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int = 0, dp_world_size: int = 1,
                 consumed_samples: int = 0, num_samples: Optional[int] = None, vocab_size: Optional[int] = None,
                 eos_id: Optional[int] = None):
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_world_size})")
        self.dataset = dataset
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_world_size = int(dp_world_size)
        self.consumed_samples = int(consumed_samples)
        self.num_samples = num_samples
        self.vocab_size = vocab_size   # token ids at or above it are refused (an IndexError on CPU, a device assert on GPU)
        self.eos_id = eos_id           # set: batches carry "documents" (a new one after every eos_id)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.dp_world_size

    def consumed_per_dataset(self) -> Optional[list[int]]:
        return per_dataset(self.dataset, self.consumed_samples)

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples,
                "consumed_per_dataset": self.consumed_per_dataset()}

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        import torch

        start = self.consumed_samples
        if self.num_samples is not None and start + self.global_batch_size > self.num_samples:
            raise StopIteration
        first = start + self.dp_rank * self.micro_batch_size
        batch = np.stack([self.dataset[first + b] for b in range(self.micro_batch_size)])  # [B, S+1]
        if self.vocab_size is not None and batch.size and int(batch.max()) >= self.vocab_size:
            b = int(np.argmax(batch.max(axis=1)))
            raise DataError(f"token id {int(batch[b].max())} >= the model's vocab_size {self.vocab_size} in global sample "
                            f"{first + b} ({sample_source(self.dataset, first + b)}): the data was tokenized with a "
                            "larger vocabulary than the model has; re-preprocess with the model's tokenizer or raise "
                            "vocab_size (--model-override vocab_size=N)")
        self.consumed_samples = start + self.global_batch_size
        tokens = torch.from_numpy(batch)
        out = {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
        if self.eos_id is not None:
            from megamoe.kernels.attention import documents_of
            out["documents"] = documents_of(batch[:, :-1], self.eos_id)
        return out


class Prefetcher:
    """A batch iterator one batch ahead: the next batch is read, pinned and sent to the device
    (`move`, e.g. megamoe.distributed.to_device: non_blocking copies) when the current one is
    handed out, so its host work and copy overlap the current step's GPU work instead of following
    the step's host sync. `consumed_samples` / `consumed_per_dataset()` count the batches handed
    out, not the one read ahead: checkpoints resume at the right sample."""

    def __init__(self, it: DistributedBatchIterator, move):
        self.it, self.move = it, move
        self.consumed_samples = it.consumed_samples
        self._ahead: Optional[dict] = None
        self._exhausted = False

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> dict:
        if self._ahead is None:
            if self._exhausted:
                raise StopIteration
            self._ahead = self.move(next(self.it))
        batch = self._ahead
        self.consumed_samples = self.it.consumed_samples
        try:
            self._ahead = self.move(next(self.it))
        except StopIteration:
            self._ahead, self._exhausted = None, True
        return batch

    def consumed_per_dataset(self) -> Optional[list[int]]:
        return per_dataset(self.it.dataset, self.consumed_samples)
