"""Fault injection for the reliability tests, importable without torch (fusion actors use it)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def kill_once(marker: str | os.PathLike, delay_s: float = 0.0) -> None:
    """SIGKILL this process the first time it gets here; the marker file records that it
    happened, so the restarted process carries on."""
    marker = Path(marker)
    if marker.exists():
        return
    marker.write_text("killed\n")
    time.sleep(delay_s)
    os.kill(os.getpid(), signal.SIGKILL)
