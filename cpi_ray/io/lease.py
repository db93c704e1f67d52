"""An exclusive lease on a run directory, so that two jobs never write one run at once.

The lease is an OS lock (`flock`) on `<run_dir>/.lease`, whose text names the holder (host, pid,
start time). The OS drops the lock when the holder's process ends, however it ends, so a lease
left by a crashed run is taken over at once; the text it left says who that was. A process may
take its own lease again (the CLI takes it, then the runner); it is released when the outermost
holder lets go.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger("cpi_ray")

LEASE_NAME = ".lease"

_held: dict[Path, list] = {}  # run dir -> [open lease file, depth, directories it created]
_lock = threading.Lock()


class RunBusyError(RuntimeError):
    """Another live process holds the run directory."""


def _holder_text(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, since {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "an unknown process"


@contextlib.contextmanager
def run_lease(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold the run directory's lease for the block; raise RunBusyError, naming the holder,
    when another process holds it."""
    run_dir = Path(run_dir).resolve()
    with _lock:
        if run_dir in _held:
            _held[run_dir][1] += 1
            reentered = True
        else:
            reentered = False
    if not reentered:
        created = [d for d in (run_dir, *run_dir.parents) if not d.exists()]
        run_dir.mkdir(parents=True, exist_ok=True)
        f = open(run_dir / LEASE_NAME, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _holder_text(f.read())
            f.close()
            _remove_if_unused(run_dir, created)
            raise RunBusyError(
                f"run directory {run_dir} is in use by {holder}; wait for that "
                "run to end or use another run directory"
            ) from None
        f.seek(0)
        previous = f.read().strip()
        if previous:
            log.warning(
                "run directory %s: taking over the lease of %s, which ended without releasing it",
                run_dir,
                _holder_text(previous),
            )
        f.seek(0)
        f.truncate()
        f.write(
            json.dumps(
                {
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
            )
            + "\n"
        )
        f.flush()
        with _lock:
            _held[run_dir] = [f, 1, created]
    try:
        yield run_dir
    finally:
        with _lock:
            entry = _held[run_dir]
            entry[1] -= 1
            last = entry[1] == 0
            if last:
                del _held[run_dir]
        if last:
            f = entry[0]
            f.seek(0)
            f.truncate()  # an empty lease file: released cleanly
            f.flush()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            f.close()
            _remove_if_unused(run_dir, entry[2])


def _remove_if_unused(run_dir: Path, created: list[Path]) -> None:
    """A run that stopped before writing anything leaves no trace: the directories the lease
    created, if they hold nothing but the lease file."""
    if not created or any(p.name != LEASE_NAME for p in run_dir.iterdir()):
        return
    (run_dir / LEASE_NAME).unlink(missing_ok=True)
    for d in created:  # innermost first
        try:
            d.rmdir()
        except OSError:
            return
