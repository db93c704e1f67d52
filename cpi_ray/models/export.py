"""`export.hub_repo_id`: the finished model directory, model card included, pushed to the hub."""

from __future__ import annotations

import logging
from pathlib import Path

import huggingface_hub

from cpi_ray.config.schema import PipelineConfig

log = logging.getLogger("cpi_ray")


def push_to_hub(cfg: PipelineConfig, run_dir: Path) -> str:
    """Create the repository if needed (private unless `export.private` is false) and upload the
    model folder in one commit; returns the repository's URL."""
    folder = Path(run_dir) / cfg.export.model
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"export: no model in {folder} (has stage "
            f"{'consolidate' if cfg.export.model == 'final' else 'fuse'} run?)"
        )
    api = huggingface_hub.HfApi()
    repo = cfg.export.hub_repo_id
    url = api.create_repo(repo, private=cfg.export.private, exist_ok=True)
    api.upload_folder(
        folder_path=str(folder),
        repo_id=repo,
        commit_message=f"cpi-ray: {cfg.storage.run_name} {cfg.export.model}",
        ignore_patterns=["stage.json", ".*", "*.tmp*"],
    )
    log.info("export: %s pushed to %s", folder, url)
    return str(url)
