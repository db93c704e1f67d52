"""The code is lint-clean and formatted as `pyproject.toml` configures ruff."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["cpi_ray", "tests", "benchmarks", "jobs"]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, *PATHS], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_ruff_check_is_clean():
    r = _ruff("check", "--output-format", "concise")
    assert r.returncode == 0, r.stdout[-3000:]


def test_ruff_format_is_clean():
    r = _ruff("format", "--check")
    assert r.returncode == 0, r.stdout[-3000:]
