"""Megatron-LM indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``) and headerless token files.

The ``.idx`` layout (Megatron-LM ``megatron/core/datasets/indexed_dataset.py``, version 1), all
little-endian::

    magic        9 bytes   b"MMIDIDX\\x00\\x00"
    version      <Q        1
    dtype code   <B        1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    seq count    <Q        number of sequences S
    doc count    <Q        number of entries D of doc_idx (= documents + 1)
    sizes        int32[S]  tokens per sequence
    pointers     int64[S]  byte offset of each sequence in the .bin
    doc_idx      int64[D]  sequence index where each document starts; 0 first, S last

The ``.bin`` is the concatenation of all sequences in the dtype above, nothing else. Our writer
stores one sequence per document, so sequence ``i`` is document ``i`` and ``doc_idx`` is
``0..S``; files written by Megatron with several sequences per document read fine too (``[i]``
then returns sequence ``i``).

The reader memory-maps both files and validates everything it can cheaply check (magic,
version, dtype, the .idx size implied by the header, pointer/size consistency, the .bin size) so
that a truncated or corrupted pair is refused with a message that says what is wrong and what to
do, instead of silently training on garbage.

Headerless token files (nanoGPT-style ``train.bin``: raw uint16/uint32 tokens, no index) are
read by :class:`HeaderlessTokenDataset` given an explicit dtype; they expose the same interface,
split into fixed-size pseudo-documents (the file has no document boundaries).
"""
from __future__ import annotations

import os
import struct
from typing import Iterable, Optional, Union

import numpy as np

__all__ = [
    "INDEX_MAGIC",
    "INDEX_VERSION",
    "DTYPE_CODES",
    "IndexedDatasetError",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "HeaderlessTokenDataset",
    "best_dtype",
    "open_token_dataset",
    "index_file",
    "data_file",
]

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# Megatron's dtype codes (indexed_dataset.DType).
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_HEADER_SIZE = len(INDEX_MAGIC) + 8 + 1 + 8 + 8  # = 34 bytes

