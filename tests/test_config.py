import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cpi_ray.config.load import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, data) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _task_file(tmp_path, name="t.jsonl") -> str:
    p = tmp_path / name
    p.write_text('{"question": "a", "answer": "b"}\n')
    return str(p)


def _base(tmp_path):
    return {
        "model": {"source": "tiny"},
        "tasks": [
            {"name": "a", "path": _task_file(tmp_path)},
            {"name": "b", "path": _task_file(tmp_path, "u.jsonl")},
        ],
    }


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(
        _write(tmp_path, _base(tmp_path)),
        [
            "regions.p=5",
            "groups.tau=0.25",
            "tasks.b.eval_size=7",
            "tasks.0.weight=2",
            "fuse.omega_overrides={'attn': 0.3}",
        ],
    )
    assert cfg.regions.p == 5.0 and cfg.groups.tau == 0.25
    assert cfg.task("b").eval_size == 7 and cfg.task("a").weight == 2.0
    assert cfg.fuse.omega_overrides == {"attn": 0.3}
    assert cfg.stages == ["probe", "regions", "groups", "fuse", "consolidate", "baselines", "evaluate"]


@pytest.mark.parametrize(
    "override, field",
    [
        ("regions.p=0", "regions.p"),
        ("regions.p=150", "regions.p"),
        ("groups.tau=1.5", "groups.tau"),
        ("fuse.omega=-0.1", "fuse.omega"),
        ("fuse.policy=largest", "fuse.policy"),
        ("consolidate.freeze=some", "consolidate.freeze"),
        ("probe.lr=0", "probe.lr"),
        ("regions.granularity=block", "regions.granularity"),
        ("regions.nonsense=1", "regions.nonsense"),
    ],
)
def test_bad_values_name_the_field(tmp_path, override, field):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, _base(tmp_path)), [override])
    assert field in str(e.value)


def test_range_message_says_what_is_allowed(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, _base(tmp_path)), ["regions.p=101"])
    assert "less than or equal to 100" in str(e.value)


def test_task_errors(tmp_path):
    data = _base(tmp_path)
    data["tasks"][1]["name"] = "a"
    with pytest.raises(ConfigError, match="duplicate task names"):
        load_config(_write(tmp_path, data))
    data = _base(tmp_path)
    data["tasks"][0]["path"] = str(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="missing.jsonl.*does not exist"):
        load_config(_write(tmp_path, data))
    data = _base(tmp_path)
    data["tasks"][0]["name"] = "../evil"
    with pytest.raises(ConfigError, match="tasks.0.name"):
        load_config(_write(tmp_path, data))


def test_job_exits_2_and_writes_nothing(tmp_path):
    data = _base(tmp_path)
    data["tasks"][0]["path"] = str(tmp_path / "nope.jsonl")
    cfg = _write(tmp_path, data)
    run_dir = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "cpi_pipeline.py"),
            "--config",
            str(cfg),
            "--run-dir",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "nope.jsonl" in r.stderr and "does not exist" in r.stderr
    assert not run_dir.exists()
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "cpi_pipeline.py"),
            "--config",
            str(_write(tmp_path, _base(tmp_path))),
            "--run-dir",
            str(run_dir),
            "--stages",
            "probe,bogus",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "bogus" in r.stderr and not run_dir.exists()


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["fuse.method=task_arithmetic", "fuse.omega=0.3"], "fuse.omega"),
        (["fuse.method=ties", "fuse.backbone=a"], "fuse.backbone"),
        (["fuse.scale=0.5"], "fuse.scale"),
        (["fuse.method=task_arithmetic", "fuse.density=0.5"], "fuse.density"),
        (["fuse.method=ties", "fuse.density=0"], "fuse.density"),
    ],
)
def test_fuse_knobs_of_another_method_name_the_field(tmp_path, overrides, field):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, _base(tmp_path)), overrides)
    assert field in str(e.value)
    ok = load_config(
        _write(tmp_path, _base(tmp_path)), ["fuse.method=ties", "fuse.density=0.2", "fuse.scale=0.5"]
    )
    assert (ok.fuse.method, ok.fuse.density, ok.fuse.scale) == ("ties", 0.2, 0.5)
