"""Read documents from .txt, .jsonl/.json(.gz), .parquet and .csv files, with file:line errors.

Every reader yields :class:`Record` objects in file order. A record either has ``text`` or an
``error`` (malformed JSON, missing key, invalid UTF-8, unreadable file, ...) plus the file and the
1-based line (row for parquet) where it happened, so that the caller can stop with a precise
message or, with ``skip_bad``, skip and count it. :func:`iter_documents` does exactly that.

Formats are chosen from the extension (``.gz`` is stripped first) unless ``fmt`` overrides it:

* ``txt``: the whole file is one document (``txt_mode="file"``), or each blank-line-separated
  block is one (``"blank"``), or each non-empty line (``"line"``).
* ``jsonl``: one JSON object per line, text under ``json_key``; a ``.json`` file that starts with
  ``[`` is read as one JSON array of objects.
* ``parquet``: column ``json_key`` (string or binary), read in record batches with pyarrow.
* ``csv``: header row, column ``json_key``; fields may span lines (RFC 4180 quoting).
"""
from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

__all__ = ["FORMATS", "TXT_MODES", "Record", "BadInputError", "detect_format", "expand_inputs",
           "iter_records", "iter_documents"]

FORMATS = ("txt", "jsonl", "parquet", "csv")
TXT_MODES = ("file", "blank", "line")
_EXT = {".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl", ".json": "jsonl",
        ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv"}
# Invalid UTF-8 bytes decoded with errors="surrogateescape" become lone surrogates U+DC80..U+DCFF:
# decoding that way never raises, and a regex search then finds the first bad byte's position.
_BAD_UTF8 = re.compile("[\udc80-\udcff]")
_SKIP_HINT = "fix or remove it, or pass --skip-bad to skip bad records (they are counted)"


class BadInputError(ValueError):
    """A bad input record, raised when skip_bad is off. ``str()`` names file and line."""

    def __init__(self, record: "Record"):
        self.record = record
        super().__init__(f"{record.location}: {record.error}; {_SKIP_HINT}")


@dataclass
class Record:
    source: str
    line: Optional[int]  # 1-based line (row for parquet); None for file-level problems
    text: Optional[str] = None
    error: Optional[str] = None

    @property
    def location(self) -> str:
        if self.line is None:
            return self.source
        unit = "row " if self.source.endswith((".parquet", ".parquet.gz")) else ""
        return f"{self.source}:{unit}{self.line}"


def detect_format(path: str, override: Optional[str] = None) -> str:
    if override:
        if override not in FORMATS:
            raise ValueError(f"unknown input format {override!r}; choose from {FORMATS}")
        return override
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    ext = os.path.splitext(name)[1]
    if ext not in _EXT:
        raise ValueError(f"{path}: cannot tell the input format from the extension {ext!r}; "
                         f"pass --input-format ({'/'.join(FORMATS)})")
    return _EXT[ext]


def expand_inputs(patterns: Iterable[str], recursive_exts: Iterable[str] = tuple(_EXT)) -> list[str]:
    """Expand files, globs and directories into a list of files, in a deterministic order.

    Each glob's matches and each directory's files (recursively, known extensions) are sorted;
    the order of the arguments is kept. A glob matching nothing is an error. A plain path that
    does not exist is kept, so the reader reports it as an unreadable file (skippable).
    """
    out: list[str] = []
    exts = tuple(recursive_exts)
    for pat in patterns:
        pat = str(pat)
        if os.path.isdir(pat):
            found = []
            for root, _dirs, files in os.walk(pat):
                for f in files:
                    low = f.lower()[:-3] if f.lower().endswith(".gz") else f.lower()
                    if low.endswith(exts):
                        found.append(os.path.join(root, f))
            if not found:
                raise ValueError(f"{pat}: directory contains no input files ({', '.join(exts)})")
            out.extend(sorted(found))
        elif glob.has_magic(pat):
            matches = sorted(p for p in glob.glob(pat, recursive=True) if os.path.isfile(p))
            if not matches:
                raise ValueError(f"{pat}: glob matches no files")
            out.extend(matches)
        else:
            out.append(pat)
    return out


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _line_of(text: str, pos: int, first_line: int = 1) -> int:
    return first_line + text.count("\n", 0, pos)


def _read_txt(path: str, mode: str) -> Iterator[Record]:
    if mode not in TXT_MODES:
        raise ValueError(f"unknown txt mode {mode!r}; choose from {TXT_MODES}")
    with _open_binary(path) as f:
        raw = f.read()
    text = raw.decode("utf-8", errors="surrogateescape")
    if mode == "file":
        m = _BAD_UTF8.search(text)
        if m:
            yield Record(path, _line_of(text, m.start()), error="invalid UTF-8")
        else:
            yield Record(path, 1, text=text)
        return
    if mode == "line":
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            if _BAD_UTF8.search(line):
                yield Record(path, n, error="invalid UTF-8")
            else:
                yield Record(path, n, text=line.rstrip("\r"))
        return
    # blank-line separated blocks: a block ends at a line that is empty or whitespace only.
    block: list[str] = []
    start = 0
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            if not block:
                start = n
            block.append(line.rstrip("\r"))
            continue
        if block:
            yield _block_record(path, start, block)
            block = []
    if block:
        yield _block_record(path, start, block)


def _block_record(path: str, start: int, block: list[str]) -> Record:
    doc = "\n".join(block)
    m = _BAD_UTF8.search(doc)
    if m:
        return Record(path, _line_of(doc, m.start(), start), error="invalid UTF-8")
    return Record(path, start, text=doc)


def _json_text(obj, key: str, path: str, n: int) -> Record:
    if not isinstance(obj, dict):
        return Record(path, n, error=f"expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        keys = ", ".join(list(obj)[:8])
        return Record(path, n, error=f"missing key {key!r} (keys: {keys}; choose one with --json-key)")
    val = obj[key]
    if not isinstance(val, str):
        return Record(path, n, error=f"key {key!r} holds {type(val).__name__}, not a string")
    return Record(path, n, text=val)


def _read_jsonl(path: str, key: str) -> Iterator[Record]:
    with _open_binary(path) as f:
        head = f.peek(64)[:64] if hasattr(f, "peek") else b""
        if head.lstrip()[:1] == b"[":  # a JSON array file
            raw = f.read()
            try:
                items = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield Record(path, raw.count(b"\n", 0, e.start) + 1, error="invalid UTF-8")
                return
            except json.JSONDecodeError as e:
                yield Record(path, e.lineno, error=f"malformed JSON ({e.msg}, column {e.colno})")
                return
            for i, obj in enumerate(items, 1):
                yield _json_text(obj, key, path, i)
            return
        n = 0
        while True:
            try:
                raw_line = f.readline()
            except (OSError, EOFError) as e:  # e.g. a truncated .gz
                yield Record(path, n + 1, error=f"read error ({e})")
                return
            if not raw_line:
                return
            n += 1
            if not raw_line.strip():
                continue
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Record(path, n, error=f"invalid UTF-8 (byte {e.start} of the line)")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield Record(path, n, error=f"malformed JSON ({e.msg}, column {e.colno})")
                continue
            yield _json_text(obj, key, path, n)


def _read_parquet(path: str, key: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        yield Record(path, None, error=f"unreadable parquet file ({e})")
        return
    names = pf.schema_arrow.names
    if key not in names:
        yield Record(path, None, error=f"missing column {key!r} (columns: {', '.join(names[:8])}; "
                                       "choose one with --json-key)")
        return
    field_type = pf.schema_arrow.field(key).type
    is_binary = pa.types.is_binary(field_type) or pa.types.is_large_binary(field_type)
    if not (is_binary or pa.types.is_string(field_type) or pa.types.is_large_string(field_type)):
        yield Record(path, None, error=f"column {key!r} has type {field_type}, not a string")
        return
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=[key]):
            for val in batch.column(0).to_pylist():
                row += 1
                if val is None:
                    yield Record(path, row, error=f"null value in column {key!r}")
                elif is_binary:
                    try:
                        yield Record(path, row, text=val.decode("utf-8"))
                    except UnicodeDecodeError:
                        yield Record(path, row, error="invalid UTF-8")
                else:
                    yield Record(path, row, text=val)
    except (OSError, pa.ArrowException) as e:
        yield Record(path, row + 1, error=f"parquet read error ({e})")


def _read_csv(path: str, key: str) -> Iterator[Record]:
    csv.field_size_limit(sys.maxsize)
    with _open_binary(path) as fb:
        f = io.TextIOWrapper(fb, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield Record(path, reader.line_num, error=f"malformed CSV ({e})")
            return
        if key not in header:
            yield Record(path, 1, error=f"missing column {key!r} (columns: {', '.join(header[:8])}; "
                                        "choose one with --json-key)")
            return
        col = header.index(key)
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield Record(path, start, error=f"malformed CSV ({e})")
                return
            if not row:
                continue
            if col >= len(row):
                yield Record(path, start, error=f"missing column {key!r} in this row ({len(row)} fields)")
                continue
            val = row[col]
            m = _BAD_UTF8.search(val)
            if m:
                yield Record(path, _line_of(val, m.start(), start), error="invalid UTF-8")
            else:
                yield Record(path, start, text=val)


def iter_records(path: str, fmt: Optional[str] = None, json_key: str = "text",
                 txt_mode: str = "file") -> Iterator[Record]:
    """Yield every record of one file (good or bad) in file order; never raises for bad data."""
    path = str(path)
    try:
        fmt = detect_format(path, fmt)
    except ValueError as e:
        yield Record(path, None, error=str(e).split(": ", 1)[-1])
        return
    if not os.path.isfile(path):
        yield Record(path, None, error="no such file")
        return
    readers = {"txt": lambda: _read_txt(path, txt_mode), "jsonl": lambda: _read_jsonl(path, json_key),
               "parquet": lambda: _read_parquet(path, json_key), "csv": lambda: _read_csv(path, json_key)}
    last_line = None
    try:
        for rec in readers[fmt]():
            last_line = rec.line
            yield rec
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        yield Record(path, last_line, error=f"unreadable file ({type(e).__name__}: {e})")


def iter_documents(paths: Iterable[str], fmt: Optional[str] = None, json_key: str = "text",
                   txt_mode: str = "file", skip_bad: bool = False) -> Iterator[Record]:
    """Yield records of all files in order; a bad record raises :class:`BadInputError` unless
    ``skip_bad`` (then it is yielded with ``.error`` set so the caller can count it)."""
    for path in paths:
        for rec in iter_records(path, fmt, json_key, txt_mode):
            if rec.error is not None and not skip_bad:
                raise BadInputError(rec)
            yield rec
