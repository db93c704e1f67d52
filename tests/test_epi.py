"""Evolving Parameter Isolation on the SFT engine (DeepSpeed ZeRO-3, one and two ranks): every mask
update freezes exactly k elements, frozen elements stay bitwise until the next update, one and two
ranks select the same set, and a job killed mid-way resumes to the same model bitwise."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from test_freeze import random_mask_file, synthetic_examples, tiny_cfg

STEPS, INTERVAL, RATIO, ROWS = 7, 3, 10.0, 8


def _worker(rank, world, model_dir, init_file, out):
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    import deepspeed

    from cpi_ray.config.schema import ConsolidateConfig, EpiConfig
    from cpi_ray.data.batching import iterate_batches
    from cpi_ray.training import zero3
    from cpi_ray.training.engine import build_engine, train_step
    from cpi_ray.training.epi import EvolvingIsolation

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    tc = ConsolidateConfig(
        steps=STEPS,
        batch_size=ROWS // world,
        lr=1e-2,
        weight_decay=0.1,
        warmup_ratio=0.0,
        max_grad_norm=1.0,
        precision="fp32",
    )
    engine, _, params, freezer = build_engine(tc, model_dir, world, section="consolidate")
    iso = EvolvingIsolation(params, EpiConfig(ratio=RATIO, interval=INTERVAL), freezer)
    batches = iterate_batches(synthetic_examples(64), ROWS // world, 0, seed=5, rank=rank, world_size=world)

    def full_weights():
        return {n: t.clone() for n, t in zero3.gathered_tensors(engine.module)}

    def full_mask():
        padded = {}
        for n, p in iso.params:
            m = torch.zeros(p.ds_tensor.ds_numel, dtype=torch.bool)
            m[: iso.valid[n]] = iso.masks[n]
            padded[n] = m
        return {n: t.reshape(-1).clone() for n, t in zero3.gathered_partitions(iso.params, padded)}

    trace = []
    for step in range(STEPS):
        before = full_weights()
        stats = {}
        hook = (lambda stats=stats: stats.update(iso.update())) if iso.due(step) else None
        train_step(engine, freezer, batches, tc, torch.device("cpu"), before_step=hook)
        trace.append({"before": before, "mask": full_mask(), "stats": stats})
    trace.append({"before": full_weights()})
    if rank == 0:
        torch.save({"trace": trace, "k": iso.k, "numel": iso.numel}, out)
    dist.barrier()
    dist.destroy_process_group()


def _run(tmp_path, tiny_model_dir, world):
    out = tmp_path / f"trace-{world}.pt"
    mp.spawn(
        _worker,
        args=(world, str(tiny_model_dir), str(tmp_path / f"init-{world}"), str(out)),
        nprocs=world,
        join=True,
    )
    return torch.load(out, weights_only=False)


@pytest.mark.slow  # DeepSpeed engines in subprocesses
def test_masks_hold_exactly_k_elements_bitwise_between_updates(tmp_path, tiny_model_dir):
    runs = {w: _run(tmp_path, tiny_model_dir, w) for w in (1, 2)}
    for world, run in runs.items():
        trace, k = run["trace"], run["k"]
        assert k == round(RATIO / 100 * run["numel"]) > 0
        updates = [s for s in range(STEPS) if (s + 1) % INTERVAL == 0]
        assert [s for s in range(STEPS) if trace[s]["stats"]] == updates
        for s in range(STEPS):
            n_frozen = sum(int(m.sum()) for m in trace[s]["mask"].values())
            assert n_frozen == (k if s >= updates[0] else 0), (world, s)
        for u, start in enumerate(updates):
            assert trace[start]["stats"]["frozen"] == k
            end = updates[u + 1] if u + 1 < len(updates) else STEPS
            mask, held = trace[start]["mask"], trace[start]["before"]
            moved_free = 0
            for s in range(start, end):
                after = trace[s + 1]["before"]
                for name, m in mask.items():
                    a, b = held[name].reshape(-1), after[name].reshape(-1)
                    assert torch.equal(a[m], b[m]), f"{world} ranks: frozen {name} moved at step {s + 1}"
                    moved_free += int((a[~m] != b[~m]).sum())
            assert moved_free > 0
        # The set evolves: the second update lets some elements go and takes others.
        second = trace[updates[1]]["stats"]
        assert second["entered"] == second["left"] > 0
    # One and two ranks, same data and global batch: the first update selects the same set, up
    # to gradients that differ in their last bits (the two ranks' halves are summed).
    s = INTERVAL - 1
    one, two = runs[1]["trace"][s]["mask"], runs[2]["trace"][s]["mask"]
    inter = sum(int((one[n] & two[n]).sum()) for n in one)
    assert inter >= 0.99 * runs[1]["k"]


@pytest.mark.slow  # two Ray Train jobs on two workers
def test_a_killed_epi_job_resumes_to_the_same_model(ray_session, tiny_model_dir, tmp_path):
    from cpi_ray.config.schema import EpiConfig
    from cpi_ray.io.safetensors_io import CheckpointReader
    from cpi_ray.run.progress import METRICS_FILE, read_metrics
    from cpi_ray.training.consolidate import fit_group

    mask = tmp_path / "none.mask.safetensors"
    random_mask_file(tiny_model_dir, mask, density=0.0)  # no fixed frozen set
    cfg = tiny_cfg(
        steps=6, batch_size=4, lr=1e-2, num_workers=2, checkpoint_every=2, max_failures=1, freeze="none"
    )
    epi = EpiConfig(ratio=5, interval=2)
    recs = {}
    for run in ("clean", "killed"):
        marker = tmp_path / f"{run}.killed"
        fault = {"step": 5, "rank": 1, "marker": str(marker)} if run == "killed" else None
        recs[run] = fit_group(
            cfg,
            stage=1,
            tasks=["t"],
            frozen=[],
            start_dir=tiny_model_dir,
            out_dir=tmp_path / run,
            mask_path=mask,
            examples=synthetic_examples(48),
            pad_id=0,
            storage=tmp_path / f"_ray_{run}",
            fingerprint=run,
            job=f"epi {run}",
            metrics_path=tmp_path / f"{run}.metrics.jsonl",
            fault=fault,
            epi=epi,
        )
    assert (tmp_path / "killed.killed").exists(), "the fault was not injected"
    assert recs["killed"]["resumed_at_step"] == 4 and recs["clean"]["resumed_at_step"] == 0
    assert recs["killed"]["epi"] == recs["clean"]["epi"]
    assert recs["clean"]["epi"]["updates"] == 3
    with CheckpointReader(tmp_path / "clean") as a, CheckpointReader(tmp_path / "killed") as b:
        for name in a.names():
            assert torch.equal(a.read_flat(name), b.read_flat(name)), name
    rows = {run: read_metrics(tmp_path / run / METRICS_FILE) for run in recs}
    k = recs["clean"]["epi"]["k"]
    for run in recs:
        assert [r.get("epi_frozen") for r in rows[run]] == [None, k, None, k, None, k]
    assert [r["loss"] for r in rows["clean"]] == [r["loss"] for r in rows["killed"]]
