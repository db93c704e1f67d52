"""The soak's fault machinery without a pipeline: which worker processes are victims in which
stage, the choice among them, a real SIGKILL by the killer thread, and the bitwise comparison of
a run's outputs with the reference run's."""

import importlib.util
import json
import logging
import random
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def _soak():
    if "soak" not in sys.modules:  # dataclasses look their module up there
        spec = importlib.util.spec_from_file_location("soak", ROOT / "benchmarks" / "soak.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["soak"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["soak"]


def _actor(cls, pid, state="ALIVE"):
    return SimpleNamespace(class_name=cls, pid=pid, state=state)


def _task(name, pid, state="RUNNING"):
    return SimpleNamespace(name=name, worker_pid=pid, state=state)


ACTORS = [
    _actor("RayTrainWorker", 11),
    _actor("RayTrainWorker", 12),
    _actor("RayTrainWorker", 13, "DEAD"),
    _actor("TrainController", 14),
    _actor("FuseActor", 21),
    _actor("MapWorker(MapBatches(RegionsPass))", 31),
    _actor("_StatsActor", 41),
]
TASKS = [_task("cpi-evaluate", 51), _task("cpi-evaluate", 52, "FINISHED"), _task("_fit_probe", 53)]


@pytest.mark.parametrize(
    "stage, pids",
    [
        ("probe", [11, 12]),
        ("consolidate", [11, 12]),
        ("baselines", [11, 12]),
        ("regions", [31]),
        ("fuse", [21]),
        ("evaluate", [51]),
        ("groups", []),
        (None, []),
    ],
)
def test_victims_by_stage(stage, pids):
    soak = _soak()
    assert [v.pid for v in soak.victims(stage, ACTORS, TASKS)] == pids


def test_choose_victim_only_among_own_processes():
    soak = _soak()
    cands = soak.victims("probe", ACTORS, TASKS)
    rng = random.Random(0)
    assert soak.choose_victim(cands, {99}, rng) is None
    assert {soak.choose_victim(cands, {12, 99}, rng).pid for _ in range(10)} == {12}
    picked = {soak.choose_victim(cands, {11, 12}, rng).pid for _ in range(50)}
    assert picked == {11, 12}
    a = [soak.choose_victim(cands, {11, 12}, random.Random(3)).pid for _ in range(5)]
    assert len(set(a)) == 1  # the same seed, the same victim


def _log_stage(msg, *args):
    logging.getLogger("soak-test").info(msg, *args)


def test_killer_sigkills_a_victim_of_the_aimed_stage():
    soak = _soak()
    tracker = soak.StageTracker()
    log = logging.getLogger("soak-test")
    log.setLevel(logging.INFO)
    log.addHandler(tracker)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        asked = []

        def find(address, stage):
            asked.append(stage)
            return [soak.Victim(proc.pid, "FuseActor actor")] if stage == "fuse" else []

        killer = soak.Killer(
            tracker, "addr", 0.0, "fuse", random.Random(0), poll_s=0.01, find=find, allowed=lambda: {proc.pid}
        )
        killer.start()
        _log_stage("stage %s: starting", "regions")
        _log_stage("stage %s: %s in %.1fs -> %s", "regions", "ran", 1.0, "x")
        _log_stage("stage %s: starting", "fuse")
        assert proc.wait(timeout=60) == -signal.SIGKILL
        killer.join(timeout=60)
        f = killer.fault
        assert (f.killed, f.pid, f.stage, f.target) == ("FuseActor actor", proc.pid, "fuse", "fuse")
        assert "regions" not in asked  # aimed at fuse: nothing looked for before it
        assert "FuseActor actor pid" in f.describe()
    finally:
        log.removeHandler(tracker)
        proc.kill()
        proc.wait()


def test_killer_reports_a_stage_that_never_ran():
    soak = _soak()
    tracker = soak.StageTracker()
    killer = soak.Killer(
        tracker, "addr", 0.0, "evaluate", random.Random(0), poll_s=0.01, find=lambda a, s: []
    )
    killer.start()
    killer.stop.set()
    killer.join(timeout=60)
    assert killer.fault.killed is None
    assert killer.fault.describe().startswith("nothing (")


def _run_dir(root: Path, neg_zero=False, scores=None, groups=None, mask_byte=0b1010_0000, wall=1.0):
    torch.manual_seed(0)
    w = {"w": torch.randn(4, 3, dtype=torch.bfloat16), "b": torch.zeros(3)}
    (root / "final").mkdir(parents=True)
    save_file({"w": w["w"], "b": -w["b"] if neg_zero else w["b"]}, root / "final" / "model.safetensors")
    for t in ("a", "b"):
        (root / "probes" / t).mkdir(parents=True)
        save_file(w, root / "probes" / t / "model.safetensors")
    (root / "regions").mkdir()
    save_file(
        {"w": torch.tensor([mask_byte, 0], dtype=torch.uint8)},
        root / "regions" / "a.mask.safetensors",
        metadata={"numel:w": "12", "k": "2"},
    )
    (root / "groups").mkdir()
    (root / "groups" / "groups.json").write_text(json.dumps(groups or [["a"], ["b"]]))
    (root / "eval").mkdir()
    (root / "eval" / "scores.json").write_text(
        json.dumps({"scores": scores or {"base": {"a": 1.0}}, "wall_s": wall})
    )
    return root


def test_compare_outputs(tmp_path):
    soak = _soak()
    ref = _run_dir(tmp_path / "ref")
    same = _run_dir(tmp_path / "same", wall=7.0)  # timings are not outputs
    cmp = soak.compare_outputs(ref, same)
    assert cmp == {p: "equal" for p in soak.COMPARED}
    assert soak.outputs_verdict(cmp) == "equal"

    # -0.0 == 0.0 as numbers, but not bitwise
    other = _run_dir(tmp_path / "other", neg_zero=True, scores={"base": {"a": 1.5}}, mask_byte=0b1000_0000)
    cmp = soak.compare_outputs(ref, other)
    assert cmp["final"].startswith("differs (1 of 2: ./b")
    assert cmp["masks"].startswith("differs (1 of 1")
    assert cmp["scores"].startswith("differs")
    assert (cmp["probes"], cmp["groups"]) == ("equal", "equal")
    assert soak.outputs_verdict(cmp).startswith("DIFFER: final")

    gone = _run_dir(tmp_path / "gone", groups=[["b"], ["a"]])
    (gone / "eval" / "scores.json").unlink()
    cmp = soak.compare_outputs(ref, gone)
    assert (cmp["groups"], cmp["scores"]) == ("differs (content)", "missing")
    assert soak.outputs_verdict(None) == "-"


def test_results_table(tmp_path):
    soak = _soak()
    rows = [
        soak.Row(0, True, 100.0, 0, 0, 500.0, 900.0),
        soak.Row(
            1,
            False,
            50.0,
            1,
            2,
            510.0,
            950.0,
            error="RuntimeError: boom",
            fault={
                "target": "fuse",
                "planned_s": 1.0,
                "killed": "FuseActor actor",
                "pid": 7,
                "stage": "fuse",
                "at_s": 42.0,
                "note": "",
            },
        ),
    ]
    meta = {"config": "jobs/configs/smoke.yaml", "cpus": 2, "commit": "abc", "date": "2026-01-01"}
    md, js = soak.write_results(tmp_path, rows, "python benchmarks/soak.py --faults", meta, True, planned=4)
    text = md.read_text()
    assert md.name == "soak-faults.md" and "2 run(s) of 4 asked for" in text
    assert "FAILED: RuntimeError: boom" in text and "FuseActor actor pid 7 in fuse at 42s" in text
    assert "python benchmarks/soak.py --faults" in text
    assert "failures: 1/2; faulty runs 1, a process killed in 1, outputs equal to run 0 in 0" in text
    data = json.loads(js.read_text())
    assert data["runs_done"] == 2 and data["runs"][1]["fault"]["pid"] == 7


def test_one_line_names_the_underlying_error():
    soak = _soak()
    e = RuntimeError("Traceback (most recent call last):\n  File x\nValueError: bad shard\n\nmore")
    assert soak.one_line(e) == "RuntimeError: ValueError: bad shard"
