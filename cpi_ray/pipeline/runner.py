"""Run the selected stages in order over one run directory."""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from cpi_ray.config.schema import PipelineConfig
from cpi_ray.config.stages import STAGE_FOLDERS, STAGES, stage_spec
from cpi_ray.io.atomic import atomic_file
from cpi_ray.io.lease import StoreLease, run_lease, store_lease
from cpi_ray.io.remote import RunStore, join_uri
from cpi_ray.models.export import push_to_hub
from cpi_ray.pipeline.check import check_shared_storage, require_chat_template
from cpi_ray.pipeline.plan import Plan, build_plan, check_free_space, facts_from_config_dir
from cpi_ray.run.layout import RunLayout
from cpi_ray.run.stage import RunContext, Stage

# Imported where used: cpi_ray.models.loading, cpi_ray.data (torch, numpy; the CLI imports this module).

log = logging.getLogger("cpi_ray")


def load_stage(name: str) -> Stage:
    module, cls = stage_spec(name).cls.split(":")
    return getattr(importlib.import_module(module), cls)()


@dataclass
class StageOutcome:
    name: str
    status: str  # "ran", "skipped (up to date)"
    wall_s: float
    folder: str


@dataclass
class PipelineResult:
    run_dir: Path
    outcomes: list[StageOutcome] = field(default_factory=list)
    summaries: list[str] = field(default_factory=list)
    store_uri: Optional[str] = None  # where the run is kept when storage.path is a bucket

    def render(self) -> str:
        lines = [f"run directory: {self.run_dir}"]
        if self.store_uri:
            lines.append(f"kept in: {self.store_uri}")
        lines += ["", "stage        status                 wall    output"]
        for o in self.outcomes:
            lines.append(f"{o.name:<12} {o.status:<22} {o.wall_s:6.1f}s  {self.run_dir / o.folder}")
        for s in self.summaries:
            lines += ["", s]
        return "\n".join(lines)


def resolve_run_dir(cfg: PipelineConfig, run_dir: Optional[str]) -> Path:
    """The run directory the stages work in (with an object-store path: the working copy)."""
    root = Path(cfg.storage.work_root) / cfg.storage.run_name
    return Path(run_dir or root).expanduser().resolve()


def run_store(cfg: PipelineConfig):
    """The object-store copy of the run when `storage.path` is a URI, else None."""
    if not cfg.storage.remote:
        return None

    return RunStore(join_uri(cfg.storage.path, cfg.storage.run_name))


def run_pipeline(cfg: PipelineConfig, run_dir: Path, stages: Optional[list[str]] = None) -> PipelineResult:
    """Run the selected stages in order, holding the run directory's lease throughout (a second
    run on the same directory stops at once, naming the holder)."""
    with run_lease(run_dir):
        return _run_stages(cfg, run_dir, stages)


def _run_stages(cfg: PipelineConfig, run_dir: Path, stages: Optional[list[str]]) -> PipelineResult:
    from cpi_ray.models.loading import resolve_base_model

    base_dir, base_id = resolve_base_model(cfg)
    log.info("base model: %s", base_dir)
    check_prompt_format(cfg, base_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    store = run_store(cfg)
    if store is None:
        return _run_in(cfg, run_dir, stages, base_dir, base_id, None, None)
    store.check()
    # Jobs on other machines share the store, not this machine's lock on the working copy.
    with store_lease(store, cfg.storage.lease_ttl_s) as lease:
        return _run_in(cfg, run_dir, stages, base_dir, base_id, store, lease)


def _run_in(
    cfg: PipelineConfig,
    run_dir: Path,
    stages: Optional[list[str]],
    base_dir: Path,
    base_id: str,
    store: Optional[RunStore],
    lease: Optional[StoreLease],
) -> PipelineResult:
    """The stages in order in `run_dir`, kept in `store` (when the run has one) under `lease`."""
    check_shared_storage(run_dir)
    selected = [s for s in STAGES if s in (stages or cfg.stages)]
    if store is not None:
        # Every stage folder, not only the selected ones: later stages read earlier outputs.
        store.pull(run_dir, list(STAGE_FOLDERS.values()))
    _write_config(cfg, run_dir)
    if store is not None:
        lease.check()
        store.put_file(RunLayout(run_dir).config_yaml, "config.yaml")
    ctx = RunContext(cfg=cfg, run_dir=run_dir, base_model_dir=base_dir, base_model_id=base_id)
    result = PipelineResult(run_dir, store_uri=store.uri if store is not None else None)
    log.info("stages to run: %s", ", ".join(selected))
    plan = disk_plan(cfg, base_dir)
    for i, name in enumerate(selected):
        stage = load_stage(name)
        t0 = time.time()
        log.info("stage %s: starting", name)
        # Room for this stage and the ones after it, checked only when it has work to do.
        check = (lambda rest=selected[i:]: check_free_space(plan, run_dir, rest)) if plan else None
        rec, ran = stage.execute(ctx, before_run=check)
        wall = time.time() - t0
        status = "ran" if ran else "skipped (up to date)"
        log.info("stage %s: %s in %.1fs -> %s", name, status, wall, run_dir / STAGE_FOLDERS[name])
        if store is not None:
            lease.check()
            store.push(run_dir, STAGE_FOLDERS[name])
        result.outcomes.append(
            StageOutcome(name, status, rec["wall_time_s"] if not ran else wall, STAGE_FOLDERS[name])
        )
    if cfg.export.hub_repo_id and "evaluate" in selected:
        # After evaluate, so that the model card carries the scores.
        push_to_hub(cfg, run_dir)
    for o in result.outcomes:
        summary = load_stage(o.name).summary(ctx)
        if summary:
            result.summaries.append(summary)
    return result


def disk_plan(cfg: PipelineConfig, base_dir: Path) -> Optional[Plan]:
    """The plan whose disk figures the free-space checks use (None when they are off)."""
    if not cfg.storage.check_free_space:
        return None
    facts = facts_from_config_dir(base_dir, str(base_dir), cfg.model.trust_remote_code)
    return build_plan(cfg, facts=facts)


def check_prompt_format(cfg: PipelineConfig, base_dir: Path) -> None:
    """A tokenizer without a chat template formats prompts as plain text; with
    `data.require_chat_template` that stops the run before any work."""
    from cpi_ray.data.formatting import has_chat_template
    from cpi_ray.models.loading import load_tokenizer

    if has_chat_template(load_tokenizer(base_dir, cfg.model.trust_remote_code)):
        return
    require_chat_template(cfg, False, str(base_dir))
    log.warning(
        "the tokenizer of %s has no chat template: prompts are formatted as plain text ('{prompt}\\n')",
        base_dir,
    )


def _write_config(cfg: PipelineConfig, run_dir: Path) -> None:
    with atomic_file(RunLayout(run_dir).config_yaml, "w") as f:
        yaml.safe_dump(cfg.model_dump(mode="json"), f, sort_keys=False)
