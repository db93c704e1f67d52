"""`cpi-ray check` and the same checks at the start of a run: bad data, fields and storage stop
in seconds, before Ray starts, with one line that names task, file, row and field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "jobs" / "configs" / "smoke.yaml")
CHECK = [sys.executable, "-m", "cpi_ray.cli", "check", "--config", SMOKE]
JOB = [sys.executable, str(ROOT / "jobs" / "cpi_pipeline.py"), "--config", SMOKE]


def _run(cmd, tmp_path, *sets, env=None):
    args = [*cmd, "--run-dir", str(tmp_path / "run")]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def _one_line_error(r):
    assert r.returncode != 0, r.stdout[-2000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return err[0]


def test_check_prints_config_splits_and_a_marked_example(tmp_path):
    r = _run(CHECK, tmp_path, f"model.cache_dir={tmp_path / 'models'}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "source: tiny" in out  # the resolved config
    # smoke's reverse.jsonl: split sizes as split_rows makes them, the answer marked as learned
    from cpi_ray.config.load import load_config
    from cpi_ray.data.tasks import load_splits

    cfg = load_config(SMOKE)
    splits = load_splits(cfg.task("reverse"), cfg.data.split_seed)
    assert (
        f"task reverse ({cfg.task('reverse').path}): {len(splits.train) + 24} rows -> "
        f"train {len(splits.train)}, val 0, eval 24; 0 training rows too long"
    ) in out
    first = splits.train[0]
    assert f"<|user|>{first['question']}</s><|assistant|>[[{first['answer']}</s>]]" in out
    assert out.rstrip().endswith("ok")
    assert not (tmp_path / "run").exists()  # check writes nothing


def _bad_task(tmp_path, lines: list[str]) -> str:
    p = tmp_path / "bad.jsonl"
    p.write_text("".join(line + "\n" for line in lines))
    return f"tasks=[{{name: bad, path: {p}, eval_size: 2}}]"


GOOD = [json.dumps({"question": f"q{i}", "answer": f"a{i}"}) for i in range(6)]


BAD_DATA = [
    (
        "malformed line",
        lambda t: [_bad_task(t, [*GOOD, '{"question": "q", "answer"'])],
        [r"task 'bad'", "cannot read", "bad.jsonl"],
    ),
    (
        "missing field",
        lambda t: [_bad_task(t, [*GOOD, json.dumps({"question": "q"})])],
        ["task 'bad': row 6 has no answer field 'answer'"],
    ),
    (
        "chat data as a prompt",
        lambda t: [
            _bad_task(t, [*GOOD, json.dumps({"question": [{"role": "user", "content": "q"}], "answer": "a"})])
        ],
        ["task 'bad': row 6: prompt field 'question' is a list, expected text"],
    ),
    (
        "eval_size over the data",
        lambda t: [_bad_task(t, GOOD), "tasks.0.eval_size=10"],
        ["task 'bad': 6 rows leave none for training after eval_size=10"],
    ),
    (
        "no row fits max_seq_len",
        lambda t: [
            _bad_task(t, [json.dumps({"question": "q", "answer": "x" * 40})] * 6),
            "data.max_seq_len=16",
        ],
        ["task 'bad' (", "bad.jsonl): no training row fits in data.max_seq_len=16"],
    ),
]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.mark.parametrize("case, sets, expect", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_is_one_line_naming_task_row_and_field(tmp_path, models_dir, case, sets, expect):
    from cpi_ray.config.load import load_config
    from cpi_ray.pipeline.check import CheckError, check_config

    cfg = load_config(SMOKE, [*sets(tmp_path), f"model.cache_dir={models_dir}"])
    with pytest.raises(CheckError) as err:
        check_config(cfg, tmp_path / "run")
    line = str(err.value)
    assert "\n" not in line
    for part in expect:
        assert part in line, line
    assert not (tmp_path / "run").exists()


def test_bad_data_stops_check_and_run_before_ray(tmp_path):
    """Both entries print the same single line, exit non-zero, start no Ray, write nothing."""
    overrides = [
        _bad_task(tmp_path, [*GOOD, json.dumps({"question": "q"})]),
        f"model.cache_dir={tmp_path / 'models'}",
    ]
    r = _run(CHECK, tmp_path, *overrides)
    line = _one_line_error(r)
    assert r.returncode == 3 and "task 'bad': row 6 has no answer field 'answer'" in line
    r = _run(JOB, tmp_path, *overrides, "ray.address=local")
    assert _one_line_error(r) == line
    assert "Ray:" not in r.stderr and "Started a local Ray" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_model_to_evaluate_is_a_config_error(tmp_path):
    r = _run(CHECK, tmp_path, "evaluate.models=[base,finale]")
    assert r.returncode == 2 and "evaluate.models.1" in r.stderr


def test_relative_storage_under_job_submission_is_refused(tmp_path, monkeypatch):
    from cpi_ray.config.load import load_config
    from cpi_ray.pipeline.check import CheckError, check_storage

    check_storage(load_config(SMOKE), tmp_path / "run")  # a relative path is fine on a laptop
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor sets
    with pytest.raises(
        CheckError,
        match=r"storage.path: 'runs' is relative; under `ray job "
        r"submit` it would land in the job's temporary working directory",
    ):
        check_storage(load_config(SMOKE), tmp_path / "run")
    check_storage(load_config(SMOKE, [f"storage.path={tmp_path}"]), tmp_path / "run")


def test_storage_not_shared_by_every_node_is_refused(tmp_path, monkeypatch):
    """The driver writes a marker in the run directory; each node must read it there. A node
    that sees another filesystem (simulated: it looks under another root) stops the run."""
    import ray

    from cpi_ray.pipeline.check import CheckError, check_shared_storage

    monkeypatch.setattr(
        ray,
        "nodes",
        lambda: [
            {"NodeID": "a", "Alive": True},
            {"NodeID": "b", "Alive": True},
            {"NodeID": "c", "Alive": False},
        ],
    )
    elsewhere = tmp_path / "node-b-disk"
    seen = []

    def visit(node, fn, path, token):
        seen.append(node)
        if node == "b":  # node b mounts something else at the same path
            path = str(elsewhere / Path(path).relative_to(tmp_path))
        return fn(path, token)

    run = tmp_path / "run"
    with pytest.raises(
        CheckError,
        match=r"storage: the run directory .*run is not shared by "
        r"every node .*No such file",
    ):
        check_shared_storage(run, visit)
    assert seen == ["a", "b"]
    assert not list(run.iterdir())  # the marker is removed either way
    check_shared_storage(run, lambda node, fn, *args: fn(*args))  # all nodes share it: passes
