"""Benchmark of the consolidation trainer (DeepSpeed ZeRO-3 under Ray Train).

In one run, on one model and batch:
- step time with the frozen-element masks vs without (same worker group, interleaved blocks, so
  start-up and machine noise hit both alike); target: at most 1.05x;
- memory per rank with 1 and with 2 workers: bytes of the rank's parameter partition, fp32
  master, gradient and Adam states (read back from DeepSpeed), and the process's peak RSS. With
  ZeRO-3 the per-rank model/optimizer bytes halve from 1 to 2 workers.

`--gpu` (only where CUDA exists): bf16 on one GPU per worker; prints tokens/s and model FLOPs
utilisation (6·N·tokens/s over the GPU's dense bf16 peak; pass --peak-tflops for GPUs not listed).

    python benchmarks/bench_consolidate.py                  # CPU, a ~20M-parameter Llama
    python benchmarks/bench_consolidate.py --gpu --model DIR --seq 1024 --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

# Dense bf16 peak of common GPUs (TFLOP/s), for the MFU figure.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "L4": 121.0,
    "4090": 165.0,
}


def bench_worker(config: dict) -> None:
    import ray.train

    from cpi_ray.config.schema import ConsolidateConfig
    from cpi_ray.io.masks import MaskFile
    from cpi_ray.training import zero3

    tc = ConsolidateConfig.model_validate(config["consolidate"])
    zero3.set_accelerator_env(tc.use_gpu)
    from cpi_ray.training.engine import build_engine

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = zero3.worker_device(tc.use_gpu)
    zero3.init_distributed(tc.use_gpu)
    mask = MaskFile(config["mask"])
    engine, _, params, freezer = build_engine(
        tc, Path(config["model_dir"]), world, section="consolidate", mask=mask
    )
    model = engine.module
    n_params = sum(p.ds_numel for _, p in params)

    g = torch.Generator().manual_seed(rank)
    micro = tc.batch_size // tc.grad_accum
    vocab = model.config.vocab_size

    freezer_s: list[float] = []

    def step(frz) -> float:
        t = time.perf_counter()
        tf = 0.0
        for _ in range(tc.grad_accum):
            ids = torch.randint(0, vocab, (micro, config["seq"]), generator=g).to(device)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            if frz is not None and engine.is_gradient_accumulation_boundary():
                t1 = time.perf_counter()
                frz.zero_grads()
                tf += time.perf_counter() - t1
            engine.step()
        if frz is not None:
            t1 = time.perf_counter()
            frz.restore()
            tf += time.perf_counter() - t1
            freezer_s.append(tf)
        if tc.use_gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for _ in range(config["warmup"]):
        step(freezer)
    plain, masked = [], []
    for _ in range(config["blocks"]):
        plain += [step(None) for _ in range(config["steps"])]
        masked += [step(freezer) for _ in range(config["steps"])]

    state = zero3.rank_state_bytes(params, engine.optimizer)
    out = {
        "rank": rank,
        "world": world,
        "params": n_params,
        "step_s_plain": statistics.median(plain),
        "step_s_masked": statistics.median(masked),
        "freezer_s": statistics.median(freezer_s),
        "frozen_local": len(freezer),
        "state_bytes": state,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "tokens_per_step": tc.batch_size * config["seq"] * world,
    }
    if tc.use_gpu:
        out["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
        out["gpu_name"] = torch.cuda.get_device_name()
    with open(os.path.join(config["out"], f"w{world}-r{rank}.json"), "w") as f:
        json.dump(out, f)


def run(workers: int, args, model_dir: Path, mask: Path, out: Path) -> list[dict]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cpi_ray.config.schema import ConsolidateConfig

    tc = ConsolidateConfig(
        steps=1000,
        batch_size=args.batch,
        grad_accum=args.accum,
        weight_decay=0.1,
        max_grad_norm=1.0,
        use_gpu=args.gpu,
        precision="bf16" if args.gpu else args.precision,
        num_workers=workers,
    )
    TorchTrainer(
        bench_worker,
        train_loop_config={
            "consolidate": tc.model_dump(),
            "model_dir": str(model_dir),
            "mask": str(mask),
            "seq": args.seq,
            "warmup": args.warmup,
            "steps": args.steps,
            "blocks": args.blocks,
            "out": str(out),
        },
        torch_config=TorchConfig(backend="nccl" if args.gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=args.gpu, resources_per_worker={"CPU": args.cpus_per_worker}
        ),
        run_config=RunConfig(name=f"bench-consolidate-{workers}", storage_path=str(out / "_ray")),
    ).fit()
    return [json.loads((out / f"w{workers}-r{r}.json").read_text()) for r in range(workers)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="HF model dir (safetensors); default: a random Llama")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="rows per optimizer step per worker")
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--density", type=float, default=0.05, help="frozen share of elements")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="steps per timing block")
    ap.add_argument("--blocks", type=int, default=2, help="interleaved plain/masked blocks")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--cpus-per-worker", type=float, default=1)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak of one GPU")
    args = ap.parse_args()
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: CUDA is not available here")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if not args.gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    import ray

    from cpi_ray.io.masks import pack_mask, write_mask_file
    from cpi_ray.io.safetensors_io import CheckpointReader
    from cpi_ray.models.tiny import save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model:
            model_dir = Path(args.model)
        else:
            model_dir = save_tiny_model(
                tmp / "model",
                max_shard_size=50 * 2**20,
                hidden_size=args.hidden,
                intermediate_size=args.hidden * 8 // 3,
                num_hidden_layers=args.layers,
                num_attention_heads=6,
                num_key_value_heads=2,
                vocab_size=8192,
            )
        mask = tmp / "frozen.mask.safetensors"
        g = torch.Generator().manual_seed(0)
        packed, numels = {}, {}
        with CheckpointReader(model_dir) as r:
            for n in r.names():
                numels[n] = r.info(n).numel
                packed[n] = pack_mask(torch.rand(numels[n], generator=g) < args.density)
        write_mask_file(mask, packed, numels)

        env = {"DS_ACCELERATOR": "cpu"} if not args.gpu else {}
        counts = [int(x) for x in args.workers.split(",")]
        if not ray.is_initialized():
            # Logical CPUs: the workers need theirs, Train's controller one more.
            need = int(max(counts) * args.cpus_per_worker) + 1
            ray.init(
                num_cpus=max(os.cpu_count() or 1, need),
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": {**env, "TOKENIZERS_PARALLELISM": "false"}},
            )
        results = {}
        for w in counts:
            results[w] = run(w, args, model_dir, mask, tmp)
        ray.shutdown()

    mib = 2**20
    first = next(iter(results.values()))[0]
    print(
        f"model: {first['params'] / 1e6:.1f}M parameters, batch {args.batch}x{args.seq} tokens per "
        f"worker, accumulation {args.accum}, {args.density:.0%} of elements frozen, "
        f"{'bf16 GPU' if args.gpu else args.precision + ' CPU'}"
    )
    # `ratio` is the end-to-end masked/plain step time (noisy on a shared machine); `freezer`
    # times the freezing calls alone, and `ratio*` is (plain + freezer) / plain.
    print(
        f"{'workers':>7} {'rank':>4} {'step plain':>11} {'step masked':>12} {'ratio':>6} "
        f"{'freezer':>9} {'ratio*':>6} {'state/rank':>11} {'peak RSS':>9}"
        + (f" {'GPU peak':>9}" if args.gpu else "")
    )
    for w, rows in results.items():
        for r in rows:
            line = (
                f"{w:>7} {r['rank']:>4} {r['step_s_plain']:>10.3f}s {r['step_s_masked']:>11.3f}s "
                f"{r['step_s_masked'] / r['step_s_plain']:>6.3f} "
                f"{r['freezer_s'] * 1000:>7.1f}ms "
                f"{(r['step_s_plain'] + r['freezer_s']) / r['step_s_plain']:>6.3f} "
                f"{r['state_bytes'] / mib:>8.1f}MiB {r['peak_rss_bytes'] / mib:>6.0f}MiB"
            )
            if args.gpu:
                line += f" {r['gpu_peak_bytes'] / mib:>6.0f}MiB"
            print(line)
    if args.gpu:
        for w, rows in results.items():
            r0 = rows[0]
            step = max(r["step_s_plain"] for r in rows)
            tps = r0["tokens_per_step"] / step
            name = r0["gpu_name"]
            peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
            mfu = (6 * r0["params"] * tps / (peak * 1e12 * w)) if peak else None
            print(
                f"{w} GPU(s) {name}: {tps:,.0f} tokens/s"
                + (
                    f", MFU {mfu:.1%} (6N FLOPs/token, peak {peak:.0f} TFLOP/s)"
                    if mfu
                    else " (MFU: pass --peak-tflops)"
                )
            )


if __name__ == "__main__":
    main()
