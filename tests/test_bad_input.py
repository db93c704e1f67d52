"""Bad input the job entry must refuse before any work, with a clear message and nothing
written."""

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB = [
    sys.executable,
    str(ROOT / "jobs" / "cpi_pipeline.py"),
    "--config",
    str(ROOT / "jobs" / "configs" / "smoke.yaml"),
]


def test_unwritable_storage_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = subprocess.run([*JOB, "--run-dir", str(blocker / "run")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "cannot write the run directory" in r.stderr and str(blocker) in r.stderr


def test_unreachable_ray_address(tmp_path):
    t0 = time.time()
    r = subprocess.run(
        [*JOB, "--run-dir", str(tmp_path / "run"), "--set", "ray.address=127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and time.time() - t0 < 100
    assert "127.0.0.1:9" in r.stderr and "no Ray cluster answers there" in r.stderr
    assert not (tmp_path / "run").exists()


def test_task_names_cannot_escape_the_run_dir(tmp_path):
    r = subprocess.run(
        [*JOB, "--run-dir", str(tmp_path / "run"), "--set", "tasks.0.name=../../evil"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "tasks.0.name" in r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "evil").exists()


def test_tokenizer_without_chat_template(tmp_path):
    """Plain-text prompts (a base model) unless the config requires a chat template: then the
    job stops before any work, naming the field and the model."""
    from cpi_ray.models.tiny import save_tiny_model

    base = save_tiny_model(tmp_path / "base")
    (base / "chat_template.jinja").unlink(missing_ok=True)
    r = subprocess.run(
        [
            *JOB,
            "--run-dir",
            str(tmp_path / "run"),
            "--set",
            f"model.source={base}",
            "--set",
            "data.require_chat_template=true",
            "--set",
            "ray.address=local",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0, r.stderr[-2000:]
    assert "data.require_chat_template" in r.stderr and str(base) in r.stderr
    assert not (tmp_path / "run").exists()
