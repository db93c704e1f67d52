"""Evolving Parameter Isolation on the SFT engine (DeepSpeed ZeRO-3): what a mask update costs
against a plain step, and the per-rank memory of its statistics at one and two workers.

Each run is a group of processes on gloo (as `bench_sft_engine.py`), the engine's own
`build_engine` / `train_step` with `epi.EvolvingIsolation`: `--steps` optimizer steps at
`interval` 2, so every other step starts with a mask update (importance, moving average,
per-tensor scales, the exact top-k across ranks, the new frozen set).

Printed, and written with `--results DIR` (`epi-<model>.json` and `.md`): per world size, the mean
time of a plain step, of a step with an update and of the update alone; the EPI state per rank
(moving average + mask, which ZeRO-3 partitions: halves at two ranks) and the frozen set's
bytes per rank; each rank's peak RSS.

    python benchmarks/bench_epi.py --model demo --steps 6 --results benchmarks/results
    python benchmarks/bench_epi.py --model tiny --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sft_engine import model_dir, report_ranks, rows, spawn_ranks  # noqa: E402

from cpi_ray.data.batching import iterate_batches  # noqa: E402
from cpi_ray.evaluation.report import markdown_table  # noqa: E402
from cpi_ray.io.atomic import atomic_file, write_json  # noqa: E402

MIB = 2**20


def worker(rank: int, world: int, mdir: str, data: list, spec: dict, out: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import torch.distributed as dist

    from cpi_ray.config.schema import ConsolidateConfig, EpiConfig
    from cpi_ray.training import zero3
    from cpi_ray.training.engine import build_engine, train_step
    from cpi_ray.training.epi import EvolvingIsolation

    dist.init_process_group("gloo", init_method=f"file://{spec['init']}", rank=rank, world_size=world)
    zero3.init_distributed(False)
    torch.manual_seed(0)
    tc = ConsolidateConfig(steps=spec["steps"], batch_size=spec["batch"], lr=1e-4, zero_stage=3)
    engine, _, params, freezer = build_engine(tc, Path(mdir), world, section="consolidate")
    engine.train()
    iso = EvolvingIsolation(params, EpiConfig(ratio=spec["ratio"], interval=2), freezer)
    batches = iterate_batches(data, spec["batch"], 0, seed=0, rank=rank, world_size=world)
    steps = []
    for s in range(spec["steps"]):
        spent = []

        def update(spent=spent) -> None:
            t = time.perf_counter()
            iso.update()
            spent.append(time.perf_counter() - t)

        t = time.perf_counter()
        train_step(
            engine, freezer, batches, tc, torch.device("cpu"), before_step=update if iso.due(s) else None
        )
        steps.append({"step_s": time.perf_counter() - t, "update_s": spent[0] if spent else None})
    rec = {
        "steps": steps,
        "epi_state_bytes": iso.summary()["state_bytes_per_rank"],
        "frozen_local": len(freezer),
        "frozen_bytes": sum(
            e.sel.numel() * e.sel.element_size() + e.values.numel() * 4 for e in freezer.entries
        ),
        "k": iso.k,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    report_ranks(rec, world, rank, out)


def run(world: int, mdir: Path, data: list, args: argparse.Namespace, work: Path) -> list[dict]:
    spec = {"steps": args.steps, "batch": args.batch // world, "ratio": args.ratio}
    return spawn_ranks(worker, "epi", world, work, spec, str(mdir), data)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["demo", "tiny"], default="demo")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run (every other one updates)")
    ap.add_argument("--batch", type=int, default=4, help="rows per optimizer step (split over ranks)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per row")
    ap.add_argument("--ratio", type=float, default=5.0, help="epi.ratio: percent frozen")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cpi-bench-epi")
    ap.add_argument("--results", type=Path, metavar="DIR")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    mdir = model_dir(args.model, args.work)
    vocab = json.loads((mdir / "config.json").read_text())["vocab_size"]
    data = rows(args.steps * args.batch, args.seq, vocab)
    table, raw = [], {}
    for world in (1, 2):
        ranks = run(world, mdir, data, args, args.work)
        raw[world] = ranks
        # The first step builds DeepSpeed's buffers: left out of the means.
        steps = ranks[0]["steps"][1:]
        plain = mean([s["step_s"] for s in steps if s["update_s"] is None])
        with_update = mean([s["step_s"] for s in steps if s["update_s"] is not None])
        update = mean([s["update_s"] for s in steps if s["update_s"] is not None])
        table.append(
            [
                str(world),
                f"{plain:.2f}",
                f"{with_update:.2f}",
                f"{update:.2f} ({update / plain:.2f}x a plain step)",
                f"{ranks[0]['epi_state_bytes'] / MIB:.1f}",
                " / ".join(f"{r['frozen_bytes'] / MIB:.2f}" for r in ranks),
                " / ".join(f"{r['peak_rss'] / 2**30:.2f}" for r in ranks),
            ]
        )
    header = [
        "ranks",
        "plain step (s)",
        "step with update (s)",
        "update alone (s)",
        "EPI state per rank (MiB)",
        "frozen set per rank (MiB)",
        "peak RSS per rank (GiB)",
    ]
    md = markdown_table(header, table)
    k = raw[1][0]["k"]
    print(f"\nEPI on the SFT engine, {args.model} model, ZeRO-3, ratio {args.ratio:g}% (k = {k}):\n")
    print(md)
    if args.results is not None:
        args.results.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/bench_epi.py " + " ".join(sys.argv[1:])
        write_json(args.results / f"epi-{args.model}.json", {"runs": raw, "command": command, "k": k})
        with atomic_file(args.results / f"epi-{args.model}.md", "w") as f:
            f.write(
                f"# EPI on the SFT engine: {args.model} model, ZeRO-3, ratio {args.ratio:g}%\n\n"
                f"{args.steps} steps of {args.batch} rows x {args.seq} tokens per run, every other "
                "one starting with a mask update; the first step is left out of the means. "
                f"k = {k} frozen elements.\n\n" + md + f"\n\n```\n{command}\n```\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
