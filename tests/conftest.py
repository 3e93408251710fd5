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


SKIPPABLE_FOR = "CUDA"  # the only thing CI lacks on purpose; every skip reason must name it


def _fail_foreign_skip(report) -> None:
    """A skip is allowed only for missing hardware: any other skip (a missing package, a stale
    importorskip) becomes a failure, so a broken install can never pass as green."""
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if SKIPPABLE_FOR not in reason:
            report.outcome = "failed"
            report.longrepr = (f"skipped for a reason other than missing {SKIPPABLE_FOR} hardware, which CI "
                               f"treats as a failure: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_foreign_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_foreign_skip(outcome.get_result())


@pytest.fixture(scope="session")
def progression_corpus(tmp_path_factory):
    """A Megatron .bin/.idx prefix of 200 learnable documents (arithmetic progressions mod 500,
    ids 3..502) for end-to-end trainer tests: the loss falls within a few iterations."""
    return write_progression_corpus(tmp_path_factory.mktemp("progressions") / "syn")


def write_progression_corpus(prefix):
    import numpy as np

    from megamoe.data import IndexedDatasetWriter
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(str(prefix), np.uint16) as w:
        for _ in range(200):
            start, stride, n = rng.integers(3, 500), rng.integers(1, 7), rng.integers(50, 400)
            w.add_document(((start + stride * np.arange(n)) % 500 + 3).tolist())
    return prefix
