"""The pipeline's stages, in order: the one list that the config's stage names, the run
directory's folders, the evaluate stage's model kinds and the runner all derive from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class StageSpec:
    name: str  # as `stages:` and `--stages` spell it
    folder: str  # under the run directory; holds the stage's record
    cls: str  # "module:Class", imported only when the stage runs (it lives with its concern)
    model_kind: Optional[str] = None  # what `evaluate.models` calls the model(s) it writes


STAGE_SPECS: tuple[StageSpec, ...] = (
    StageSpec("probe", "probes", "cpi_ray.training.probe:ProbeStage", "probes"),
    StageSpec("regions", "regions", "cpi_ray.regions.stage:RegionsStage"),
    StageSpec("groups", "groups", "cpi_ray.regions.stage:GroupsStage"),
    StageSpec("fuse", "fused", "cpi_ray.fusion.stage:FuseStage", "fused"),
    StageSpec("consolidate", "consolidate", "cpi_ray.training.consolidate:ConsolidateStage", "final"),
    StageSpec("baselines", "baselines", "cpi_ray.training.baselines:BaselinesStage", "baselines"),
    StageSpec("evaluate", "eval", "cpi_ray.evaluation.evaluate:EvaluateStage"),
)

STAGES: tuple[str, ...] = tuple(s.name for s in STAGE_SPECS)
STAGE_FOLDERS: dict[str, str] = {s.name: s.folder for s in STAGE_SPECS}
# `evaluate.models` entries -> the stage that writes those models (None: the base model).
MODEL_KINDS: dict[str, Optional[str]] = {
    "base": None,
    **{s.model_kind: s.name for s in STAGE_SPECS if s.model_kind},
}


def stage_spec(name: str) -> StageSpec:
    return STAGE_SPECS[STAGES.index(name)]
