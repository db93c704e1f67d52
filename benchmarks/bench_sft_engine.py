"""The SFT engine (`cpi_ray.training.engine`: DeepSpeed, every probe, consolidation stage and
baseline) against the reference it replaced for probes: a plain PyTorch loop in one process
(full fine-tuning, torch's AdamW, the same parameter groups, LR schedule, clipping and rows).

Printed, and written with `--results DIR` (`sft-engine-<model>.json` and `.md`):
- step time at one worker: the engine at ZeRO-0 and at ZeRO-3 beside the plain loop;
- the loss curves: the largest per-step difference between each engine run and the plain loop;
- per-rank bytes of weights + gradients + optimizer states at one and two workers (ZeRO-3
  shards them; ZeRO-0 keeps a full copy on every rank), and each rank's peak RSS.

No Ray: each run is a group of processes on gloo, the way a launcher starts DeepSpeed; the engine
code is the same `build_engine` / `train_step` the Ray Train workers call.

    python benchmarks/bench_sft_engine.py --model demo --steps 8 --results benchmarks/results
    python benchmarks/bench_sft_engine.py --model tiny --steps 20
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
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpi_ray.config.schema import ProbeConfig  # noqa: E402
from cpi_ray.data.batching import iterate_batches  # noqa: E402
from cpi_ray.io.atomic import atomic_file, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def model_dir(kind: str, work: Path) -> Path:
    """The benchmark model as an HF directory: `demo` (SmolLM2-135M from the pip packages, as the
    demo config builds it) or `tiny` (the test model)."""
    if kind == "tiny":
        from cpi_ray.models.tiny import save_tiny_model

        d = work / "tiny"
        if not d.exists():
            save_tiny_model(d)
        return d
    from cpi_ray.config.load import load_config
    from cpi_ray.models.loading import resolve_base_model

    cfg = load_config(ROOT / "jobs" / "configs" / "demo.yaml", [f"model.cache_dir={work / 'models'}"])
    return Path(resolve_base_model(cfg)[0])


def rows(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    """Encoded training rows: a prompt of a quarter of the sequence, the rest learned."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(10, vocab, (seq,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (seq // 4) + ids[seq // 4 :]})
    return out


