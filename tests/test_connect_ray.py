"""Which Ray a run joins when the config names none: never another process's embedded Ray (the
run would live in that process's environment and die with it), always its own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

OTHER_RUN = textwrap.dedent("""
    import sys, time, ray
    ray.init(num_cpus=1, include_dashboard=False)
    print(ray.get_runtime_context().gcs_address, flush=True)
    sys.stdin.read()  # held until the test closes stdin
""")

THIS_RUN = textwrap.dedent("""
    import ray
    from cpi_ray.config.load import load_config
    from cpi_ray.run.runtime import connect_ray
    cfg = load_config(sys.argv[1], ["ray.num_cpus=1"])
    how = connect_ray(cfg)

    @ray.remote
    def actors_seen():
        from ray.util.state import list_actors
        # no address, as Ray Train's placement-group cleaner asks: found through the workers' env
        return len(list_actors())

    seen = ray.get(actors_seen.remote())
    print(how + "|" + ray.get_runtime_context().gcs_address + "|" + str(seen), flush=True)
    ray.shutdown()
""")


def test_a_run_with_no_address_starts_its_own_ray_beside_an_embedded_one():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER_RUN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        other_gcs = other.stdout.readline().strip()
        assert other_gcs, "the other process's Ray did not start"
        out = subprocess.run(
            [sys.executable, "-c", "import sys\n" + THIS_RUN, str(ROOT / "jobs" / "configs" / "smoke.yaml")],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            cwd=ROOT,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        how, gcs, seen = out.stdout.strip().splitlines()[-1].split("|")
        assert how == "embedded local Ray" and gcs != other_gcs
        assert int(seen) >= 0  # a worker's state API call found its own cluster among two
        assert other.poll() is None  # the other run's Ray is untouched
    finally:
        other.stdin.close()
        other.wait(timeout=60)


@pytest.mark.slow  # two short pipelines (Ray Train probes, regions, groups, fuse) side by side
def test_two_runs_at_once_both_complete(tmp_path):
    """Two runs started together on one machine with no address: each starts its own embedded
    Ray, neither joins nor stops the other's, and both finish with their outputs."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = [
        "--stages",
        "probe,regions,groups,fuse",
        "--set",
        "probe.steps=3",
        "--set",
        "ray.num_cpus=2",
        "--set",
        f"storage.path={tmp_path / 'runs'}",
    ]
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "jobs" / "cpi_pipeline.py"),
                "--config",
                str(ROOT / "jobs/configs/smoke.yaml"),
            ]
            + ["--run-dir", str(tmp_path / f"run-{i}"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for i in range(2)
    ]
    outs = [r.communicate(timeout=1500)[0] for r in runs]
    for i, (r, out) in enumerate(zip(runs, outs)):
        assert r.returncode == 0, out[-3000:]
        assert "embedded local Ray" in out, out[-2000:]
        assert (tmp_path / f"run-{i}" / "fused" / "model.safetensors.index.json").is_file() or list(
            (tmp_path / f"run-{i}" / "fused").glob("*.safetensors")
        )
