"""Soak: run the smoke pipeline N times in a row on one Ray cluster and report failures, leaked
Ray resources (placement groups, live actors) and memory growth; with `--faults`, kill one Ray
worker process of every run after the first and check that the run still gives the same outputs.

    python benchmarks/soak.py --runs 10
    python benchmarks/soak.py --runs 3 --set probe.steps=20 --set consolidate.steps=5
    python benchmarks/soak.py --runs 4 --faults --results benchmarks/results
    python benchmarks/soak.py --runs 6 --faults --fault-stages probe,regions,fuse,consolidate,evaluate

Each run gets a fresh run directory, so every stage really runs. After each run the script
counts the cluster's placement groups that are not removed and its actors that are alive, and
the resident memory of the driver and of the Ray processes it started.

With `--faults` the first run is fault-free and is the reference. In every later run a background
thread waits a random time (up to the reference run's length), then SIGKILLs one Ray worker
process of the run, chosen at random among those alive at that moment: a Ray Train worker
(`RayTrainWorker` actor) while probe, consolidate or baselines train, a Ray Data actor of the
regions stage, a fuse actor, or the worker running an evaluate task. Between stages, or while a
stage has no worker up, it waits for the next one to appear. `--fault-stages` instead cycles the
faulty runs through the given stages: the kill falls at a random moment of that stage (up to its
shortest length in the runs so far). Found by the Ray state API, killed by pid: a real process death,
the kind a node's OOM killer deals, not `ray.kill`. Only processes this script's own Ray started
are ever candidates. Each faulty run's outputs are compared with the reference run's: `final/`
and `probes/` tensors bitwise, the masks, `groups/groups.json` and the scores of
`eval/scores.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# On a busy machine the embedded raylet, and the agent it waits for, can take minutes to start.
os.environ.setdefault("RAY_raylet_start_wait_time_s", "300")
os.environ.setdefault("RAY_agent_register_timeout_ms", "300000")

ROOT = Path(__file__).resolve().parents[1]

# The stages whose Ray worker processes a fault may kill, and what their victims are.
TRAIN_STAGES = ("probe", "consolidate", "baselines")
FAULT_STAGES = ("probe", "regions", "fuse", "consolidate", "baselines", "evaluate")
TRAIN_WORKER = "RayTrainWorker"
FUSE_ACTOR = "FuseActor"
DATA_ACTOR_PREFIXES = ("MapWorker(", "_MapWorker")
EVALUATE_TASK = "cpi-evaluate"
# What the comparison with the reference run covers, in the table's order.
COMPARED = ("final", "probes", "masks", "groups", "scores")


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


# --------------------------------------------------------------------------- which stage runs


class StageTracker(logging.Handler):
    """Follows the runner's "stage X: starting" / "stage X: ... in" lines: the stage running
    now, and when each stage started and ended (seconds since `reset`)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.reset()

    def reset(self) -> None:
        self.t0 = time.monotonic()
        self.current: Optional[str] = None
        self.started: dict[str, float] = {}
        self.ended: dict[str, float] = {}

    def now(self) -> float:
        return time.monotonic() - self.t0

    def emit(self, record: logging.LogRecord) -> None:
        if not isinstance(record.msg, str) or not record.msg.startswith("stage %s: ") or not record.args:
            return
        name = str(record.args[0])
        if record.msg == "stage %s: starting":
            self.current = name
            self.started[name] = self.now()
            print(f"  [{self.now():6.0f}s] stage {name}: starting", flush=True)
        else:
            self.ended[name] = self.now()
            if self.current == name:
                self.current = None

    def durations(self) -> dict[str, float]:
        return {s: self.ended[s] - t for s, t in self.started.items() if s in self.ended}


# --------------------------------------------------------------------------- victims


@dataclass(frozen=True)
class Victim:
    pid: int
    what: str  # "RayTrainWorker actor", "FuseActor actor", "task cpi-evaluate", ...


