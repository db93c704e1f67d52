"""`export.hub_repo_id`: the finished model folder with its card, in one commit to the hub
(the hub client is replaced by a recorder: nothing leaves the machine)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cpi_ray.config.schema import PipelineConfig
from cpi_ray.models.export import push_to_hub


class _Recorder:
    calls: list = []

    def create_repo(self, repo_id, private, exist_ok):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, commit_message, ignore_patterns):
        import fnmatch
        from pathlib import Path

        files = sorted(
            p.name
            for p in Path(folder_path).iterdir()
            if not any(fnmatch.fnmatch(p.name, pat) for pat in ignore_patterns)
        )
        self.calls.append(("upload_folder", repo_id, commit_message, files))


def _cfg(**export):
    return PipelineConfig(tasks=[{"name": "t", "hub_id": "x/t"}], storage={"run_name": "r1"}, export=export)


def test_push_uploads_the_model_and_its_card(tmp_path, monkeypatch):
    import huggingface_hub

    _Recorder.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _Recorder)
    final = tmp_path / "final"
    final.mkdir()
    for name in ("config.json", "model.safetensors", "README.md", "stage.json", ".lease"):
        (final / name).write_text("x")
    url = push_to_hub(_cfg(hub_repo_id="me/model"), tmp_path)
    assert url == "https://huggingface.co/me/model"
    assert _Recorder.calls == [
        ("create_repo", "me/model", True, True),
        ("upload_folder", "me/model", "cpi-ray: r1 final", ["README.md", "config.json", "model.safetensors"]),
    ]
    with pytest.raises(FileNotFoundError, match="no model in .*fused"):
        push_to_hub(_cfg(hub_repo_id="me/model", model="fused"), tmp_path)


def test_repo_id_is_validated():
    with pytest.raises(ValidationError, match="export.hub_repo_id|namespace/name"):
        _cfg(hub_repo_id="no-namespace")
