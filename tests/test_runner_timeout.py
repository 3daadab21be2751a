"""The suite's own timeout setting: a hung test fails alone, and the run goes on to its summary."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

HUNG_AND_FINE = '''
import time

def test_hangs():
    time.sleep(60)

def test_after_the_hang():
    assert 1 + 1 == 2
'''


def test_a_hung_test_fails_alone_under_the_projects_timeout_method(tmp_path):
    method = re.search(r'^timeout_method = "(\w+)"', PYPROJECT.read_text(), re.M).group(1)
    (tmp_path / "test_hang.py").write_text(HUNG_AND_FINE)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=2",
           "-o", f"timeout_method={method}", str(tmp_path / "test_hang.py")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=50, cwd=tmp_path)
    last = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 1 and "1 failed, 1 passed" in last, done.stdout[-2000:]
    assert "Timeout" in done.stdout
