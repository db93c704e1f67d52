"""Soak: run the smoke pipeline N times in a row on one Ray cluster and report failures, leaked
Ray resources (placement groups, live actors) and memory growth.

    python benchmarks/soak.py --runs 10
    python benchmarks/soak.py --runs 3 --set probe.steps=20 --set consolidate.steps=5

Each run gets a fresh run directory, so every stage really runs. After each run the script
counts the cluster's placement groups that are not removed and its actors that are alive, and
the resident memory of the driver and of the Ray processes it started.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


def ray_rss_mib() -> float:
    """Resident memory of the embedded Ray's processes: everything this driver started."""
    import psutil

    total = 0
    for p in psutil.Process().children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def leaks(address: str) -> tuple[int, int, str]:
    """Placement groups not removed, live actors, and the live actors by class."""
    from collections import Counter

    from ray.util.state import list_actors, list_placement_groups

    pgs = [p for p in list_placement_groups(address=address, limit=10_000) if p.state != "REMOVED"]
    actors = [a for a in list_actors(address=address, limit=10_000) if a.state == "ALIVE"]
    by_class = Counter(a.class_name for a in actors)
    return len(pgs), len(actors), ", ".join(f"{c} x{n}" for c, n in sorted(by_class.items()))


def main() -> int:
    import psutil

    from cpi_ray.config.load import load_config
    from cpi_ray.pipeline.runner import run_pipeline
    from cpi_ray.run.runtime import connect_ray

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "jobs" / "configs" / "smoke.yaml"))
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--keep", action="store_true", help="keep the run directories")
    args = ap.parse_args()

    import ray

    # Its own embedded Ray, so that other Ray clusters on the machine neither serve nor skew it.
    cfg = load_config(args.config, ["ray.address=local", *args.overrides])
    print("Ray:", connect_ray(cfg))
    address = ray.get_runtime_context().gcs_address
    me = psutil.Process()
    rows, failures = [], 0
    work = Path(tempfile.mkdtemp(prefix="cpi-soak-"))
    for i in range(args.runs):
        run_dir = work / f"run-{i}"
        t0 = time.time()
        ok = True
        try:
            run_pipeline(cfg, run_dir)
        except Exception:  # noqa: BLE001 - a soak counts failures, it does not stop at one
            ok = False
            failures += 1
            traceback.print_exc()
        wall = time.time() - t0
        pgs, actors, classes = leaks(address)
        rows.append((i, ok, wall, pgs, actors, me.memory_info().rss / 2**20, ray_rss_mib()))
        print(
            f"run {i}: {'ok' if ok else 'FAILED'} in {wall:.0f}s; placement groups {pgs}, "
            f"live actors {actors}; driver RSS {rows[-1][5]:.0f} MiB, Ray RSS {rows[-1][6]:.0f} MiB",
            flush=True,
        )
        print(f"  live actors by class: {classes or '-'}", flush=True)
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)

    print("\nrun  ok   wall_s  placement_groups  live_actors  driver_rss_MiB  ray_rss_MiB")
    for i, ok, wall, pgs, actors, drss, rrss in rows:
        print(
            f"{i:>3}  {'yes' if ok else 'NO ':<3}  {wall:6.0f}  {pgs:>16}  {actors:>11}  "
            f"{drss:>14.0f}  {rrss:>11.0f}"
        )
    if len(rows) > 1:
        print(
            f"\nfailures: {failures}/{len(rows)}; driver RSS growth {rows[-1][5] - rows[0][5]:+.0f} MiB, "
            f"Ray RSS growth {rows[-1][6] - rows[0][6]:+.0f} MiB, placement groups "
            f"{rows[0][3]} -> {rows[-1][3]}, live actors {rows[0][4]} -> {rows[-1][4]}"
        )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
