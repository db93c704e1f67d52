"""The diagonal Fisher of the SFT engine (DeepSpeed, ZeRO-3 partitions or whole tensors, one or
two ranks) against autograd on HF's own loss in memory."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from cpi_ray.data.batching import iterate_batches

BATCHES, ROWS_PER_BATCH = 3, 6


def _examples(n=24):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        p, a = 3 + i % 5, 2 + i % 3
        ids = torch.randint(7, 90, (p + a,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


def _model():
    from cpi_ray.models.tiny import build_tiny_model

    model, _ = build_tiny_model(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        seed=1,
    )
    return model


def reference_fisher() -> dict[str, torch.Tensor]:
    """HF's own shifted mean token loss over each whole batch, autograd, squared, averaged."""
    model = _model()
    model.eval()
    params = dict(model.named_parameters(remove_duplicate=True))
    ref = {n: torch.zeros_like(p) for n, p in params.items()}
    batches = iterate_batches(_examples(), ROWS_PER_BATCH, 0, seed=3)
    for _ in range(BATCHES):
        b = next(batches)
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        grads = torch.autograd.grad(loss, list(params.values()))
        for n, g in zip(params, grads):
            ref[n] += g.square() / BATCHES
    return ref


def _worker(rank, world, stage, model_dir, init_file, out):
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    import deepspeed

    from cpi_ray.config.schema import ProbeConfig
    from cpi_ray.training import zero3
    from cpi_ray.training.fisher import engine_fisher
    from cpi_ray.training.sft import param_groups

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    tc = ProbeConfig(batch_size=ROWS_PER_BATCH // world, zero_stage=stage)
    ds = zero3.build_ds_config(tc, world, False, section="probe")
    model, _hf = zero3.load_engine_model(model_dir, ds)
    params = zero3.named_parameters(model)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups((p for _, p in params), 0.0), config=ds
    )
    batches = iterate_batches(_examples(), ROWS_PER_BATCH // world, 0, seed=3, rank=rank, world_size=world)
    local = engine_fisher(engine, params, batches, BATCHES, torch.device("cpu"))
    full = dict(zero3.gathered_partitions(params, local))
    if rank == 0:
        torch.save(full, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow  # DeepSpeed engines in subprocesses (about a minute)
@pytest.mark.parametrize("stage,world", [(3, 1), (3, 2), (0, 2)])
def test_engine_fisher_matches_autograd(tmp_path, stage, world):
    from cpi_ray.io.safetensors_io import save_sharded
    from cpi_ray.models.loading import unique_state_dict

    model = _model()
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_sharded(unique_state_dict(model), model_dir, 100_000)
    model.config.save_pretrained(model_dir)
    out = tmp_path / "f.pt"
    mp.spawn(
        _worker,
        args=(world, stage, str(model_dir), str(tmp_path / "init"), str(out)),
        nprocs=world,
        join=True,
    )
    got = torch.load(out, weights_only=True)
    ref = reference_fisher()
    assert set(got) == set(ref)
    for n, v in ref.items():
        torch.testing.assert_close(got[n], v, rtol=1e-4, atol=1e-12, msg=n)
    assert sum(float(v.sum()) for v in got.values()) > 0
