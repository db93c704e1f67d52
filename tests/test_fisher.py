"""The diagonal Fisher of the probe stage against independent computations."""

import pytest
import torch
import torch.multiprocessing as mp

from cpi_ray.data.batching import iterate_batches
from cpi_ray.training.fisher import diagonal_fisher


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


def test_fisher_matches_hf_loss_gradients():
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    ex = _examples()
    got = diagonal_fisher(model, iterate_batches(ex, 6, 0, seed=3), 3, torch.device("cpu"), names)
    # Independent: HF's own shifted mean token loss, autograd per batch, squared, averaged.
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    batches = iterate_batches(ex, 6, 0, seed=3)
    for _ in range(3):
        b = next(batches)
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        grads = torch.autograd.grad(loss, [p for _, p in model.named_parameters()])
        for (n, _), g in zip(model.named_parameters(), grads):
            ref[n] += g.square() / 3
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-12)
    assert sum(float(v.sum()) for v in got.values()) > 0


def _worker(rank, world, init_file, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    batches = iterate_batches(_examples(), 6 // world, 0, seed=3, rank=rank, world_size=world)
    f = diagonal_fisher(model, batches, 3, torch.device("cpu"), names, world)
    if rank == 0:
        torch.save(f, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2])
def test_two_workers_equal_one(tmp_path, world):
    single = diagonal_fisher(
        _model(),
        iterate_batches(_examples(), 6, 0, seed=3),
        3,
        torch.device("cpu"),
        [n for n, _ in _model().named_parameters()],
    )
    out = tmp_path / "f.pt"
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(out)), nprocs=world, join=True)
    multi = torch.load(out, weights_only=True)
    for n, v in single.items():
        torch.testing.assert_close(multi[n], v, rtol=1e-4, atol=1e-12)
