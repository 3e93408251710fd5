"""The command-line tools: each `python tools/X.py` is the `megamoe-X` console script, both run
megamoe.cli.X:main, and no script edits sys.path (the package comes from the install)."""
import importlib
import importlib.metadata
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# every module in megamoe/cli is a tool: a console script and a tools/ wrapper each
TOOLS = sorted(p.stem for p in (ROOT / "megamoe" / "cli").glob("*.py") if p.stem != "__init__")


def test_console_scripts_point_at_the_tools_mains():
    # the installed distribution's metadata (a source tree's megamoe.egg-info can be stale)
    dist = next(importlib.metadata.distributions(name="megamoe", path=[sysconfig.get_paths()["purelib"]]))
    scripts = {e.name: e.value for e in dist.entry_points if e.group == "console_scripts"}
    assert scripts.pop("megamoe-pretrain") == "megamoe.pretrain:main"
    assert scripts == {f"megamoe-{t.replace('_', '-')}": f"megamoe.cli.{t}:main" for t in TOOLS}
    for t in TOOLS:
        assert callable(importlib.import_module(f"megamoe.cli.{t}").main)
        wrapper = (ROOT / "tools" / f"{t}.py").read_text()
        assert f"from megamoe.cli.{t} import main" in wrapper


def test_no_script_edits_sys_path():
    offenders = [str(p.relative_to(ROOT)) for folder in ("tools", "bench", "megamoe/cli")
                 for p in (ROOT / folder).glob("*.py") if re.search(r"sys\.path\s*(\.insert|\[|=)", p.read_text())]
    assert offenders == []


@pytest.mark.parametrize("tool", ["preprocess", "convert_to_hf"])
def test_tools_run_from_any_directory(tool, tmp_path):
    for cmd in ([sys.executable, str(ROOT / "tools" / f"{tool}.py"), "--help"],
                [str(Path(sys.executable).with_name(f"megamoe-{tool.replace('_', '-')}")), "--help"]):
        r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]
