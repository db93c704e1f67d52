"""A stage record (`<stage folder>/stage.json`): its fingerprint, and each output's path (relative
to the run directory), size and sha256. Read, written and verified here, below the run layer,
because the stage protocol, the run store and the Tune cache all check records."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

RECORD_NAME = "stage.json"


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: Path, bufsize: int = 8 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def output_problem(path: Path, out: dict, check: Literal["sha256", "size"] = "sha256") -> Optional[str]:
    """What is wrong with `path` as the output a stage record lists as `out` (its size and
    sha256, or its size only), or None when it is intact."""
    if not path.is_file():
        return "is missing"
    if path.stat().st_size != out["bytes"]:
        return f"has {path.stat().st_size} bytes, the record says {out['bytes']}"
    if check == "sha256" and file_sha256(path) != out["sha256"]:
        return "fails its sha256 check"
    return None


def load_record(path: Path) -> Optional[dict]:
    """The record at `path`, or None when there is none (or only a torn or foreign file)."""
    try:
        rec = json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) and "fingerprint" in rec else None


def finished_item(
    folder: Path, record: str, fingerprint: str, requires: tuple[str, ...] = ()
) -> Optional[dict]:
    """The record `folder/record` of one item a stage resumes by (a probe, a consolidation or
    baseline stage, a baseline mode), when it was written for `fingerprint` and the files
    `requires` are beside it; None when the item must be (re)done. Items write their record last,
    so a record with the right fingerprint means the item finished."""
    rec = load_record(Path(folder) / record)
    if rec is None or rec["fingerprint"] != fingerprint:
        return None
    return rec if all((Path(folder) / f).is_file() for f in requires) else None


def output_entry(path: Path, root: Path) -> dict:
    """How a record lists the file `path` of the run directory `root`."""
    return {"path": str(path.relative_to(root)), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def record_problem(
    rec: dict, root: Path, check: Literal["sha256", "size"] = "sha256", strip: str = ""
) -> Optional[tuple[str, str]]:
    """The first output of `rec` that is not intact under `root`, as (its path, what is wrong),
    or None. `strip`: a leading folder the record's paths carry and `root` does not (a Tune cache
    entry holds one stage folder)."""
    for out in rec.get("outputs", []):
        rel = Path(out["path"])
        if strip:
            rel = rel.relative_to(strip)
        problem = output_problem(root / rel, out, check)
        if problem is not None:
            return out["path"], problem
    return None
