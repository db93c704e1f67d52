"""Shared fixtures: a tiny random Llama saved in several shards, and one local Ray for the
session (starting Ray costs seconds; every Ray test shares it)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from cpi_ray.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from cpi_ray.run.runtime import start_local_ray

    if not ray.is_initialized():
        start_local_ray(
            num_cpus=4,
            log_to_driver=False,
            runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_local(ray_session):
    """The session's Ray, with Ray Data's progress bars off for quiet test logs."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray_session