PathLike = Union[str, os.PathLike]


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair (or headerless token file) is missing, truncated or inconsistent."""


def index_file(prefix: PathLike) -> str:
    return str(prefix) + ".idx"


def data_file(prefix: PathLike) -> str:
    return str(prefix) + ".bin"


def _strip_suffix(prefix: PathLike) -> str:
    """Accept ``PREFIX``, ``PREFIX.bin`` or ``PREFIX.idx``."""
    p = str(prefix)
    if p.endswith((".bin", ".idx")) and not os.path.exists(p + ".idx"):
        return p[:-4]
    return p


def best_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (0..vocab_size-1) fits, else int32 (Megatron's rule)."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


class IndexedDatasetWriter:
    """Write a Megatron ``PREFIX.bin``/``PREFIX.idx`` pair atomically.

    Data goes to ``PREFIX.bin.tmp-<pid>`` / ``PREFIX.idx.tmp-<pid>``; :meth:`finalize` flushes
    and fsyncs both, then renames the .bin and last the .idx into place (``os.replace``), so an
    interrupted run never leaves a complete-looking pair; a stale .idx next to a new .bin is
    caught by the reader's size checks. Used as a context manager, an exception aborts (temp
    files removed, existing outputs untouched).

    ``add_document(tokens)`` writes one document as one sequence. ``add_item`` +
    ``end_document`` allow several sequences per document (Megatron semantics).
    """

    def __init__(self, prefix: PathLike, dtype=np.uint16):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise ValueError(f"dtype {self.dtype} has no Megatron dtype code; use one of "
                             f"{sorted(str(np.dtype(v)) for v in DTYPE_CODES.values())}")
        if self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            self._range = (int(info.min), int(info.max))
        else:
            self._range = None
        parent = os.path.dirname(os.path.abspath(self.prefix))
        os.makedirs(parent, exist_ok=True)
        suffix = f".tmp-{os.getpid()}"
        self._bin_tmp = data_file(self.prefix) + suffix
        self._idx_tmp = index_file(self.prefix) + suffix
        self._bin = open(self._bin_tmp, "wb")
        self._sizes: list[int] = []
        self._doc_idx: list[int] = [0]
        self._closed = False
        self.num_tokens = 0

    # -- writing -------------------------------------------------------------------------
    def add_item(self, tokens: Iterable[int]) -> None:
        """Append one sequence (not yet closing the document)."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"expected a 1-D token array, got shape {arr.shape}")
        if self._range is not None and arr.size and arr.dtype != self.dtype:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self._range[0] or hi > self._range[1]:
                raise ValueError(f"token id range [{lo}, {hi}] does not fit {self.dtype}; "
                                 "write with a wider dtype (int32)")
        if arr.size > np.iinfo(np.int32).max:
            raise ValueError("a sequence longer than 2**31-1 tokens cannot be indexed (int32 sizes)")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sizes.append(int(arr.size))
        self.num_tokens += int(arr.size)

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    def add_document(self, tokens: Iterable[int]) -> None:
        """Append one document stored as a single sequence."""
        self.add_item(tokens)
        self.end_document()

    # -- closing -------------------------------------------------------------------------
    def finalize(self) -> None:
        """Write the index and move both files into place (idempotent)."""
        if self._closed:
            return
        if self._doc_idx[-1] != len(self._sizes):  # close a dangling document
            self.end_document()
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        sizes = np.asarray(self._sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.asarray(self._doc_idx, dtype=np.int64)
        with open(self._idx_tmp, "wb") as f:
            f.write(INDEX_MAGIC)
            f.write(struct.pack("<Q", INDEX_VERSION))
            f.write(struct.pack("<B", _CODE_OF[self.dtype]))
            f.write(struct.pack("<Q", len(sizes)))
            f.write(struct.pack("<Q", len(doc_idx)))
            f.write(sizes.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_idx.tobytes(order="C"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._bin_tmp, data_file(self.prefix))
        os.replace(self._idx_tmp, index_file(self.prefix))
        self._closed = True

    close = finalize

    def abort(self) -> None:
        """Drop everything written so far; existing outputs are left untouched."""
        if self._closed:
            return
        try:
            self._bin.close()
        finally:
            for p in (self._bin_tmp, self._idx_tmp):
                try:
                    os.remove(p)
                except FileNotFoundError:
                    pass
            self._closed = True

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()

    def __del__(self):  # never leave temp files behind from a forgotten writer
        try:
            if not self._closed:
                self.abort()
        except Exception:
            pass


def _fail(prefix: str, what: str) -> "IndexedDatasetError":
    return IndexedDatasetError(
        f"{prefix}.bin/.idx: {what}. The pair is incomplete or corrupted; re-create it with "
        f"tools/preprocess.py (an interrupted run never renames its temp files into place)."
    )


class IndexedDataset:
    """Memory-mapped reader for a Megatron ``PREFIX.bin``/``PREFIX.idx`` pair.

    ``ds[i]`` is sequence ``i`` (= document ``i`` for files written by :class:`IndexedDatasetWriter`)
    as an ``np.ndarray[dtype]`` view of the memmap (copy it before mutating).

    Attributes: ``sizes`` int32[num_sequences], ``pointers`` int64[num_sequences] (bytes),
    ``doc_idx`` int64[num_documents + 1], ``dtype``, ``num_tokens``.
    """

    def __init__(self, prefix: PathLike, validate: bool = True):
        self.prefix = _strip_suffix(prefix)
        idx_path, bin_path = index_file(self.prefix), data_file(self.prefix)
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise IndexedDatasetError(
                    f"{p}: no such file. Pass the prefix without extension (PREFIX for "
                    f"PREFIX.bin + PREFIX.idx) and create the pair with tools/preprocess.py.")
        idx_size = os.path.getsize(idx_path)
        if idx_size < _HEADER_SIZE:
            raise _fail(self.prefix, f"index is {idx_size} bytes, shorter than the {_HEADER_SIZE}-byte header")
        with open(idx_path, "rb") as f:
            header = f.read(_HEADER_SIZE)
        magic = header[:9]
        if magic != INDEX_MAGIC:
            raise _fail(self.prefix, f"bad magic {magic!r} in .idx (expected {INDEX_MAGIC!r}); "
                                     "this is not a Megatron indexed dataset index")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != INDEX_VERSION:
            raise _fail(self.prefix, f"unsupported index version {version} (expected {INDEX_VERSION})")
        (code,) = struct.unpack("<B", header[17:18])
        if code not in DTYPE_CODES:
            raise _fail(self.prefix, f"unknown dtype code {code} (valid: {sorted(DTYPE_CODES)})")
        self.dtype = np.dtype(DTYPE_CODES[code])
        seq_count, doc_count = struct.unpack("<QQ", header[18:34])
        expected = _HEADER_SIZE + seq_count * 4 + seq_count * 8 + doc_count * 8
        if idx_size != expected:
            raise _fail(self.prefix, f".idx is {idx_size} bytes but its header "
                                     f"({seq_count} sequences, {doc_count} doc_idx entries) implies {expected}"
                                     + (" (truncated)" if idx_size < expected else " (trailing bytes)"))
        self._idx_mmap = np.memmap(idx_path, mode="r", dtype=np.uint8)
        off = _HEADER_SIZE
        self.sizes = np.frombuffer(self._idx_mmap, dtype=np.int32, count=seq_count, offset=off)
        off += seq_count * 4
        self.pointers = np.frombuffer(self._idx_mmap, dtype=np.int64, count=seq_count, offset=off)
        off += seq_count * 8
        self.doc_idx = np.frombuffer(self._idx_mmap, dtype=np.int64, count=doc_count, offset=off)

        bin_size = os.path.getsize(bin_path)
        item = self.dtype.itemsize
        self.num_tokens = int(self.sizes.sum(dtype=np.int64))
        expected_bin = (int(self.pointers[-1]) + int(self.sizes[-1]) * item) if seq_count else 0
        if bin_size < expected_bin:
            raise _fail(self.prefix, f".bin is truncated: {bin_size} bytes, the index needs {expected_bin}")
        if bin_size > expected_bin:
            raise _fail(self.prefix, f".bin has {bin_size - expected_bin} unexpected trailing bytes "
                                     f"({bin_size} bytes, the index describes {expected_bin}); "
                                     "the .idx does not belong to this .bin")
        if validate:
            self._validate_arrays(seq_count)
        # np.memmap cannot map an empty file.
        self._bin = (np.memmap(bin_path, mode="r", dtype=self.dtype) if bin_size
                     else np.zeros(0, dtype=self.dtype))

    # Pickle by prefix (e.g. into DataLoader worker processes): the memmaps are reopened, never copied.
    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.__init__(state["prefix"], validate=False)

    def _validate_arrays(self, seq_count: int) -> None:
        if seq_count and int(self.sizes.min()) < 0:
            raise _fail(self.prefix, "negative sequence size in .idx")
        expected_ptr = np.zeros(seq_count, dtype=np.int64)
        if seq_count > 1:
            np.cumsum(self.sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=expected_ptr[1:])
        if not np.array_equal(expected_ptr, self.pointers):
            bad = int(np.flatnonzero(expected_ptr != self.pointers)[0])
            raise _fail(self.prefix, f"pointer of sequence {bad} is {int(self.pointers[bad])}, "
                                     f"sizes imply {int(expected_ptr[bad])}")
        d = self.doc_idx
        if len(d) == 0 or d[0] != 0 or d[-1] != seq_count or (len(d) > 1 and np.any(np.diff(d) < 0)):
            raise _fail(self.prefix, "doc_idx must start at 0, be non-decreasing and end at the "
                                     f"sequence count {seq_count}")

    # -- access ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range [0, {len(self)})")
        i = int(i) % len(self)
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self._bin[start:start + int(self.sizes[i])]

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``[offset, offset+length)`` of sequence ``i`` (Megatron's ``get``)."""
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        n = int(self.sizes[i]) - offset if length is None else length
        return self._bin[start:start + n]

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}, sequences={len(self)}, documents={self.num_documents}, "
                f"tokens={self.num_tokens}, dtype={self.dtype})")


class HeaderlessTokenDataset:
    """A raw token file without header or index (nanoGPT ``train.bin``), read with an explicit dtype.

    The file has no document boundaries, so it is exposed as consecutive pseudo-documents of
    ``chunk_tokens`` tokens (the last one shorter); the pretraining dataset packs across them
    exactly as across real documents.
    """

    def __init__(self, path: PathLike, dtype, chunk_tokens: int = 1 << 20):
        self.prefix = self.path = str(path)
        self.dtype = np.dtype(dtype)
        if not os.path.isfile(self.path):
            raise IndexedDatasetError(f"{self.path}: no such token file")
        size = os.path.getsize(self.path)
        if size % self.dtype.itemsize:
            raise IndexedDatasetError(
                f"{self.path}: {size} bytes is not a multiple of the {self.dtype} item size "
                f"{self.dtype.itemsize}: the file is truncated or the dtype is wrong")
        n = size // self.dtype.itemsize
        self._bin = np.memmap(self.path, mode="r", dtype=self.dtype) if n else np.zeros(0, self.dtype)
        self.num_tokens = n
        starts = np.arange(0, n, chunk_tokens, dtype=np.int64)
        self.sizes = np.minimum(chunk_tokens, n - starts).astype(np.int32)
        self.pointers = starts * self.dtype.itemsize
        self.doc_idx = np.arange(len(starts) + 1, dtype=np.int64)
        self._starts = starts
        self._chunk_tokens = chunk_tokens

    def __getstate__(self):  # reopen the memmap instead of pickling its contents
        return {"path": self.path, "dtype": self.dtype.name, "chunk_tokens": self._chunk_tokens}

    def __setstate__(self, state):
        self.__init__(state["path"], state["dtype"], state["chunk_tokens"])

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        s = int(self._starts[i])
        return self._bin[s:s + int(self.sizes[i])]

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        s = int(self._starts[i]) + offset
        n = int(self.sizes[i]) - offset if length is None else length
        return self._bin[s:s + n]

    def __repr__(self) -> str:
        return f"HeaderlessTokenDataset({self.path!r}, tokens={self.num_tokens}, dtype={self.dtype})"


_HEADERLESS_DTYPES = {"uint16": np.uint16, "uint32": np.uint32, "int32": np.int32,
                      "u16": np.uint16, "u32": np.uint32, "i32": np.int32}


def open_token_dataset(spec: PathLike, dtype=None):
    """Open a Megatron prefix, or a headerless file given as ``PATH:uint16`` / ``dtype=...``.

    ``spec`` forms: ``PREFIX`` (PREFIX.bin + PREFIX.idx), ``path/train.bin:uint16`` or
    ``path/train.bin:uint32`` (headerless, dtype explicit), or any path with ``dtype`` given.
    """
    s = str(spec)
    if dtype is None and ":" in s:
        head, _, tail = s.rpartition(":")
        if tail.lower() in _HEADERLESS_DTYPES:
            s, dtype = head, _HEADERLESS_DTYPES[tail.lower()]
    if dtype is not None:
        return HeaderlessTokenDataset(s, dtype)
    if os.path.isfile(s) and not os.path.isfile(_strip_suffix(s) + ".idx"):
        raise IndexedDatasetError(
            f"{s}: no matching .idx; for a headerless token file give its dtype as {s}:uint16 "
            f"(or :uint32)")
    return IndexedDataset(s)
