"""The run directory's lease: one live run at a time, the holder named to the second, re-entrant
in its own process, taken over from a run that died without releasing it; and the job itself
stops a second run before it writes anything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cpi_ray.io.lease import LEASE_NAME, RunBusyError, run_lease

ROOT = Path(__file__).resolve().parents[1]

HOLD = textwrap.dedent("""
    import sys
    from cpi_ray.io.lease import run_lease
    with run_lease(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.read()
""")


def _holder(run_dir: Path):
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_holder_is_refused_with_the_holders_name(tmp_path):
    other = _holder(tmp_path / "run")
    try:
        with pytest.raises(RunBusyError, match=f"pid {other.pid} on "):
            with run_lease(tmp_path / "run"):
                pass
    finally:
        other.stdin.close()
        other.wait(timeout=30)
    # Released on exit; the holder wrote nothing, so the directory it created is gone again.
    assert not (tmp_path / "run").exists()
    with run_lease(tmp_path / "run"):
        held = json.loads((tmp_path / "run" / LEASE_NAME).read_text())
        assert held["pid"] == os.getpid()


def test_reentrant_in_one_process_and_released_by_the_outermost(tmp_path):
    with run_lease(tmp_path):
        with run_lease(tmp_path):
            pass
        assert json.loads((tmp_path / LEASE_NAME).read_text())["pid"] == os.getpid()
        (tmp_path / "config.yaml").write_text("x")  # the run wrote something: all stays
    assert (tmp_path / LEASE_NAME).read_text() == ""  # released cleanly
    assert (tmp_path / "config.yaml").is_file()


def test_lease_of_a_killed_run_is_taken_over_and_logged(tmp_path, caplog):
    other = _holder(tmp_path)
    other.send_signal(signal.SIGKILL)
    other.wait(timeout=30)
    assert json.loads((tmp_path / LEASE_NAME).read_text())["pid"] == other.pid  # left behind
    with caplog.at_level("WARNING", logger="cpi_ray"):
        with run_lease(tmp_path):
            pass
    assert f"pid {other.pid}" in caplog.text and "taking over" in caplog.text


def test_second_job_on_a_held_run_dir_exits_non_zero_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    other = _holder(run_dir)
    try:
        out = subprocess.run(
            [
                sys.executable,
                "jobs/cpi_pipeline.py",
                "--config",
                "jobs/configs/smoke.yaml",
                "--run-dir",
                str(run_dir),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
        assert [p.name for p in run_dir.iterdir()] == [LEASE_NAME]
        assert json.loads((run_dir / LEASE_NAME).read_text())["pid"] == other.pid
    finally:
        other.stdin.close()
        other.wait(timeout=30)
    assert out.returncode == 1
    assert f"is in use by pid {other.pid}" in out.stderr.strip().splitlines()[-1]
