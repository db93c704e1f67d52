"""Benchmark of the regions stage against two references measured in the same run.

Builds a synthetic sharded fp32 base and N task models of --size-gb each (a task moves a random
subset of tensors by noise of varied scale), then, each in its own process:

- the stage: a local Ray (2 CPUs) and `compute_regions`, timed; then again, with its peak memory
  summed (PSS) over the driver and every Ray process (all of them, and only the driver and the
  workers the stage started, without Ray's own daemons), who held what at that peak, and the
  driver's own peak RSS;
- the floor: the same files read block by block and |Δ| computed for every task, by as many
  processes as the stage has actors, nothing else: what no selection can beat;
- the reference: the base loaded whole, then each task's probe, |Δ| concatenated, `torch.topk`,
  ties broken by flat index; its peak RSS.

The files are read once, untimed, before the floor and the stage are timed, so both see a warm
page cache (or, for files larger than the free memory, both read the disk). Prints wall time,
bytes read per second (and per core) and peak memory of each, and whether the masks are
identical. --results DIR appends the figures to DIR/regions.json.

    python benchmarks/bench_regions.py --size-gb 1 [--tasks 4] [--skip-reference] [--workdir D --keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

ROWS, COLS = 2048, 4096  # 32 MiB fp32 matrices, plus a 1-d tensor per layer


def build(root: Path, size_gb: float, tasks: int, seed: int = 0) -> dict:
    from cpi_ray.io.safetensors_io import save_model_dir

    n_mat = max(1, int(size_gb * 2**30 // (ROWS * COLS * 4)))
    names = [
        f"model.layers.{i // 4}.{['q', 'k', 'mlp_up', 'mlp_down'][i % 4]}.weight" for i in range(n_mat)
    ] + [f"model.layers.{i}.norm.weight" for i in range(n_mat // 4)]

    def shape(n):
        return (COLS,) if n.endswith("norm.weight") else (ROWS, COLS)

    def gen_base():
        for j, n in enumerate(names):
            g = torch.Generator().manual_seed(seed * 1000 + j)
            yield n, torch.randn(shape(n), generator=g) * 0.02

    shard = 512 * 2**20
    save_model_dir(gen_base(), root / "base", shard, extra_files={"config.json": "{}"})
    for t in range(tasks):

        def gen_probe(t=t):
            for j, (n, b) in enumerate(gen_base()):
                g = torch.Generator().manual_seed(10_000 * (t + 1) + j)
                if torch.rand((), generator=g) < 0.6:  # a task moves 60% of the tensors
                    scale = float(10 ** (-4 + 2 * torch.rand((), generator=g)))
                    b = b + torch.randn(b.shape, generator=g) * scale
                yield n, b

        save_model_dir(gen_probe(), root / "probes" / f"task{t}", shard, extra_files={"config.json": "{}"})
    return {"tensors": len(names), "params": sum(int(np.prod(shape(n))) for n in names)}


# --------------------------------------------------------------------------- memory sampling


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeSampler(threading.Thread):
    """Peak of the summed PSS of a process and all its descendants (Ray's gcs, raylet and
    workers are descendants of the driver that started them), with who held what at that peak.

    Reading a process's PSS walks its page tables while the stage's actors map and unmap their
    files, which slows them: the stage's wall time is taken in a run without the sampler."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak_kib, self.stop = pid, every, 0, False
        self.at_peak: dict[str, int] = {}

    def run(self):
        import psutil

        while not self.stop:
            try:
                p = psutil.Process(self.pid)
                procs = [p] + p.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            sample = [(role(x, self.pid), pss_kib(x.pid)) for x in procs]
            total = sum(k for _, k in sample)
            if total > self.peak_kib:
                self.peak_kib, self.at_peak = total, {}
                for r, k in sample:
                    self.at_peak[r] = self.at_peak.get(r, 0) + k
            time.sleep(self.every)


def role(proc, driver_pid: int) -> str:
    """What a process of the stage's tree is: the driver, a Ray worker by its title
    (`ray::MapWorker(...)`, `ray::_StatsActor`, `ray::IDLE`), or one of Ray's own daemons."""
    if proc.pid == driver_pid:
        return "driver"
    try:
        cmd = proc.cmdline()
    except Exception:
        return "?"
    title = cmd[0] if cmd else proc.name()
    if title.startswith("ray::") and "Agent" not in title:  # the dashboard and runtime-env agents are Ray's
        return "worker " + title[5:].split(" ")[0]
    exe = next((Path(c).name for c in cmd if c.endswith((".py", "server", "raylet"))), proc.name())
    return "ray " + exe


# --------------------------------------------------------------------------- the two runs

