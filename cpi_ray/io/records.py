"""What a stage record checks: the sha256 and size of each output, and the hash of a config
slice. Here, below the run layer, because the run store verifies records too."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

RECORD_NAME = "stage.json"


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: Path, bufsize: int = 8 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def output_problem(path: Path, out: dict) -> Optional[str]:
    """What is wrong with `path` as the output a stage record lists as `out` (its size and
    sha256), or None when it is intact."""
    if not path.is_file():
        return "is missing"
    if path.stat().st_size != out["bytes"]:
        return f"has {path.stat().st_size} bytes, the record says {out['bytes']}"
    if file_sha256(path) != out["sha256"]:
        return "fails its sha256 check"
    return None
