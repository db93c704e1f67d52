"""The whole smoke pipeline through the job entry, with the driver killed mid-run and resumed.

Checks the pipeline's invariants on real outputs: every core mask holds exactly k elements, the
fused model carries each single-owner core element of its owner's probe, every element frozen in
a consolidation stage is bitwise equal to the stage's start, the models load and generate, and
the rerun after the kill redoes nothing that had finished.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cpi_ray.io.masks import MaskFile
from cpi_ray.io.safetensors_io import CheckpointReader
from cpi_ray.run.progress import METRICS_FILE, read_metrics
from cpi_ray.training.sft import make_scheduler

ROOT = Path(__file__).resolve().parents[1]


def _job(run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "jobs" / "cpi_pipeline.py"),
        "--config",
        str(ROOT / "jobs" / "configs" / "smoke.yaml"),
        "--run-dir",
        str(run_dir),
        "--set",
        "ray.address=local",
        "--set",
        "probe.steps=60",
        "--set",
        "consolidate.steps=6",
        "--set",
        "evaluate.max_new_tokens=6",
        *extra,
    ]


def _run_until(cmd: list[str], marker: str, timeout: float) -> str:
    """Start the job in its own process group and kill the group once `marker` is logged."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True
    )
    seen, t0 = [], time.time()
    try:
        for line in proc.stdout:
            seen.append(line)
            if marker in line or time.time() - t0 > timeout:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return "".join(seen)


@pytest.mark.slow
def test_smoke_pipeline_killed_and_resumed(tmp_path):
    run_dir = tmp_path / "run"
    out = _run_until(_job(run_dir), "stage consolidate: starting", timeout=1200)
    assert "stage fuse: ran" in out, out[-3000:]
    time.sleep(2)
    assert not (run_dir / "final").exists() and not (run_dir / "consolidate" / "stage.json").exists()
    assert not [
        p
        for p in run_dir.rglob("*")
        if ".tmp-" in p.name and p.is_file() and "consolidate" not in p.parts and "_ray" not in p.parts
    ]

    r = subprocess.run(_job(run_dir), capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = r.stdout + r.stderr
    for stage in ("probe", "regions", "groups", "fuse"):
        assert f"stage {stage}: skipped (up to date)" in log, stage
    for stage in ("consolidate", "evaluate"):
        assert f"stage {stage}: ran" in log, stage

    tasks = ["reverse", "upper", "digits"]
    base = CheckpointReader(_base_dir(run_dir))
    scored = [n for n in base.names() if base.info(n).dtype.is_floating_point]
    D = sum(base.info(n).numel for n in scored)
    k = int(5 * D // 100)  # smoke: regions.p = 5

    masks = {t: MaskFile(run_dir / "regions" / f"{t}.mask.safetensors") for t in tasks}
    fused = CheckpointReader(run_dir / "fused")
    probes = {t: CheckpointReader(run_dir / "probes" / t) for t in tasks}
    for t, m in masks.items():
        assert m.count() == k, t
    for n in scored:
        owners = torch.stack([masks[t].flat(n) for t in tasks])
        single = owners.sum(0) == 1
        got = fused.read(n).reshape(-1)
        for i, t in enumerate(tasks):
            sel = single & owners[i]
            assert torch.equal(got[sel], probes[t].read(n).reshape(-1)[sel]), (n, t)

    groups = json.loads((run_dir / "groups" / "groups.json").read_text())
    groups = groups["groups"] if isinstance(groups, dict) else groups
    start = run_dir / "fused"
    for i in range(1, len(groups) + 1):
        stage = run_dir / "consolidate" / f"stage-{i}"
        frozen = MaskFile(stage / "frozen.mask.safetensors")
        before, after = CheckpointReader(start), CheckpointReader(stage)
        n_frozen = 0
        for n in frozen.names():
            sel = frozen.flat(n)
            n_frozen += int(sel.sum())
            a = before.read(n).reshape(-1)[sel]
            b = after.read(n).reshape(-1)[sel]
            assert torch.equal(
                a.view(torch.uint8) if a.numel() else a, b.view(torch.uint8) if b.numel() else b
            ), (i, n)
        if i == 1:
            assert n_frozen == 0  # `prior`: the first group has no earlier cores to protect
        else:
            prior = [t for g in groups[: i - 1] for t in g]
            union = sum(int(torch.stack([masks[t].flat(n) for t in prior]).any(0).sum()) for n in scored)
            assert n_frozen == union > 0
        start = stage

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    for d in ("fused", "final"):
        model = AutoModelForCausalLM.from_pretrained(run_dir / d)
        ids = tok(["<|user|>upper: abc</s><|assistant|>"], return_tensors="pt", add_special_tokens=False)
        gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
        assert gen.shape[1] > ids["input_ids"].shape[1]

    scores = json.loads((run_dir / "eval" / "scores.json").read_text())
    assert {"base", "fused", "final", *(f"probe:{t}" for t in tasks)} <= set(scores["scores"])
    assert (run_dir / "report" / "index.html").is_file()

    # Training you can watch: a step line per job on the console, not Ray's result dumps; every
    # model keeps its per-step metrics, every SFT job on the one LR schedule; the report draws them.
    cfg = _config(run_dir)
    assert "probe reverse step 60/60 loss" in out and "Reporting training result" not in out + log
    assert f"consolidate stage {len(groups)}/{len(groups)} step 6/6 loss" in log
    jobs = [(run_dir / "probes" / t, cfg.probe) for t in tasks]
    jobs += [(run_dir / "consolidate" / f"stage-{i}", cfg.consolidate) for i in range(1, len(groups) + 1)]
    for model_dir, tc in jobs:
        rows = read_metrics(model_dir / METRICS_FILE)
        assert [r["step"] for r in rows] == list(range(1, tc.steps + 1)), model_dir
        assert [r["lr"] for r in rows] == pytest.approx(_schedule(tc)), model_dir
        assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in rows), model_dir
    assert not (run_dir / "final" / METRICS_FILE).exists()
    assert "## Training" in (run_dir / "report" / "report.md").read_text()
    assert (run_dir / "report" / "training.png").is_file()


def _schedule(tc) -> list[float]:
    """The rate each step applies, from the schedule every trainer builds."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=tc.lr)
    sched = make_scheduler(opt, tc)
    rates = []
    for _ in range(tc.steps):
        rates.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return rates


def _config(run_dir: Path):
    import yaml

    from cpi_ray.config.schema import PipelineConfig

    return PipelineConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))


def _base_dir(run_dir: Path) -> Path:
    from cpi_ray.models.loading import resolve_base_model

    return resolve_base_model(_config(run_dir))[0]
