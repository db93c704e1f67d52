"""The stage protocol: what a stage depends on, where it records what it produced, and when a
rerun may skip it.

A stage's *fingerprint* hashes its own config slice, the fingerprints of the stages it reads and
the identity of the base model. After a stage's outputs are in place it writes
`<folder>/stage.json` with that fingerprint, its outputs (size and sha256 each) and its wall time.
A rerun skips a stage whose record carries the same fingerprint and whose outputs are intact;
anything else makes the stage run again (its old record is removed first, so an interrupted run
never leaves a record that claims outputs it did not finish).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from cpi_ray.config.schema import PipelineConfig
from cpi_ray.config.stages import STAGE_FOLDERS
from cpi_ray.io.atomic import remove_stale_temps, write_json
from cpi_ray.io.records import RECORD_NAME, load_record, output_entry, record_problem, stable_hash
from cpi_ray.run.layout import RunLayout

log = logging.getLogger("cpi_ray")


@dataclass
class RunContext:
    """What every stage gets: the validated config, the run directory and the resolved base
    model directory (materialized before the first stage)."""

    cfg: PipelineConfig
    run_dir: Path
    base_model_dir: Path
    base_model_id: str  # identity of the base weights, part of every fingerprint
    records: dict[str, dict] = field(default_factory=dict)  # stage name -> its record, this run
    # Stages whose outputs this run has checked against their records (or written): a stage's
    # inputs are hashed at most once per run.
    verified: set[str] = field(default_factory=set)

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)

    def task_names(self) -> list[str]:
        return [t.name for t in self.cfg.tasks]


class Stage(ABC):
    name: ClassVar[str]
    folder: ClassVar[str]  # relative to the run dir; holds the record (from the registry)
    depends: ClassVar[tuple[str, ...]] = ()
    version: ClassVar[int] = 1  # bump when the stage's output format or math changes

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A registered stage's folder is the registry's (config/stages.py), never its own.
        if getattr(cls, "name", None) in STAGE_FOLDERS:
            cls.folder = STAGE_FOLDERS[cls.name]

    @abstractmethod
    def config_slice(self, cfg: PipelineConfig) -> dict:
        """Every config value whose change must redo this stage."""

    @abstractmethod
    def run(self, ctx: RunContext) -> list[Path]:
        """Produce the outputs (each written atomically) and return their paths."""

    def dependencies(self, ctx: RunContext) -> tuple[str, ...]:
        """The stages whose outputs this run of the stage reads; `depends` unless a stage's
        inputs vary with the run (evaluate reads whichever models exist)."""
        return self.depends

    def summary(self, ctx: RunContext) -> Optional[str]:
        """A line or a table for the end-of-run summary, read back from the outputs."""
        return None

    # ------------------------------------------------------------------ protocol

    def record_path(self, ctx: RunContext) -> Path:
        return ctx.path(self.folder, RECORD_NAME)

    def fingerprint(self, ctx: RunContext) -> tuple[str, dict[str, str]]:
        inputs = {"base_model": ctx.base_model_id}
        for dep in self.dependencies(ctx):
            rec = ctx.records.get(dep) or load_record(ctx.path(STAGE_FOLDERS[dep], RECORD_NAME))
            if rec is None:
                raise RuntimeError(
                    f"stage {self.name!r} needs stage {dep!r}, which has not run in {ctx.run_dir};"
                    f" run it first (add it to --stages)"
                )
            inputs[dep] = rec["fingerprint"]
        cfg_hash = stable_hash(self.config_slice(ctx.cfg))
        fp = stable_hash({"stage": self.name, "version": self.version, "config": cfg_hash, "inputs": inputs})
        return fp, {"config_hash": cfg_hash, **inputs}

    def completed(self, ctx: RunContext) -> Optional[dict]:
        """The record if this stage's outputs are current and intact, else None."""
        rec = load_record(self.record_path(ctx))
        if rec is None:
            return None
        try:
            fp, _ = self.fingerprint(ctx)
        except RuntimeError:
            return None
        if rec.get("fingerprint") != fp:
            return None
        problem = record_problem(rec, ctx.run_dir)
        if problem is not None:
            log.warning("stage %s: output %s %s; redoing the stage", self.name, *problem)
            return None
        ctx.verified.add(self.name)
        return rec

    def verify_inputs(self, ctx: RunContext) -> None:
        """Every output of the stages this one reads must still be what their records say: a
        replaced or damaged input stops the stage before it reads anything, naming the file."""
        for dep in self.dependencies(ctx):
            if dep in ctx.verified:
                continue
            rec = ctx.records.get(dep) or load_record(ctx.path(STAGE_FOLDERS[dep], RECORD_NAME))
            if rec is None:
                continue  # the fingerprint names the stage that has not run
            problem = record_problem(rec, ctx.run_dir)
            if problem is not None:
                path, what = problem
                raise RuntimeError(
                    f"stage {self.name!r}: its input {path} {what} since stage {dep!r} wrote it;"
                    f" rerun {dep!r} (add it to --stages)"
                )
            ctx.verified.add(dep)

    def execute(self, ctx: RunContext, before_run: Optional[Callable[[], None]] = None) -> tuple[dict, bool]:
        """Run the stage unless its record is current. Returns (record, ran). `before_run` is
        called when the stage is about to run (the runner's free-space check)."""
        rec = self.completed(ctx)
        if rec is not None:
            ctx.records[self.name] = rec
            return rec, False
        fp, inputs = self.fingerprint(ctx)
        self.verify_inputs(ctx)
        if before_run is not None:
            before_run()
        self.record_path(ctx).unlink(missing_ok=True)
        folder = ctx.path(self.folder)
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder)
        t0 = time.time()
        try:
            outputs = self.run(ctx)
        except BaseException:
            # A stage that refuses or fails leaves no empty folder behind (fused/ is a model).
            if created and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
            raise
        wall = time.time() - t0
        files: list[dict] = []
        for out in outputs:
            out = Path(out)
            for f in sorted(out.rglob("*")) if out.is_dir() else [out]:
                if f.is_file() and f.name != RECORD_NAME:
                    files.append(output_entry(f, ctx.run_dir))
        rec = {
            "stage": self.name,
            "fingerprint": fp,
            "inputs": inputs,
            "outputs": files,
            "wall_time_s": round(wall, 3),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(self.record_path(ctx), rec)
        ctx.records[self.name] = rec
        ctx.verified.add(self.name)
        return rec, True
