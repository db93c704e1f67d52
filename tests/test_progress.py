"""The per-step record and console line every SFT job keeps (`cpi_ray.run.progress`)."""

import logging

from cpi_ray.run.progress import TrainLog, concat_metrics, format_duration, last_step, read_metrics


def test_train_log_writes_each_step_and_a_line_every_n(tmp_path, caplog):
    path = tmp_path / "logs" / "job.metrics.jsonl"
    with caplog.at_level(logging.INFO, logger="cpi_ray"):
        log = TrainLog(path, "probe t", total_steps=20, every=5)
        for s in range(1, 21):
            log.step(s, loss=1.0 / s, lr=1e-4, grad_norm=0.5, tokens=64)
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert rows[3]["loss"] == 0.25 and rows[3]["tokens"] == 64 and rows[3]["grad_norm"] == 0.5
    assert last_step(path) == 20
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("probe t step")]
    # The first step (the first sign of life), every 5th, and the last.
    assert [ln.split()[3] for ln in lines] == ["1/20", "5/20", "10/20", "15/20", "20/20"]
    assert "loss 0.2000" in lines[1] and "tok/s" in lines[1] and "eta" in lines[1]


def test_resumed_job_keeps_the_steps_up_to_its_checkpoint(tmp_path):
    path = tmp_path / "job.metrics.jsonl"
    first = TrainLog(path, "job", total_steps=6)
    for s in range(1, 5):
        first.step(s, loss=float(s), lr=0.0, grad_norm=None, tokens=1)
    with open(path, "a") as f:
        f.write('{"step": 5, "lo')  # a killed writer's torn line
    resumed = TrainLog(path, "job", total_steps=6, start=2)
    for s in (3, 4, 5, 6):
        resumed.step(s, loss=10.0 * s, lr=0.0, grad_norm=None, tokens=1)
    rows = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in rows] == [
        (1, 1.0),
        (2, 2.0),
        (3, 30.0),
        (4, 40.0),
        (5, 50.0),
        (6, 60.0),
    ]


def test_other_ranks_write_nothing(tmp_path):
    path = tmp_path / "job.metrics.jsonl"
    log = TrainLog(path, "job", total_steps=2, rank=1)
    assert log.step(1, loss=1.0, lr=0.0, grad_norm=None, tokens=1)["step"] == 1
    assert not path.exists()


def test_concat_and_durations(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"step": 1, "loss": 2.0}\n')
    b.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    text = concat_metrics([({"stage": 1}, a), ({"stage": 2}, b), ({"stage": 3}, tmp_path / "none")])
    assert text.splitlines() == [
        '{"step": 1, "loss": 2.0, "stage": 1}',
        '{"step": 1, "loss": 1.0, "stage": 2}',
        '{"step": 2, "loss": 0.5, "stage": 2}',
    ]
    assert [format_duration(s) for s in (4.4, 190, 7322)] == ["4s", "3m10s", "2h02m"]


def test_metrics_reach_every_tracker(tmp_path, monkeypatch):
    """TensorBoard writes event files under the run; MLflow and W&B get each step's numbers
    (recording stand-ins for the two client libraries: nothing leaves the machine)."""
    import sys
    import types

    calls = []
    mlflow = types.ModuleType("mlflow")
    mlflow.set_experiment = lambda name: calls.append(("mlflow.experiment", name))
    mlflow.start_run = lambda run_name, tags: calls.append(("mlflow.start", run_name, tags["cpi_ray.run"]))
    mlflow.log_metrics = lambda metrics, step: calls.append(("mlflow.log", step, metrics["loss"]))
    mlflow.end_run = lambda: calls.append(("mlflow.end",))

    class _Run:
        def log(self, metrics, step):
            calls.append(("wandb.log", step, metrics["loss"]))

        def finish(self):
            calls.append(("wandb.finish",))

    wandb = types.ModuleType("wandb")
    wandb.init = lambda project, group, name: calls.append(("wandb.init", project, group, name)) or _Run()
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.setitem(sys.modules, "wandb", wandb)

    spec = {
        "report_to": ["tensorboard", "mlflow", "wandb"],
        "dir": str(tmp_path / "tb"),
        "project": "proj",
        "group": "run-1",
        "every": None,
    }
    log = TrainLog(tmp_path / "m.jsonl", "probe t", total_steps=2, tracking=spec)
    log.step(1, loss=2.0, lr=1e-4, grad_norm=None, tokens=10)
    log.step(2, loss=1.0, lr=5e-5, grad_norm=0.3, tokens=10)
    log.close()
    assert calls == [
        ("mlflow.experiment", "proj"),
        ("mlflow.start", "probe t", "run-1"),
        ("wandb.init", "proj", "run-1", "probe t"),
        ("mlflow.log", 1, 2.0),
        ("wandb.log", 1, 2.0),
        ("mlflow.log", 2, 1.0),
        ("wandb.log", 2, 1.0),
        ("mlflow.end",),
        ("wandb.finish",),
    ]
    (events,) = (tmp_path / "tb" / "probe-t").glob("events.out.tfevents.*")
    data = events.read_bytes()
    assert b"train/loss" in data and b"train/tokens_per_s" in data and b"train/grad_norm" in data


def test_check_names_a_missing_tracker(monkeypatch):
    import importlib.util

    import pytest

    from cpi_ray.config.schema import PipelineConfig
    from cpi_ray.pipeline.check import CheckError, check_trackers

    cfg = PipelineConfig(
        tasks=[{"name": "a", "hub_id": "x"}], logging={"report_to": ["tensorboard", "wandb"]}
    )
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(CheckError, match=r"logging.report_to: wandb needs the wandb package \(pip install"):
        check_trackers(cfg)
