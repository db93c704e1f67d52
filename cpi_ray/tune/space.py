"""The search space: config dimensions -> Ray Tune domains, and a trial's sampled knobs -> its
validated PipelineConfig."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from cpi_ray.config.load import format_validation_error
from cpi_ray.config.schema import PipelineConfig, SearchDim, TuneConfig


class SpaceError(ValueError):
    pass


def tune_domain(dim: SearchDim, grid_search: bool) -> Any:
    from ray import tune  # seconds to import: check_space runs in the CLI before Ray starts

    kind = dim.kind
    if kind == "grid" or (kind == "choice" and grid_search):
        return tune.grid_search(list(dim.values()))
    if kind == "choice":
        return tune.choice(list(dim.choice))
    if kind == "uniform":
        return tune.uniform(*dim.uniform)
    return tune.loguniform(*dim.loguniform)


def param_space(tc: TuneConfig) -> dict[str, Any]:
    """Flat {dotted key: domain}. search_alg grid turns choices into grid axes too."""
    return {k: tune_domain(d, tc.search_alg == "grid") for k, d in tc.search_space.items()}


def apply_knobs(cfg: PipelineConfig, knobs: dict[str, Any]) -> PipelineConfig:
    """A copy of `cfg` with each dotted key set, validated like a loaded config."""
    data = cfg.model_dump(mode="json")
    for key, value in knobs.items():
        section, field = key.split(".", 1)
        if isinstance(value, float) and field == "steps":
            value = int(round(value))  # a uniform range over steps samples floats
        data[section][field] = value
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise SpaceError(f"knobs {knobs}: {format_validation_error(e)}") from None


def check_space(cfg: PipelineConfig) -> None:
    """Fail before any work when a value of the space is out of its field's range, or a task has
    no validation rows to score trials on."""
    tc = cfg.tune
    if not tc.search_space:
        raise SpaceError("tune.search_space is empty: nothing to search")
    no_val = [t.name for t in cfg.tasks if t.val_size < 1]
    if no_val:
        raise SpaceError(
            f"tasks {no_val} have val_size 0: trials are scored on the validation "
            "split (tasks.<name>.val_size), never on the eval split"
        )
    for key, dim in tc.search_space.items():
        for v in dim.values() or [dim.uniform or dim.loguniform][0]:
            apply_knobs(cfg, {key: v})