STAGE_CODE = r"""
import json, resource, sys, time
from pathlib import Path
root, chunk_mib, actors = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
import ray
from ray.data import DataContext
from cpi_ray.config.schema import PipelineConfig
from cpi_ray.regions.stage import compute_regions
tasks = sorted(p.name for p in (root / "probes").iterdir())
cfg = PipelineConfig.model_validate({"tasks": [{"name": t, "hub_id": "x/" + t} for t in tasks],
                                     "regions": {"chunk_mib": chunk_mib, "num_actors": actors}})
t0 = time.time()
for attempt in range(3):  # a busy machine can miss Ray's fixed 30 s startup deadline
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        break
    except Exception:
        if attempt == 2:
            raise
        ray.shutdown()
DataContext.get_current().enable_progress_bars = False
t1 = time.time()
compute_regions(cfg, root / "base", {t: root / "probes" / t for t in tasks}, root / "regions")
t2 = time.time()
print(json.dumps({"ray_init_s": t1 - t0, "stage_s": t2 - t1,
                  "driver_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
ray.shutdown()
"""

FLOOR_CODE = r"""
import json, sys, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
root, workers = Path(sys.argv[1]), int(sys.argv[2])
BLOCK = 1 << 22

def part(names):
    import torch
    from cpi_ray.io.safetensors_io import CheckpointReader
    torch.set_num_threads(1)
    base = CheckpointReader(root / "base")
    probes = [CheckpointReader(p) for p in sorted((root / "probes").iterdir())]
    buf = torch.empty(BLOCK)
    n = 0
    for name in names:
        numel = base.info(name).numel
        for a in range(0, numel, BLOCK):
            b = min(a + BLOCK, numel)
            x = base.read_flat(name, a, b)
            for p in probes:
                torch.sub(p.read_flat(name, a, b), x, out=buf[: b - a]).abs_()
            del x
            n += (b - a) * 4 * (1 + len(probes))
            for r in (base, *probes):
                r.close()
    return n

from cpi_ray.io.safetensors_io import CheckpointReader
names = sorted(CheckpointReader(root / "base").names())
t0 = time.time()
with ProcessPoolExecutor(workers) as ex:
    t1 = time.time()
    nbytes = sum(ex.map(part, [names[i::workers] for i in range(workers)]))
t2 = time.time()
print(json.dumps({"floor_s": t2 - t1, "bytes": nbytes}))
"""

