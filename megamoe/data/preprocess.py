"""Text -> Megatron .bin/.idx: the library behind ``tools/preprocess.py`` and ``tools/inspect_data.py``.

Pipeline: the main process reads documents in input order (:mod:`text_sources`), drops empty and
(with ``skip_bad``) bad ones while counting them, groups the rest into chunks of about
``chunk_chars`` characters, and hands chunks to ``workers`` processes that tokenize them. At most
``4 * workers`` chunks are in flight and results are consumed strictly in submission order, so
the output is byte-identical for any number of workers and memory stays bounded. Workers load
the tokenizer themselves from its path (picklable, ``spawn``-safe); the default start method is
``fork`` where available because it starts faster and works from any ``__main__``.

With ``split=(0.99, 0.01)`` each document goes to ``PREFIX_train`` or ``PREFIX_valid`` (a third
fraction gives ``PREFIX_test``) by a hash of its index, which is deterministic and needs no
second pass over the data.
"""
from __future__ import annotations

import collections
import itertools
import multiprocessing as mp
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .indexed import IndexedDatasetWriter, best_dtype, data_file, open_token_dataset
from .text_sources import expand_inputs, iter_documents
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["PreprocessStats", "preprocess", "verify_dataset", "format_verify", "SPLIT_NAMES"]

SPLIT_NAMES = ("train", "valid", "test")


@dataclass
class PreprocessStats:
    files: int = 0
    documents: int = 0
    tokens: int = 0
    skipped_bad: int = 0
    skipped_empty: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    seconds: float = 0.0
    workers: int = 1
    outputs: dict = field(default_factory=dict)  # split name -> {"prefix", "documents", "tokens"}
    bad_examples: list = field(default_factory=list)  # first few skipped "file:line: error"

    @property
    def skipped(self) -> int:
        return self.skipped_bad + self.skipped_empty

    def summary(self) -> str:
        t = max(self.seconds, 1e-9)
        lines = [
            f"files        {self.files}",
            f"documents    {self.documents:,}",
            f"tokens       {self.tokens:,}",
            f"skipped      {self.skipped:,} ({self.skipped_bad:,} bad, {self.skipped_empty:,} empty)",
            f"bytes        {self.input_bytes:,} text in, {self.output_bytes:,} .bin out",
            f"time         {self.seconds:.2f} s with {self.workers} worker(s): "
            f"{self.documents / t:,.1f} docs/s, {self.tokens / t:,.0f} tokens/s",
        ]
        for name, o in self.outputs.items():
            lines.append(f"output       {name}: {o['prefix']}.bin/.idx ({o['documents']:,} docs, "
                         f"{o['tokens']:,} tokens)")
        for ex in self.bad_examples:
            lines.append(f"skipped bad  {ex}")
        return "\n".join(lines)


# -- worker side ---------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(tokenizer_path: str, append_eod: bool, dtype: str) -> None:
    # Each worker process tokenizes single-threaded: parallelism comes from the processes.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        tok = load_tokenizer(tokenizer_path)
    except Exception as e:
        # A raising initializer makes multiprocessing.Pool respawn workers forever; report the
        # error through the first task instead.
        _WORKER["error"] = e
        return
    _WORKER.update(tok=tok, eod=tok.eos_id if append_eod else None, dtype=np.dtype(dtype))


