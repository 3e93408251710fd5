"""Test-session setup shared by every test.

TRITON_INTERPRET must be set before any module defining Triton kernels is imported (@triton.jit
decides at decoration time); with it set, the dispatch in kernels/ still uses the PyTorch
reference unless a test forces Triton (kernels.set_backend("triton")), so only kernel tests pay
for the interpreter.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or long end-to-end tests")


@pytest.fixture(scope="session")
def progression_corpus(tmp_path_factory):
    """A Megatron .bin/.idx prefix of 200 learnable documents (arithmetic progressions mod 500,
    ids 3..502) for end-to-end trainer tests: the loss falls within a few iterations."""
    import numpy as np

    from megamoe.data import IndexedDatasetWriter
    prefix = tmp_path_factory.mktemp("progressions") / "syn"
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(str(prefix), np.uint16) as w:
        for _ in range(200):
            start, stride, n = rng.integers(3, 500), rng.integers(1, 7), rng.integers(50, 400)
            w.add_document(((start + stride * np.arange(n)) % 500 + 3).tolist())
    return prefix