REF_CODE = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np, torch
from safetensors.torch import load_file
root, p = Path(sys.argv[1]), 1.0
t0 = time.time()
def load(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out
base = load(root / "base")
tasks = sorted(x.name for x in (root / "probes").iterdir())
names = sorted(base)
D = sum(base[n].numel() for n in names)
k = int(p * D // 100)
out = {}
for t in tasks:
    probe = load(root / "probes" / t)  # one probe at a time: memory of 3 models, not 2 x tasks + 1
    s = torch.cat([(probe[n] - base[n]).abs().reshape(-1) for n in names])
    del probe
    thr = torch.topk(s, k, sorted=False).values.min()
    m = s > thr
    need = k - int(m.sum())
    eq = (s == thr).nonzero().view(-1)[:need]  # ties: lowest flat index first
    m[eq] = True
    off = 0
    for n in names:
        c = base[n].numel()
        out[t + "|" + n] = np.packbits(m[off:off + c].numpy())
        off += c
    del s, m
t1 = time.time()
np.savez(root / "reference_masks.npz", **out)
print(json.dumps({"ref_s": t1 - t0,
                  "ref_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def run_child(code: str, args: list[str], sample: bool, at_peak: Optional[list] = None) -> tuple[dict, int]:
    """Run `code` in a child; with `sample`, also its tree's peak PSS (and, into `at_peak`, who
    held what at that peak)."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid) if sample else None
    if sampler:
        sampler.start()
    out, _ = proc.communicate()
    if sampler:
        sampler.stop = True
        sampler.join()
        if at_peak is not None:
            at_peak.append(sampler.at_peak)
    if proc.returncode:
        raise SystemExit(f"child failed with exit code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1]), (sampler.peak_kib if sampler else 0)


def compare(root: Path) -> bool:
    from cpi_ray.io.masks import MaskFile

    ref = np.load(root / "reference_masks.npz")
    ok = True
    for key in ref.files:
        t, n = key.split("|", 1)
        m = MaskFile(root / "regions" / f"{t}.mask.safetensors")
        ok &= bool(np.array_equal(m.packed(n).numpy(), ref[key]))
        m.close()
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="size of each model (fp32)")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--chunk-mib", type=int, default=64)
    ap.add_argument("--num-actors", type=int, default=2)
    ap.add_argument(
        "--workdir",
        default=None,
        help="where the checkpoints go (default: a temp dir); reused when it holds them",
    )
    ap.add_argument(
        "--skip-reference",
        action="store_true",
        help="the reference needs about 3 x size of memory",
    )
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of the stage (the median is reported)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--results", default=None, help="append the figures to RESULTS/regions.json")
    a = ap.parse_args(argv)

    root = Path(a.workdir or tempfile.mkdtemp(prefix="bench-regions-"))
    root.mkdir(parents=True, exist_ok=True)
    t = time.time()
    spec = {"size_gb": a.size_gb, "tasks": a.tasks}
    built = root / "build.json"
    if built.is_file() and json.loads(built.read_text())["spec"] == spec:
        info = json.loads(built.read_text())["info"]
        how = "reused"
    else:
        info = build(root, a.size_gb, a.tasks)
        built.write_text(json.dumps({"spec": spec, "info": info}))
        how = f"built in {time.time() - t:.0f}s"
    files = [
        f for d in [root / "base", *sorted((root / "probes").iterdir())] for f in d.glob("*.safetensors")
    ]
    nbytes = sum(f.stat().st_size for f in files)
    print(
        f"base + {a.tasks} tasks of {info['params'] / 1e6:.0f}M fp32 parameters "
        f"({info['params'] * 4 / 2**30:.2f} GiB each, {info['tensors']} tensors, "
        f"{nbytes / 1e9:.2f} GB in all), {how}"
    )
    cores = a.num_actors
    out: dict = {"size_gb": a.size_gb, "tasks": a.tasks, "bytes": nbytes, "cores": cores}

    def rate(seconds: float, what: str) -> str:
        r = nbytes / seconds
        out[what] = {
            "s": round(seconds, 2),
            "bytes_per_s": round(r),
            "bytes_per_s_per_core": round(r / cores),
        }
        return f"{r / 1e6:6.0f} MB/s ({r / cores / 1e6:.0f} MB/s per core)"

    try:
        (root / "reference_masks.npz").unlink(missing_ok=True)
        # The stage and the floor both read a warm page cache: the files are read once, untimed,
        # first (files larger than the free memory are read from disk by both, whatever this does).
        run_child(FLOOR_CODE, [str(root), str(a.num_actors)], False)
        fl, _ = run_child(FLOOR_CODE, [str(root), str(a.num_actors)], False)
        stage_args = [str(root), str(a.chunk_mib), str(a.num_actors)]
        runs = []
        for _ in range(a.repeat):
            st, _ = run_child(STAGE_CODE, stage_args, False)
            stats = json.loads((root / "regions" / "stats.json").read_text())
            runs.append(
                {"s": round(st["stage_s"], 2), "ray_init_s": round(st["ray_init_s"], 2), **stats["timing_s"]}
            )
            p0 = stats["timing_s"]["passes"][0]
            print(
                f"stage run : {st['stage_s']:7.1f} s (+ {st['ray_init_s']:.1f} s Ray start; first result "
                f"after {p0['first_result_s']:.1f} s, {p0['udf_s']:.1f} s in the UDF over all actors)"
            )
        median = float(np.median([r["s"] for r in runs]))
        print(
            f"stage     : {median:7.1f} s, {rate(median, 'stage')} (median of {len(runs)}; load average "
            f"{os.getloadavg()[0]:.1f})"
        )
        out["load_average"] = round(os.getloadavg()[0], 1)
        out["stage"].update(passes=stats["num_passes"], runs=runs)
        sampler: list = []
        mem, peak = run_child(STAGE_CODE, stage_args, True, sampler)
        own = sum(k for r, k in sampler[0].items() if not r.startswith("ray "))
        print(
            f"memory    : peak PSS of driver + every Ray process {peak / 2**20:.2f} GiB, of the "
            f"driver + the workers the stage started {own / 2**20:.2f} GiB (a second run, "
            f"{mem['stage_s']:.1f} s with the sampler); driver peak RSS "
            f"{mem['driver_rss_kib'] / 2**20:.2f} GiB"
        )
        for r, k in sorted(sampler[0].items(), key=lambda x: -x[1]):
            print(f"            {k / 2**10:6.0f} MiB  {r}")
        out["stage"].update(
            peak_pss_gib=round(peak / 2**20, 3),
            peak_pss_stage_gib=round(own / 2**20, 3),
            pss_at_peak_mib={r: round(k / 2**10) for r, k in sampler[0].items()},
            driver_rss_gib=round(mem["driver_rss_kib"] / 2**20, 3),
        )
        print(f"floor     : {fl['floor_s']:7.1f} s, {rate(fl['floor_s'], 'floor')} (read + |delta| only)")
        if not a.skip_reference:
            ref, _ = run_child(REF_CODE, [str(root)], False)
            print(
                f"reference : {ref['ref_s']:7.1f} s, {rate(ref['ref_s'], 'reference')} on 1 process, "
                f"peak RSS {ref['ref_rss_kib'] / 2**20:.2f} GiB"
            )
            out["reference"]["peak_rss_gib"] = round(ref["ref_rss_kib"] / 2**20, 3)
            print(
                f"ratios    : wall stage/floor {st['stage_s'] / fl['floor_s']:.2f}, "
                f"stage/reference {st['stage_s'] / ref['ref_s']:.2f}, "
                f"memory stage/reference {peak / ref['ref_rss_kib']:.2f}"
            )
            same = compare(root)
            out["masks_identical"] = same
            print(f"masks identical to the reference: {same}")
        if a.results:
            res = Path(a.results) / "regions.json"
            res.parent.mkdir(parents=True, exist_ok=True)
            rows = json.loads(res.read_text()) if res.is_file() else []
            out["command"] = "python benchmarks/bench_regions.py " + " ".join(
                argv if argv is not None else sys.argv[1:]
            )
            out["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs"
            rows.append(out)
            res.write_text(json.dumps(rows, indent=1) + "\n")
    finally:
        if not a.keep and a.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