def _encode_chunk(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize a chunk. Returns (tokens: dtype[total], lengths: int64[len(texts)])."""
    if "error" in _WORKER:
        raise RuntimeError(f"tokenizer failed to load in worker: {_WORKER['error']}")
    tok: Tokenizer = _WORKER["tok"]
    eod = _WORKER["eod"]
    ids = tok.encode_batch(texts)
    if eod is not None:
        for x in ids:
            x.append(eod)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    dtype = _WORKER["dtype"]
    if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(dtype).max):
        raise ValueError(f"token ids outside the {dtype} range")
    return flat.astype(dtype), lengths


def _split_of(doc_index: int, bounds: np.ndarray) -> int:
    """Deterministic split assignment: a splitmix64 hash of the document index mapped to [0,1)."""
    z = (doc_index + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    u = ((z ^ (z >> 31)) >> 11) / float(1 << 53)
    return int(np.searchsorted(bounds, u, side="right"))


def _split_plan(split: Optional[Sequence[float]], output_prefix: str) -> tuple[np.ndarray, list[str]]:
    """(cumulative document-fraction bounds, output prefix per split); no split: one output."""
    if not split:
        return np.zeros(0), [str(output_prefix)]
    fr = np.asarray([float(x) for x in split], dtype=np.float64)
    if len(fr) > len(SPLIT_NAMES) or np.any(fr < 0) or fr.sum() <= 0:
        raise ValueError(f"--split needs 1-3 non-negative fractions, got {list(split)}")
    return np.cumsum(fr / fr.sum())[:-1], [f"{output_prefix}_{SPLIT_NAMES[i]}" for i in range(len(fr))]


def _text_chunks(files, input_format, json_key, txt_mode, skip_bad, stats: PreprocessStats, chunk_chars: int,
                 max_bad_examples: int):
    """Lists of document texts of about `chunk_chars` characters (the unit sent to a worker);
    bad and empty records are counted in `stats` and left out."""
    buf: list[str] = []
    size = 0
    for rec in iter_documents(files, input_format, json_key, txt_mode, skip_bad):
        if rec.error is not None:
            stats.skipped_bad += 1
            if len(stats.bad_examples) < max_bad_examples:
                stats.bad_examples.append(f"{rec.location}: {rec.error}")
            continue
        if not rec.text.strip():
            stats.skipped_empty += 1
            continue
        stats.input_bytes += len(rec.text.encode("utf-8", errors="surrogatepass"))
        buf.append(rec.text)
        size += len(rec.text)
        if size >= chunk_chars:
            yield buf
            buf, size = [], 0
    if buf:
        yield buf


class _SplitWriter:
    """Writes encoded chunks in order, each document to its split's writer, counting as it goes."""

    def __init__(self, prefixes: list[str], bounds: np.ndarray, dtype, stats: PreprocessStats, progress: bool):
        from tqdm import tqdm
        self.writers = [IndexedDatasetWriter(p, dtype) for p in prefixes]
        self.bounds, self.stats = bounds, stats
        self.per_split = [[0, 0] for _ in prefixes]  # documents, tokens
        self.doc_index, self.t0 = 0, time.perf_counter()
        self.bar = tqdm(unit="doc", desc="preprocess", disable=not progress, dynamic_ncols=True, smoothing=0.1)

    def __call__(self, result) -> None:
        flat, lengths = result
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        stats = self.stats
        for j, n in enumerate(lengths):
            n = int(n)
            if n == 0:  # text of only characters the tokenizer drops
                stats.skipped_empty += 1
                continue
            s = _split_of(self.doc_index, self.bounds) if len(self.bounds) else 0
            self.writers[s].add_document(flat[offsets[j]:offsets[j] + n])
            self.per_split[s][0] += 1
            self.per_split[s][1] += n
            self.doc_index += 1
            stats.documents += 1
            stats.tokens += n
        self.bar.update(len(lengths))
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{stats.tokens / dt:,.0f} tok/s, {stats.tokens:,} tokens", refresh=False)


def _encode_all(chunks, write, workers: int, init_args: tuple, mp_context: Optional[str]) -> None:
    if workers == 1:
        _init_worker(*init_args)
        for c in chunks:
            write(_encode_chunk(c))
        return
    # fork where available (fast start, works from any __main__); the worker functions
    # are module-level and load the tokenizer from its path, so "spawn" works as well.
    default = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(mp_context or default)
    with ctx.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        pending: collections.deque = collections.deque()
        for c in chunks:
            pending.append(pool.apply_async(_encode_chunk, (c,)))
            # Bounded in-flight window, consumed in submission order: deterministic output.
            while len(pending) >= 4 * workers:
                write(pending.popleft().get())
        while pending:
            write(pending.popleft().get())


def preprocess(inputs: Sequence[str], tokenizer: str, output_prefix: str, *, json_key: str = "text",
               workers: int = 1, append_eod: bool = False, split: Optional[Sequence[float]] = None,
               input_format: Optional[str] = None, txt_mode: str = "file", skip_bad: bool = False,
               progress: bool = True, chunk_chars: int = 1 << 17, max_bad_examples: int = 5,
               mp_context: Optional[str] = None) -> PreprocessStats:
    """Tokenize ``inputs`` (files, globs, directories) into Megatron ``.bin``/``.idx`` pair(s).

    Raises :class:`~megamoe.data.text_sources.BadInputError` (naming file and line) on the
    first bad record unless ``skip_bad``; nothing is left behind on failure (writers abort).
    Returns the :class:`PreprocessStats` (also what the CLI prints).
    """
    t0 = time.perf_counter()
    files = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    if append_eod and tok.eos_id is None:
        raise ValueError(f"{tokenizer}: the tokenizer has no eos token, so --append-eod cannot work")
    dtype = best_dtype(tok.vocab_size)
    workers = max(1, int(workers))
    stats = PreprocessStats(files=len(files), workers=workers)
    bounds, prefixes = _split_plan(split, output_prefix)
    write = _SplitWriter(prefixes, bounds, dtype, stats, progress)
    chunks = _text_chunks(files, input_format, json_key, txt_mode, skip_bad, stats, chunk_chars, max_bad_examples)
    try:
        _encode_all(chunks, write, workers, (str(tok.path), bool(append_eod), dtype.name), mp_context)
        for w in write.writers:
            w.finalize()
    except BaseException:
        for w in write.writers:
            w.abort()
        raise
    finally:
        write.bar.close()
    stats.seconds = time.perf_counter() - t0
    stats.output_bytes = sum(os.path.getsize(data_file(p)) for p in prefixes)
    names = [SPLIT_NAMES[i] for i in range(len(prefixes))] if split else ["all"]
    stats.outputs = {n: {"prefix": p, "documents": d, "tokens": t}
                     for n, p, (d, t) in zip(names, prefixes, write.per_split)}
    empty = [o["prefix"] for o in stats.outputs.values() if o["documents"] == 0]
    if empty:
        warnings.warn(f"{', '.join(empty)}: 0 documents written ({stats.skipped_empty} empty and {stats.skipped_bad} "
                      f"bad records skipped, of {stats.files} input file(s)); training cannot use "
                      f"{'it' if len(empty) == 1 else 'them'}")
    return stats


def verify_dataset(prefix: str, tokenizer: Optional[str] = None, sample_tokens: int = 200,
                   sample_doc: int = 0, headerless_dtype=None) -> dict:
    """Open and fully check a .bin/.idx pair (or headerless file); return statistics.

    Beyond the reader's structural checks this scans every token once (in 16M-token blocks) for
    the id range and, with a tokenizer, checks that every id is below its vocab size. Returns a
    dict with counts, length statistics, token id range and (with a tokenizer) a decoded sample
    of ``sample_doc``. Raises IndexedDatasetError / ValueError on any inconsistency.
    """
    ds = open_token_dataset(prefix, headerless_dtype)
    sizes = np.asarray(ds.sizes, dtype=np.int64)
    data = ds._bin
    lo, hi = None, None
    step = 1 << 24
    for s in range(0, len(data), step):
        block = np.asarray(data[s:s + step])
        if block.size:
            lo = int(block.min()) if lo is None else min(lo, int(block.min()))
            hi = int(block.max()) if hi is None else max(hi, int(block.max()))
    info = {
        "prefix": str(prefix),
        "dtype": str(ds.dtype),
        "sequences": int(len(ds)),
        "documents": int(ds.num_documents),
        "tokens": int(sizes.sum()),
        "bin_bytes": int(os.path.getsize(getattr(ds, "path", None) or data_file(ds.prefix))),
        "min_doc_tokens": int(sizes.min()) if len(sizes) else 0,
        "mean_doc_tokens": float(sizes.mean()) if len(sizes) else 0.0,
        "max_doc_tokens": int(sizes.max()) if len(sizes) else 0,
        "min_token_id": lo,
        "max_token_id": hi,
    }
    if lo is not None and lo < 0:
        raise ValueError(f"{prefix}: negative token id {lo}")
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        info["tokenizer"] = f"{tok.kind}:{tok.path}"
        if hi is not None and hi >= tok.vocab_size:
            raise ValueError(f"{prefix}: token id {hi} >= vocab size {tok.vocab_size} of {tokenizer}; "
                             "the data was made with a different tokenizer")
        if len(ds):
            ids = np.asarray(ds[sample_doc][:sample_tokens]).tolist()
            info["sample_doc"] = sample_doc
            info["sample_ids"] = ids[:32]
            info["sample_text"] = tok.decode(ids)
    return info


def format_verify(info: dict) -> str:
    """Human-readable report of :func:`verify_dataset`'s result (what the CLIs print)."""
    lines = [f"OK {info['prefix']}: consistent .bin/.idx pair",
             f"dtype        {info['dtype']}",
             f"documents    {info['documents']:,} ({info['sequences']:,} sequences)",
             f"tokens       {info['tokens']:,} ({info['bin_bytes']:,} bytes)",
             f"doc tokens   min {info['min_doc_tokens']:,} / mean {info['mean_doc_tokens']:,.1f} / "
             f"max {info['max_doc_tokens']:,}",
             f"token ids    {info['min_token_id']} .. {info['max_token_id']}"]
    if "tokenizer" in info:
        lines.append(f"tokenizer    {info['tokenizer']}")
    if "sample_text" in info:
        lines.append(f"document {info['sample_doc']}, first ids {info['sample_ids'][:16]}, decoded:")
        lines.append("-" * 60)
        lines.append(info["sample_text"])
        lines.append("-" * 60)
    return "\n".join(lines)
