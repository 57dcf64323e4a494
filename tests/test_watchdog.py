"""The suite's hang watchdog (tests/conftest.py): a hung test fails with its stack, and a hang
that SIGALRM cannot break ends the run with every thread's stack instead of running out CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent

HUNG = '''
import signal, time
import pytest

@pytest.mark.timeout(1)
def test_sleeps_past_its_timeout():
    time.sleep(30)

def test_after_it_still_runs():
    pass

@pytest.mark.timeout(1)
def test_deaf_to_sigalrm():
    signal.signal(signal.SIGALRM, signal.SIG_IGN)  # as a C call that never returns to Python
    time.sleep(30)

def test_never_reached():
    pass
'''


def test_a_hang_fails_its_test_and_a_deaf_hang_ends_the_run_with_stacks(tmp_path):
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_hung.py").write_text(HUNG)
    env = {**os.environ, "COSINE_TEST_BACKSTOP_S": "2"}
    p = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-o", "timeout=600",
                        str(tmp_path / "test_hung.py")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60)
    out = p.stdout + p.stderr
    assert "test_sleeps_past_its_timeout FAILED" in out, out
    assert "Timeout" in out and "test_after_it_still_runs PASSED" in out, out
    # the backstop: faulthandler's dump names the hung test's frame, then the process exits
    assert "Timeout (0:00:03)!" in out and "test_deaf_to_sigalrm" in out.split("Timeout (0:00:03)!")[1], out
    assert "test_never_reached" not in out.split("Timeout (0:00:03)!")[1], out
    assert p.returncode != 0
