"""The SFT engine (DeepSpeed at ZeRO-0 and ZeRO-3, one rank; ZeRO-3 on two ranks whose rows hold
different numbers of tokens) trains like a plain PyTorch loop with torch's AdamW, the same
parameter groups, LR schedule and clipping: the loop the probes ran on before the engine."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from cpi_ray.config.schema import ProbeConfig
from cpi_ray.data.batching import iterate_batches

STEPS = 4


def _rows(n=32, vocab=90):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        p, a = 3 + i % 5, 4 + i % 3
        ids = torch.randint(7, vocab, (p + a,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


def _tc(stage: int, world: int = 1) -> ProbeConfig:
    # batch_size is per worker: every run takes the same global batch of 4 rows per step.
    return ProbeConfig(
        steps=STEPS, batch_size=4 // world, grad_accum=2, lr=1e-3, weight_decay=0.1, zero_stage=stage
    )


def _plain(model_dir) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    from cpi_ray.training.sft import accumulate_loss, make_scheduler, param_groups

    tc = _tc(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(param_groups(model.parameters(), tc.weight_decay), lr=tc.lr, eps=1e-8)
    sched = make_scheduler(opt, tc)
    batches = iterate_batches(_rows(), 2, 0, seed=0)
    losses, norms = [], []
    for _ in range(STEPS):
        loss, _ = accumulate_loss(model, batches, tc, torch.device("cpu"))
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm)))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss)
    weights = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=True)}
    return losses, norms, weights


def _engine_worker(rank, world, stage, model_dir, init_file, out):
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from pathlib import Path

    from cpi_ray.training import zero3
    from cpi_ray.training.engine import build_engine, train_step

    zero3.init_distributed(False)
    tc = _tc(stage, world)
    engine, _, params, freezer = build_engine(tc, Path(model_dir), world)
    engine.train()
    batches = iterate_batches(_rows(), 2 // world, 0, seed=0, rank=rank, world_size=world)
    steps = [train_step(engine, freezer, batches, tc, torch.device("cpu")) for _ in range(STEPS)]
    weights = dict(zero3.gathered_tensors(engine.module))
    if rank == 0:
        torch.save({"losses": [s[0] for s in steps], "norms": [s[2] for s in steps], "weights": weights}, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow  # a DeepSpeed engine per case, in subprocesses
@pytest.mark.parametrize("stage,world", [(0, 1), (3, 1), (3, 2)])
def test_engine_trains_like_a_plain_torch_loop(tmp_path, tiny_model_dir, stage, world):
    out = tmp_path / "engine.pt"
    mp.spawn(
        _engine_worker,
        args=(world, stage, str(tiny_model_dir), str(tmp_path / "init"), str(out)),
        nprocs=world,
    )
    got = torch.load(out, weights_only=True)
    losses, norms, weights = _plain(tiny_model_dir)
    torch.testing.assert_close(got["losses"], losses, rtol=1e-5, atol=1e-6)
    # The norm the metrics log, before clipping: DeepSpeed's own under ZeRO-3, the engine's at ZeRO-0.
    torch.testing.assert_close(got["norms"], norms, rtol=1e-4, atol=1e-6)
    assert set(got["weights"]) == set(weights)
    for n, w in weights.items():
        torch.testing.assert_close(got["weights"][n], w, rtol=1e-4, atol=1e-6, msg=n)
