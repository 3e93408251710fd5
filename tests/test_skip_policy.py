"""The suite's skip policy (tests/conftest.py): only missing CUDA hardware may skip a test."""
import shutil
import subprocess
import sys
from pathlib import Path

CASES = '''
import pytest

def test_missing_package():
    pytest.importorskip("megamoe_no_such_package")

@pytest.mark.skipif(True, reason="needs a CUDA GPU")
def test_needs_gpu():
    pass
'''


def test_only_cuda_skips_pass(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_cases.py").write_text(CASES)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(tmp_path)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 1, r.stdout
    assert "1 failed, 1 skipped" in r.stdout and "megamoe_no_such_package" in r.stdout, r.stdout
    assert "needs a CUDA GPU" in r.stdout