def worker(rank: int, world: int, mode: str, mdir: str, data: list, args: dict, out: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import torch.distributed as dist

    from cpi_ray.training.zero3 import rank_state_bytes

    dist.init_process_group("gloo", init_method=f"file://{args['init']}", rank=rank, world_size=world)
    torch.manual_seed(0)
    device = torch.device("cpu")
    tc = ProbeConfig(
        steps=args["steps"],
        batch_size=args["batch"],
        lr=1e-4,
        warmup_ratio=0.1,
        zero_stage=0 if mode == "plain" else int(mode[-1]),
    )
    batches = iterate_batches(data, args["batch"], 0, seed=0, rank=rank, world_size=world)
    if mode == "plain":
        from transformers import AutoModelForCausalLM

        from cpi_ray.training.sft import accumulate_loss, make_scheduler, param_groups

        model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32)
        model.train()
        opt = torch.optim.AdamW(param_groups(model.parameters(), tc.weight_decay), lr=tc.lr, eps=1e-8)
        sched = make_scheduler(opt, tc)

        def step() -> float:
            loss, _ = accumulate_loss(model, batches, tc, device)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            return loss

        params, optimizer = list(model.named_parameters()), opt
    else:
        from cpi_ray.training import zero3
        from cpi_ray.training.engine import build_engine, train_step

        zero3.init_distributed(False)
        engine, _, params, freezer = build_engine(tc, Path(mdir), world)
        engine.train()

        def step() -> float:
            return train_step(engine, freezer, batches, tc, device)[0]

        optimizer = engine.optimizer
    losses, times = [], []
    for _ in range(args["steps"]):
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
    rec = {
        "losses": losses,
        "step_s": times,
        "state_bytes": rank_state_bytes(params, optimizer),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    report_ranks(rec, world, rank, out)


def report_ranks(rec: dict, world: int, rank: int, out: str) -> None:
    """Every rank's `rec`, in rank order, written by rank 0 to `out` as JSON; ends the group."""
    import torch.distributed as dist

    gathered = [None] * world
    dist.all_gather_object(gathered, rec)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def spawn_ranks(target, name: str, world: int, work: Path, spec: dict, *target_args) -> list[dict]:
    """`target(rank, world, *target_args, spec, out)` on `world` processes (spec gains the gloo
    init file); returns the ranks' records `report_ranks` wrote."""
    out, init = work / f"{name}-{world}.json", work / f"init-{name}-{world}"
    init.unlink(missing_ok=True)
    spec = {**spec, "init": str(init)}
    mp.spawn(target, args=(world, *target_args, spec, str(out)), nprocs=world, join=True)
    return json.loads(out.read_text())


def run(mode: str, world: int, mdir: Path, data: list, args: argparse.Namespace, work: Path) -> list[dict]:
    spec = {"steps": args.steps, "batch": args.batch // world}
    return spawn_ranks(worker, mode, world, work, spec, mode, str(mdir), data)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["demo", "tiny"], default="demo")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first is warm-up)")
    ap.add_argument("--batch", type=int, default=4, help="rows per optimizer step (split over ranks)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per row")
    ap.add_argument(
        "--runs",
        nargs="+",
        default=["plainx1", "zero0x1", "zero3x1", "zero0x2", "zero3x2"],
        help="which runs (plain is the reference and always runs)",
    )
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cpi-bench-sft-engine")
    ap.add_argument("--results", type=Path, metavar="DIR")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    mdir = model_dir(args.model, args.work)
    vocab = json.loads((mdir / "config.json").read_text())["vocab_size"]
    data = rows(args.batch * args.steps, args.seq, vocab)

    runs = {}
    for key in dict.fromkeys(["plainx1", *args.runs]):
        mode, world = key.split("x")[0], int(key.split("x")[1])
        t = time.time()
        runs[f"{mode}x{world}"] = run(mode, world, mdir, data, args, args.work)
        print(f"{mode} x {world}: {time.time() - t:.0f}s", flush=True)

    def step_time(key: str) -> float:
        s = runs[key][0]["step_s"][1:]  # the first step pays for allocation
        return sum(s) / len(s)

    def losses(key: str) -> list[float]:
        # Every row has the same length, so the mean of the ranks' token means is the global one.
        per_rank = [r["losses"] for r in runs[key]]
        return [sum(v) / len(v) for v in zip(*per_rank)]

    ref = losses("plainx1")
    table = []
    for key in runs:
        table.append(
            {
                "run": key,
                "step_s": round(step_time(key), 3),
                "vs_plain": round(step_time(key) / step_time("plainx1"), 3),
                "max_loss_diff": max(abs(a - b) for a, b in zip(losses(key), ref)),
                "state_mib_per_rank": round(max(r["state_bytes"] for r in runs[key]) / 2**20, 1),
                "peak_rss_mib_per_rank": round(max(r["peak_rss"] for r in runs[key]) / 2**20, 1),
            }
        )
    cmd = "python benchmarks/bench_sft_engine.py " + " ".join(
        f"--{k} {v}"
        for k, v in (("model", args.model), ("steps", args.steps), ("batch", args.batch), ("seq", args.seq))
    )
    lines = [
        "| run | step (s) | vs plain loop | max loss diff to plain | weights+grads+optimizer "
        "per rank (MiB) | peak RSS per rank (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['run']} | {r['step_s']} | {r['vs_plain']}x | {r['max_loss_diff']:.2e} | "
            f"{r['state_mib_per_rank']} | {r['peak_rss_mib_per_rank']} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        write_json(
            args.results / f"sft-engine-{args.model}.json", {"command": cmd, "runs": runs, "table": table}
        )
        with atomic_file(args.results / f"sft-engine-{args.model}.md", "w") as f:
            f.write(
                f"# The SFT engine against a plain PyTorch loop ({args.model} model)\n\n"
                f"{args.steps} optimizer steps of {args.batch} rows x {args.seq} tokens (split over the "
                "ranks), fp32, AdamW lr 1e-4 with warm-up and cosine; step time is the mean after the "
                "first step. xN: N ranks on gloo.\n\n"
                f"{text}\n\n```\n{cmd}\n```\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