def victims(stage: Optional[str], actors: Iterable[Any], tasks: Iterable[Any]) -> list[Victim]:
    """The worker processes a fault may kill while `stage` runs, from the state API's actor and
    task records (objects with the `ActorState` / `TaskState` fields used here)."""
    out: list[Victim] = []
    if stage in TRAIN_STAGES or stage in ("regions", "fuse"):
        for a in actors:
            if a.state != "ALIVE" or not a.pid:
                continue
            cls = a.class_name or ""
            if (
                (stage in TRAIN_STAGES and cls == TRAIN_WORKER)
                or (stage == "fuse" and cls == FUSE_ACTOR)
                or (stage == "regions" and cls.startswith(DATA_ACTOR_PREFIXES))
            ):
                out.append(Victim(int(a.pid), f"{cls} actor"))
    elif stage == "evaluate":
        for t in tasks:
            if t.state == "RUNNING" and t.name == EVALUATE_TASK and t.worker_pid:
                out.append(Victim(int(t.worker_pid), f"task {t.name}"))
    return sorted(set(out), key=lambda v: v.pid)


def choose_victim(cands: list[Victim], allowed: set[int], rng: random.Random) -> Optional[Victim]:
    """One of the candidates whose process this driver's Ray started, at random."""
    mine = [v for v in cands if v.pid in allowed]
    return rng.choice(mine) if mine else None


def own_pids() -> set[int]:
    """Every process this driver started (its embedded Ray, its workers)."""
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def live_victims(address: str, stage: Optional[str]) -> list[Victim]:
    from ray.util.state import list_actors, list_tasks

    if stage not in FAULT_STAGES:
        return []
    actors, tasks = [], []
    if stage == "evaluate":
        tasks = list_tasks(
            address=address,
            filters=[("name", "=", EVALUATE_TASK), ("state", "=", "RUNNING")],
            limit=1000,
            raise_on_missing_output=False,
        )
    else:
        actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=10_000)
    return victims(stage, actors, tasks)


@dataclass
class Fault:
    """What a faulty run's killer did."""

    target: str  # "any stage" or the stage it was aimed at
    planned_s: float  # when it started looking (seconds into the run, or into the target stage)
    killed: Optional[str] = None  # what it killed, None when nothing was found
    pid: Optional[int] = None
    stage: Optional[str] = None
    at_s: Optional[float] = None  # seconds into the run
    note: str = ""

    def describe(self) -> str:
        if self.killed is None:
            return f"nothing ({self.note})" if self.note else "nothing"
        return f"{self.killed} pid {self.pid} in {self.stage} at {self.at_s:.0f}s"


class Killer(threading.Thread):
    """Waits `delay_s` (counted from the start of `stage` when given, else of the run), then
    SIGKILLs one random victim alive at that moment, polling until one shows up while the
    stage (or the run) lasts."""

    def __init__(
        self,
        tracker: StageTracker,
        address: str,
        delay_s: float,
        stage: Optional[str],
        rng: random.Random,
        poll_s: float = 0.5,
        find: Callable[[str, Optional[str]], list[Victim]] = live_victims,
        allowed: Callable[[], set[int]] = own_pids,
    ):
        super().__init__(daemon=True, name="soak-fault")
        self.tracker, self.address, self.delay_s, self.stage = tracker, address, delay_s, stage
        self.rng, self.poll_s, self.find, self.allowed = rng, poll_s, find, allowed
        self.stop = threading.Event()
        self.fault = Fault(target=stage or "any stage", planned_s=delay_s)

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # noqa: BLE001 - the soak reports it, the run goes on
            self.fault.note = f"killer failed: {type(e).__name__}: {e}"

    def _run(self) -> None:
        tr = self.tracker
        if self.stage is not None:
            while tr.current != self.stage:
                if self.stage in tr.ended or self.stop.wait(self.poll_s):
                    self.fault.note = f"stage {self.stage} did not run"
                    return
            start = tr.started[self.stage]
        else:
            start = 0.0
        while tr.now() < start + self.delay_s:
            if self.stop.wait(min(self.poll_s, max(0.0, start + self.delay_s - tr.now()))):
                self.fault.note = "run ended first"
                return
            if self.stage is not None and tr.current != self.stage:
                self.fault.note = f"{self.stage} ended {tr.now() - start:.0f}s in, before the kill moment"
                return
        while not self.stop.is_set():
            stage = tr.current
            if self.stage is not None and stage != self.stage:
                self.fault.note = f"no worker of {self.stage} found before it ended"
                return
            try:
                cands = self.find(self.address, stage)
            except Exception:  # noqa: BLE001 - a busy dashboard times out now and then
                cands = []
            v = choose_victim(cands, self.allowed(), self.rng) if cands else None
            # the stage may have moved on while the state API answered
            if v is not None and tr.current == stage:
                try:
                    os.kill(v.pid, signal.SIGKILL)
                except ProcessLookupError:
                    v = None
                if v is not None:
                    self.fault.killed, self.fault.pid = v.what, v.pid
                    self.fault.stage, self.fault.at_s = stage, tr.now()
                    print(f"  [{tr.now():6.0f}s] fault: SIGKILL {v.what} pid {v.pid} in {stage}", flush=True)
                    return
            self.stop.wait(self.poll_s)
        self.fault.note = "run ended first"


