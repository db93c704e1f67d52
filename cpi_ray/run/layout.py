"""Every path of a run directory, named once. Stages, the report, the Tune search and the
benchmarks ask a `RunLayout` instead of spelling folders and file names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cpi_ray.config.stages import STAGE_FOLDERS

# File names for the functions that also write into other folders (a Tune trial's).
MASK_SUFFIX = ".mask.safetensors"
REGION_STATS = "stats.json"
GROUPS_JSON = "groups.json"
OVERLAP_JSON = "overlap.json"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def folder(self, stage: str) -> Path:
        """Where `stage` keeps its outputs and its record."""
        return self.root / STAGE_FOLDERS[stage]

    # probe
    def probe(self, task: str) -> Path:
        return self.folder("probe") / task

    def fisher(self, task: str) -> Path:
        """The task's diagonal Fisher beside its probe (for `regions.score` fisher and
        delta_fisher): sharded safetensors named like the model's tensors."""
        return self.probe(task) / "fisher"

    # regions and groups
    def mask(self, task: str) -> Path:
        return self.folder("regions") / f"{task}{MASK_SUFFIX}"

    @property
    def region_stats(self) -> Path:
        return self.folder("regions") / REGION_STATS

    @property
    def groups_json(self) -> Path:
        return self.folder("groups") / GROUPS_JSON

    @property
    def overlap_json(self) -> Path:
        return self.folder("groups") / OVERLAP_JSON

    # fuse and consolidate
    @property
    def fused(self) -> Path:
        return self.folder("fuse")

    def stage(self, k: int) -> Path:
        """The model after consolidation stage k (1-based)."""
        return self.folder("consolidate") / f"stage-{k}"

    @property
    def final(self) -> Path:
        return self.root / "final"

    # baselines and evaluate
    def baseline(self, mode: str) -> Path:
        return self.folder("baselines") / mode

    @property
    def budget_json(self) -> Path:
        return self.folder("baselines") / "budget.json"

    @property
    def eval_scores(self) -> Path:
        return self.folder("evaluate") / "scores.json"

    @property
    def report(self) -> Path:
        return self.root / "report"

    # the run itself
    @property
    def config_yaml(self) -> Path:
        return self.root / "config.yaml"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def train_log(self, job: str) -> Path:
        """The live per-step metrics of training job `job` (a probe, a consolidation or baseline
        stage) while it runs; the job copies them into its model as `metrics.jsonl`."""
        return self.logs / f"{job}.metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files of every training job (`logging.report_to`)."""
        return self.logs / "tensorboard"

    @property
    def ray_storage(self) -> Path:
        """Ray Train's storage for checkpoints of the run's trainers."""
        return self.root / "_ray"
