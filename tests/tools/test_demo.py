"""tools/demo.py's file order: the split's validation tail holds every genre."""
import importlib.util
from pathlib import Path

from megamoe.data.dataset import split_documents

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("demo", ROOT / "tools" / "demo.py")
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)


def test_spread_keeps_each_genre_in_order_and_puts_every_genre_in_the_validation_tail():
    genres = [[Path(f"{g}{i}") for i in range(n)] for g, n in (("play", 38), ("book", 66), ("article", 101))]
    files = demo.spread(*genres)
    assert sorted(files) == sorted(f for g in genres for f in g)
    for g in genres:
        assert [f for f in files if f in g] == g
    _, valid = split_documents(len(files), [98, 2])          # the demo's --split 98,2
    tail = {files[i].name.rstrip("0123456789") for i in valid}
    assert tail == {"play", "book", "article"}