# --------------------------------------------------------------------------- outputs


def _tensor_bytes(folder: Path, pattern: str = "*.safetensors") -> dict[tuple[str, str], tuple]:
    """Every tensor of the safetensors files under `folder`, as raw bytes with dtype and shape,
    keyed by (file's folder relative to `folder`, tensor name)."""
    import torch
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.rglob(pattern)):
        rel = str(f.parent.relative_to(folder))
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                t = st.get_tensor(name).contiguous()
                raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
                out[(rel, name)] = (str(t.dtype), tuple(t.shape), raw)
    return out


def _mask_meta(folder: Path) -> dict[str, dict]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.mask.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out[f.name] = st.metadata() or {}
    return out


def _scores(run_dir: Path):
    data = json.loads((run_dir / "eval" / "scores.json").read_text())
    return data["scores"]


def compare_outputs(ref: Path, run: Path) -> dict[str, str]:
    """Per part of `COMPARED`: "equal", "differs (...)" or "missing"."""

    def tensors(rel: str, pattern: str = "*.safetensors"):
        return lambda d: _tensor_bytes(d / rel, pattern) if (d / rel).is_dir() else None

    parts: dict[str, Callable[[Path], Any]] = {
        "final": tensors("final"),
        "probes": tensors("probes"),
        "masks": lambda d: (
            (_tensor_bytes(d / "regions", "*.mask.safetensors"), _mask_meta(d / "regions"))
            if any((d / "regions").glob("*.mask.safetensors"))
            else None
        ),
        "groups": lambda d: (
            json.loads((d / "groups" / "groups.json").read_text())
            if (d / "groups" / "groups.json").is_file()
            else None
        ),
        "scores": lambda d: _scores(d) if (d / "eval" / "scores.json").is_file() else None,
    }
    out = {}
    for part, read in parts.items():
        a, b = read(ref), read(run)
        if b is None or a is None:
            out[part] = "missing"
        elif a == b:
            out[part] = "equal"
        else:
            out[part] = f"differs ({_what_differs(a, b)})"
    return out


def _what_differs(a, b) -> str:
    if isinstance(a, tuple) and len(a) == 2 and isinstance(a[0], dict):  # masks: tensors, metadata
        return _what_differs(a[0], b[0]) if a[0] != b[0] else "metadata"
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b), key=str)
        diff = [k for k in keys if a.get(k) != b.get(k)]
        names = ["/".join(k) if isinstance(k, tuple) else str(k) for k in diff]
        return f"{len(diff)} of {len(keys)}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
    return "content"


def outputs_verdict(cmp: Optional[dict[str, str]]) -> str:
    if cmp is None:
        return "-"
    bad = [p for p in COMPARED if cmp.get(p) != "equal"]
    return "equal" if not bad else "DIFFER: " + ", ".join(f"{p} {cmp[p]}" for p in bad)


def one_line(e: BaseException) -> str:
    """The line of a (remote, wrapped) exception that names the underlying error."""
    import re

    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [
        ln
        for ln in lines
        if re.search(r"\b\w*(Error|Exception)\b", ln)
        and not ln.startswith(("File ", "Traceback", "For further"))
    ]
    return f"{type(e).__name__}: " + (named or lines or [""])[-1][:300]


# --------------------------------------------------------------------------- the table


@dataclass
class Row:
    run: int
    ok: bool
    wall_s: float
    placement_groups: int
    live_actors: int
    driver_rss_mib: float
    ray_rss_mib: float
    error: str = ""
    fault: Optional[dict] = None
    outputs: Optional[dict[str, str]] = None
    live_actor_classes: str = ""
    stage_s: dict[str, float] = field(default_factory=dict)


def _fault_cell(r: Row) -> str:
    if r.fault is None:
        return "- (reference)" if r.run == 0 else "-"
    return Fault(**r.fault).describe()


