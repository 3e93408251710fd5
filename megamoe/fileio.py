"""Atomic file writes shared by the checkpoint package, the corpus writers and the tools: a
reader sees the old file or the new one, never half of one (write a hidden temp file beside it,
fsync, rename over). Kept free of torch so that light modules can use it."""
from __future__ import annotations

import os
from pathlib import Path


def atomic_write_text(path: Path | str, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
