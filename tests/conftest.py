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
