"""An exclusive lease on a run, so that two jobs never write one run at once.

On a run directory the lease is an OS lock (`flock`) on `<run_dir>/.lease`, whose text names the
holder (host, pid, start time). The OS drops the lock when the holder's process ends, however it
ends, so a lease left by a crashed run is taken over at once; the text it left says who that was.
A process may take its own lease again (the CLI takes it, then the runner); it is released when
the outermost holder lets go.

A run kept in an object store (`storage.path: s3://...`) can be written from several machines,
whose local locks do not see each other, so it also takes a lease object in the store
(`StoreLease`): a JSON record naming the holder, renewed by a background thread and deleted on
release. Object stores offer no lock through pyarrow; the protocol is write, wait, read back
(the last writer of two racing jobs wins, the other backs off), and the holder reads the record
again before each upload, so a job that lost its lease stops before it writes to the store. A
lease not renewed for `ttl_s` (its job died) is taken over, with a warning naming the old holder.
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
import uuid
from pathlib import Path
from typing import Iterator, Optional, Protocol

log = logging.getLogger("cpi_ray")

LEASE_NAME = ".lease"
STORE_LEASE_NAME = ".lease.json"  # in the store's copy of the run

_held: dict[Path, list] = {}  # run dir -> [open lease file, depth, directories it created]
_lock = threading.Lock()


class RunBusyError(RuntimeError):
    """Another live process holds the run directory."""


def _holder_text(text: str) -> str:
    try:
        return _describe(json.loads(text))
    except ValueError:
        return "an unknown process"


def _describe(holder: Optional[dict]) -> str:
    try:
        return f"pid {holder['pid']} on {holder['host']}, since {holder['started']}"
    except (KeyError, TypeError):
        return "an unknown process"


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


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
        f.write(json.dumps(_holder()) + "\n")
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


class LeaseStore(Protocol):
    """What a store lease needs of the run's object store (`io.remote.RunStore`)."""

    uri: str

    def read_text(self, rel: str) -> Optional[str]: ...

    def write_text(self, rel: str, text: str) -> None: ...

    def delete(self, rel: str) -> None: ...


class StoreLease:
    """The lease object of a run in an object store (see the module's docstring). `acquire`
    raises RunBusyError naming the holder when another live job holds it; `check` raises it when
    this job has lost it; `release` deletes it if it is still this job's."""

    def __init__(self, store: LeaseStore, ttl_s: float = 300.0, settle_s: float = 2.0):
        self.store, self.ttl_s, self.settle_s = store, ttl_s, settle_s
        self.record = {**_holder(), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lost: Optional[str] = None

    def _read(self) -> Optional[dict]:
        text = self.store.read_text(STORE_LEASE_NAME)
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return {"token": None}

    def _write(self) -> None:
        self.record["renewed"] = time.time()
        self.store.write_text(STORE_LEASE_NAME, json.dumps(self.record))

    def acquire(self) -> "StoreLease":
        other = self._read()
        if other is not None:
            age = time.time() - float(other.get("renewed", 0))
            if age < self.ttl_s:
                raise RunBusyError(
                    f"run {self.store.uri} is in use by {_describe(other)} (its lease was "
                    f"renewed {max(age, 0):.0f}s ago and lapses {self.ttl_s:.0f}s after the last renewal); "
                    "wait for that run to end or use another run name"
                )
            log.warning(
                "run %s: taking over the lease of %s, not renewed for %.0fs",
                self.store.uri,
                _describe(other),
                age,
            )
        self._write()
        time.sleep(self.settle_s)  # a job that wrote at the same moment overwrites us by now
        now = self._read()
        if now is None or now.get("token") != self.record["token"]:
            raise RunBusyError(
                f"run {self.store.uri} was taken at the same moment by "
                f"{_describe(now)}; wait for that run to end or use another run name"
            )
        self._thread = threading.Thread(target=self._renew, name="cpi-store-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                now = self._read()
                if now is None or now.get("token") != self.record["token"]:
                    self._lost = _describe(now)
                    return
                self._write()
            except Exception as e:  # noqa: BLE001 - a store hiccup: the next renewal retries
                log.warning("run %s: renewing the lease failed (%s); retrying", self.store.uri, e)

    def check(self) -> None:
        """Raise RunBusyError unless the store's lease record is still this job's."""
        now = self._read()
        if self._lost is None and now is not None and now.get("token") == self.record["token"]:
            return
        holder = self._lost or _describe(now)
        raise RunBusyError(
            f"run {self.store.uri}: this job lost its lease to {holder}; it stops before writing to the store"
        )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        now = self._read()
        if now is not None and now.get("token") == self.record["token"]:
            self.store.delete(STORE_LEASE_NAME)


@contextlib.contextmanager
def store_lease(store: LeaseStore, ttl_s: float = 300.0, settle_s: float = 2.0) -> Iterator[StoreLease]:
    """Hold the store lease of a run for the block (see `StoreLease`)."""
    lease = StoreLease(store, ttl_s, settle_s).acquire()
    try:
        yield lease
    finally:
        lease.release()
