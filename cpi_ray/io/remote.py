"""Runs kept in an object store (`storage.path: s3://...` or `gs://...`), through pyarrow's
filesystems.

Stages read and write a working copy of the run (`storage.local_path/<run_name>`, a shared mount
on multi-node clusters); the object store holds the durable copy. Before the first stage the
working copy is brought up to date from the store (a run can resume on a fresh machine or a new
cluster), and after each stage its outputs are uploaded, then its `stage.json` last: a stage
record in the store is only ever written once every file it lists is there, so the store never
claims an artifact it does not hold, however the upload is interrupted.

A store URI may carry pyarrow's S3 options as a query (`s3://bucket/prefix?endpoint_override=
host:port&scheme=http` for MinIO or another S3-compatible server); credentials come from the
environment or the instance's role, never from the config.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

from cpi_ray.io.atomic import atomic_file
from cpi_ray.io.records import RECORD_NAME, output_problem

log = logging.getLogger("cpi_ray")

_COPY_BYTES = 8 * 2**20


class StorageError(RuntimeError):
    pass


def join_uri(uri: str, *parts: str) -> str:
    """`uri` with path segments appended, keeping its query (the filesystem options)."""
    u = urlsplit(uri)
    path = "/".join([u.path.rstrip("/"), *(p.strip("/") for p in parts)])
    return urlunsplit((u.scheme, u.netloc, path, u.query, ""))


class RunStore:
    """The durable copy of one run directory in an object store."""

    def __init__(self, uri: str):
        import pyarrow.fs as pafs  # slow to import: only object-store runs need it, not the CLI

        self.uri = uri
        try:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a bad URI
            raise StorageError(f"storage.path {uri!r}: {e}") from None
        self.root = self.root.rstrip("/")

    def _key(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def check(self) -> None:
        """Fail now, naming the store, when it cannot be reached or listed."""
        try:
            self.fs.get_file_info(self.root)
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"storage.path {self.uri!r} is not reachable: {e}") from None

    def read_record(self, folder: str) -> Optional[dict]:
        try:
            with self.fs.open_input_stream(self._key(f"{folder}/{RECORD_NAME}")) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise StorageError(f"{self.uri}/{folder}/{RECORD_NAME}: unreadable ({e})") from None

    # ------------------------------------------------------------------ store -> working copy

    def pull(self, run_dir: Path, folders: list[str]) -> list[str]:
        """Bring each stage folder of the working copy up to date with the store: every output
        the store's record lists (unless an identical file is already here), then the record.
        Returns the folders that came from the store."""

        pulled = []
        for folder in folders:
            rec = self.read_record(folder)
            if rec is None:
                continue
            local_rec = run_dir / folder / RECORD_NAME
            if local_rec.is_file() and _same_record(local_rec, rec):
                continue
            for out in rec.get("outputs", []):
                dst = run_dir / out["path"]
                if output_problem(dst, out) is not None:
                    self._download(out["path"], dst)
            with atomic_file(local_rec, "w") as f:
                json.dump(rec, f, indent=2)
            pulled.append(folder)
            log.info("storage: %s restored from %s", folder, self.uri)
        return pulled

    def _download(self, rel: str, dst: Path) -> None:
        try:
            with self.fs.open_input_stream(self._key(rel)) as src, atomic_file(dst) as out:
                while chunk := src.read(_COPY_BYTES):
                    out.write(chunk)
        except FileNotFoundError:
            raise StorageError(
                f"{join_uri(self.uri, rel)}: listed in its stage record but missing from the store"
            ) from None

    # ------------------------------------------------------------------ working copy -> store

    def push(self, run_dir: Path, folder: str) -> int:
        """Upload a finished stage: its record leaves the store first, then every output that
        differs from the store's copy goes up, files the record no longer lists are removed, and
        the record goes up last. Returns the number of files uploaded."""
        local = json.loads((run_dir / folder / RECORD_NAME).read_text())
        remote = self.read_record(folder)
        if remote == local:
            return 0
        have = {o["path"]: o["sha256"] for o in (remote or {}).get("outputs", [])}
        self._delete(f"{folder}/{RECORD_NAME}")
        uploaded = 0
        for out in local["outputs"]:
            if have.get(out["path"]) != out["sha256"]:
                self._upload(run_dir / out["path"], out["path"])
                uploaded += 1
        keep = {o["path"] for o in local["outputs"]}
        for stale in set(have) - keep:
            self._delete(stale)
        self._upload(run_dir / folder / RECORD_NAME, f"{folder}/{RECORD_NAME}")
        log.info("storage: %s uploaded to %s (%d file(s))", folder, join_uri(self.uri, folder), uploaded)
        return uploaded + 1

    def put_file(self, src: Path, rel: str) -> None:
        self._upload(src, rel)

    def read_text(self, rel: str) -> Optional[str]:
        """A small object's text, None when it does not exist."""
        try:
            with self.fs.open_input_stream(self._key(rel)) as f:
                return f.read().decode()
        except FileNotFoundError:
            return None

    def write_text(self, rel: str, text: str) -> None:
        key = self._key(rel)
        self.fs.create_dir(os.path.dirname(key), recursive=True)
        with self.fs.open_output_stream(key) as out:
            out.write(text.encode())

    def delete(self, rel: str) -> None:
        self._delete(rel)

    def _upload(self, src: Path, rel: str) -> None:
        key = self._key(rel)
        self.fs.create_dir(os.path.dirname(key), recursive=True)
        with open(src, "rb") as f, self.fs.open_output_stream(key) as out:
            while chunk := f.read(_COPY_BYTES):
                out.write(chunk)

    def _delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self._key(rel))
        except FileNotFoundError:
            pass


def _same_record(local: Path, remote: dict) -> bool:
    try:
        return json.loads(local.read_text()) == remote
    except (OSError, ValueError):
        return False
