"""Diagonal empirical Fisher of a task's loss at the probe's weights: the mean over N batches of
the squared gradient of the batch loss, in fp32 (the sensitivity scores of `regions.score`).

With several workers, each batch is the global batch split across ranks: every rank divides its
summed token loss by the *global* supervised-token count and the gradients are summed across
ranks, so the squared quantity is the global batch's gradient and the result does not depend on
the number of workers.
"""

from __future__ import annotations

from typing import Iterator

import torch

from cpi_ray.training.sft import token_loss_sum


def diagonal_fisher(
    model: torch.nn.Module,
    batches: Iterator[dict],
    n_batches: int,
    device: torch.device,
    names: list[str],
    world_size: int = 1,
) -> dict[str, torch.Tensor]:
    """{parameter name: mean squared gradient} for the named parameters (fp32, on CPU)."""
    import torch.distributed as dist

    params = dict(model.named_parameters())
    chosen = [(n, params[n]) for n in names]
    acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=device) for n, p in chosen}
    model.eval()  # no dropout: the gradient at exactly these weights
    for _ in range(n_batches):
        b = {k: v.to(device) for k, v in next(batches).items()}
        tokens = (b["labels"][:, 1:] != -100).sum().to(torch.float64)
        if world_size > 1:
            dist.all_reduce(tokens)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        (token_loss_sum(logits, b["labels"]) / tokens.clamp(min=1).float()).backward()
        for n, p in chosen:
            g = p.grad.float() if p.grad is not None else torch.zeros_like(acc[n])
            if world_size > 1:
                dist.all_reduce(g)
            acc[n].add_(g.square())
    model.zero_grad(set_to_none=True)
    return {n: (a / n_batches).cpu() for n, a in acc.items()}
