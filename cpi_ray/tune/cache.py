"""Content-addressed stage cache: `tune/cache/<stage>/<fingerprint>/` holds one stage folder
(outputs and `stage.json`) as the first trial that needed it produced it. A trial whose stage has
that fingerprint gets the folder hard-linked into its own run directory (no copy, no recompute)
and the stage's own protocol then verifies it and skips. The fingerprint already hashes exactly
the knobs the stage depends on and its inputs' fingerprints, so two trials share an entry exactly
when they would compute the same outputs.

Trials on one node serialize on a lock per entry: the second one waits for the first to publish,
then links. (On shared storage without working `flock`, two trials may both compute; publishing
is an atomic rename, so the cache stays consistent either way.)
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from cpi_ray.io.atomic import file_lock, link_or_copy
from cpi_ray.io.records import RECORD_NAME, load_record, record_problem
from cpi_ray.run.stage import RunContext, Stage

log = logging.getLogger("cpi_ray")

# How a trial got a stage: computed here (and published), linked from the cache, or already
# current in the trial's own folder (a restarted trial).
RAN, CACHED, CURRENT = "ran", "cached", "current"


def link_tree(src: Path, dst: Path) -> Path:
    """Replace `dst` with a tree of hard links to `src`'s files (copies across filesystems),
    built under a temporary name and renamed into place."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.link-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for root, _dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        (tmp / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            if f.startswith(".") and ".tmp" in f:
                continue  # an unfinished atomic write of the source
            link_or_copy(Path(root) / f, tmp / rel / f)
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return dst


class StageCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def entry(self, stage: str, fingerprint: str) -> Path:
        return self.root / stage / fingerprint

    def lookup(self, stage: Stage, fingerprint: str) -> Optional[Path]:
        """The entry when it holds a finished record of this fingerprint with all its outputs
        (sizes only; the stage protocol checks sha256 after linking)."""
        entry = self.entry(stage.name, fingerprint)
        rec = load_record(entry / RECORD_NAME)
        if rec is None or rec.get("fingerprint") != fingerprint:
            return None
        if record_problem(rec, entry, check="size", strip=stage.folder) is not None:
            return None
        return entry

    def materialize(self, stage: Stage, ctx: RunContext) -> tuple[dict, str]:
        """Give `ctx`'s run directory this stage's outputs: from the cache when an entry has
        the stage's fingerprint, else by running the stage there and publishing the result.
        Returns (the stage's record, RAN | CACHED | CURRENT)."""
        fp, _ = stage.fingerprint(ctx)
        entry = self.entry(stage.name, fp)
        with file_lock(entry.parent / f"{fp}.lock"):
            if self.lookup(stage, fp) is not None:
                if stage.completed(ctx) is None:
                    link_tree(entry, ctx.path(stage.folder))
                    how = CACHED
                else:
                    how = CURRENT
                rec, ran = stage.execute(ctx)
                if ran:  # the linked outputs failed verification: the stage redid them
                    self.publish(ctx.path(stage.folder), entry)
                    how = RAN
                log.info("stage %s: %s (cache entry %s)", stage.name, how, fp)
                return rec, how
            rec, ran = stage.execute(ctx)
            self.publish(ctx.path(stage.folder), entry)
            log.info("stage %s: %s, published to the cache (%s)", stage.name, RAN if ran else CURRENT, fp)
            return rec, RAN if ran else CURRENT

    def publish(self, folder: Path, entry: Path) -> None:
        link_tree(folder, entry)

    def entries(self, stage: str) -> list[Path]:
        d = self.root / stage
        return (
            sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")) if d.is_dir() else []
        )