def render_markdown(rows: list[Row], command: str, meta: dict) -> str:
    faults = any(r.fault is not None for r in rows)
    lines = [f"# Soak{' with faults' if faults else ''}: {meta['config']}", ""]
    lines.append(
        f"{len(rows)} run(s)"
        + (f" of {meta['runs_planned']} asked for" if meta.get("runs_planned", len(rows)) > len(rows) else "")
        + f" on one embedded Ray; {meta['cpus']} CPU(s); commit {meta['commit']}; "
        f"{meta['date']}."
        + (" Run 0 is fault-free and the reference the others' outputs are compared with." if faults else "")
    )
    lines.append("")
    head = ["run", "result", "wall_s"]
    if faults:
        head += ["killed", "outputs vs run 0"]
    head += ["placement groups", "live actors", "driver RSS MiB", "Ray RSS MiB"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r.run), "completed" if r.ok else f"FAILED: {r.error}", f"{r.wall_s:.0f}"]
        if faults:
            cells += [_fault_cell(r), "reference" if r.run == 0 else outputs_verdict(r.outputs)]
        cells += [
            str(r.placement_groups),
            str(r.live_actors),
            f"{r.driver_rss_mib:.0f}",
            f"{r.ray_rss_mib:.0f}",
        ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lines += ["", summary_line(rows), "", "```", command, "```", ""]
    return "\n".join(lines)


def summary_line(rows: list[Row]) -> str:
    failures = sum(not r.ok for r in rows)
    s = f"failures: {failures}/{len(rows)}"
    faulty = [r for r in rows if r.fault is not None]
    if faulty:
        killed = sum(r.fault["killed"] is not None for r in faulty)
        same = sum(r.ok and outputs_verdict(r.outputs) == "equal" for r in faulty)
        s += f"; faulty runs {len(faulty)}, a process killed in {killed}, outputs equal to run 0 in {same}"
    if len(rows) > 1:
        a, z = rows[0], rows[-1]
        s += (
            f"; driver RSS growth {z.driver_rss_mib - a.driver_rss_mib:+.0f} MiB, Ray RSS growth "
            f"{z.ray_rss_mib - a.ray_rss_mib:+.0f} MiB, placement groups {a.placement_groups} -> "
            f"{z.placement_groups}, live actors {a.live_actors} -> {z.live_actors}"
        )
    return s


def write_results(
    out: Path,
    rows: list[Row],
    command: str,
    meta: dict,
    faults: bool,
    planned: Optional[int] = None,
    tag: str = "",
) -> list[Path]:
    """`soak.md` and `soak.json` (`soak-faults.*` with faults, `-<tag>` appended when given) in
    `out`; `planned`: the runs asked for, when the table is written before they are all done."""
    out.mkdir(parents=True, exist_ok=True)
    stem = ("soak-faults" if faults else "soak") + (f"-{tag}" if tag else "")
    meta = dict(meta, runs_done=len(rows), runs_planned=planned or len(rows))
    paths = [out / f"{stem}.md", out / f"{stem}.json"]
    paths[0].write_text(render_markdown(rows, command, meta))
    paths[1].write_text(
        json.dumps({"command": command, **meta, "runs": [asdict(r) for r in rows]}, indent=1) + "\n"
    )
    return paths


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    import psutil

    from cpi_ray.config.load import load_config
    from cpi_ray.pipeline.runner import run_pipeline
    from cpi_ray.run.runtime import connect_ray

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "jobs" / "configs" / "smoke.yaml"))
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--keep", action="store_true", help="keep the run directories")
    ap.add_argument(
        "--faults", action="store_true", help="kill one Ray worker process in every run after the first"
    )
    ap.add_argument(
        "--fault-stages",
        default="",
        help=f"comma-separated stages ({', '.join(FAULT_STAGES)}) the faulty runs aim at in turn; "
        "default: any stage, at a random moment of the run",
    )
    ap.add_argument("--seed", type=int, default=0, help="of the kill moments and victims")
    ap.add_argument("--results", help="folder for the table as markdown and JSON")
    ap.add_argument("--tag", default="", help="appended to the results' file names")
    args = ap.parse_args(argv)
    aimed = [s for s in args.fault_stages.split(",") if s]
    for s in aimed:
        if s not in FAULT_STAGES:
            ap.error(f"--fault-stages: {s!r} is not one of {', '.join(FAULT_STAGES)}")
    command = "python benchmarks/soak.py " + shlex.join(sys.argv[1:] if argv is None else argv)

    import ray

    meta = {
        "config": os.path.relpath(args.config, ROOT) if Path(args.config).is_absolute() else args.config,
        "overrides": args.overrides,
        "cpus": os.cpu_count(),
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d"),
        "seed": args.seed,
        "fault_stages": aimed,
    }
    tracker = StageTracker()
    cpi_log = logging.getLogger("cpi_ray")
    cpi_log.setLevel(min(cpi_log.getEffectiveLevel(), logging.INFO))
    cpi_log.addHandler(tracker)

    # Its own embedded Ray, so that other Ray clusters on the machine neither serve nor skew it.
    cfg = load_config(args.config, ["ray.address=local", *args.overrides])
    print("Ray:", connect_ray(cfg))
    address = ray.get_runtime_context().gcs_address
    me = psutil.Process()
    rng = random.Random(args.seed)
    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="cpi-soak-"))
    ref_dir: Optional[Path] = None
    ref_wall = 0.0
    shortest: dict[str, float] = {}  # each stage's shortest length in the runs so far
    for i in range(args.runs):
        run_dir = work / f"run-{i}"
        tracker.reset()
        killer = None
        if args.faults and i > 0:
            stage = aimed[(i - 1) % len(aimed)] if aimed else None
            # the machine's load changes a stage's length from run to run: aim within the
            # shortest one seen
            span = shortest.get(stage, 0.0) if stage else ref_wall
            killer = Killer(tracker, address, rng.uniform(0.0, 0.9 * span), stage, rng)
            print(f"run {i}: a fault in {stage or 'any stage'} after {killer.delay_s:.0f}s", flush=True)
            killer.start()
        t0 = time.time()
        ok, error = True, ""
        try:
            run_pipeline(cfg, run_dir)
        except Exception as e:  # noqa: BLE001 - a soak counts failures, it does not stop at one
            ok, error = False, one_line(e)
            traceback.print_exc()
        wall = time.time() - t0
        if killer is not None:
            killer.stop.set()
            killer.join()
        pgs, actors, classes = leaks(address)
        row = Row(
            i,
            ok,
            wall,
            pgs,
            actors,
            me.memory_info().rss / 2**20,
            ray_rss_mib(),
            error=error,
            fault=asdict(killer.fault) if killer else None,
            live_actor_classes=classes,
            stage_s={k: round(v, 1) for k, v in tracker.durations().items()},
        )
        if args.faults and i == 0:
            if not ok:
                print("the reference run failed: no fault runs without it", flush=True)
                rows.append(row)
                break
            ref_dir, ref_wall = run_dir, wall
        elif args.faults and ok and ref_dir is not None:
            row.outputs = compare_outputs(ref_dir, run_dir)
        rows.append(row)
        if ok:
            for k, v in tracker.durations().items():
                shortest[k] = min(v, shortest.get(k, v))
        print(
            f"run {i}: {'ok' if ok else 'FAILED: ' + error} in {wall:.0f}s; placement groups {pgs}, "
            f"live actors {actors}; driver RSS {row.driver_rss_mib:.0f} MiB, "
            f"Ray RSS {row.ray_rss_mib:.0f} MiB",
            flush=True,
        )
        if killer is not None:
            print(f"  killed: {killer.fault.describe()}; outputs: {outputs_verdict(row.outputs)}", flush=True)
        print(f"  live actors by class: {classes or '-'}", flush=True)
        if not args.keep and run_dir != ref_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
        if args.results:  # after every run: a soak stopped early keeps what it measured
            write_results(Path(args.results), rows, command, meta, args.faults, args.runs, args.tag)

    print("\nrun  ok   wall_s  placement_groups  live_actors  driver_rss_MiB  ray_rss_MiB")
    for r in rows:
        print(
            f"{r.run:>3}  {'yes' if r.ok else 'NO ':<3}  {r.wall_s:6.0f}  {r.placement_groups:>16}  "
            f"{r.live_actors:>11}  {r.driver_rss_mib:>14.0f}  {r.ray_rss_mib:>11.0f}"
        )
        if r.fault is not None:
            print(f"     killed: {_fault_cell(r)}; outputs vs run 0: {outputs_verdict(r.outputs)}")
        if r.error:
            print(f"     error: {r.error}")
    print("\n" + summary_line(rows))
    if args.results:
        print(
            "results:",
            ", ".join(
                map(str, write_results(Path(args.results), rows, command, meta, args.faults, tag=args.tag))
            ),
        )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(not r.ok for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
