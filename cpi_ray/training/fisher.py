"""Diagonal empirical Fisher of a task's loss at an SFT job's final weights: the mean over N
batches of the squared gradient of the batch loss, in fp32 (the sensitivity scores of
`regions.score`), computed on the job's DeepSpeed engine so that ZeRO-3 keeps it sharded.

With several workers, each batch is the global batch split across ranks, normalised as a training
step is (`sft.per_rank_tokens`): the gradient is the global batch's token mean and the result does
not depend on the number of workers.
"""

from __future__ import annotations

from typing import Iterator

import torch

from cpi_ray.training.sft import per_rank_tokens, token_loss_sum

# Imported where used: deepspeed (only after the worker has set its accelerator).


def engine_fisher(
    engine,
    params: list[tuple[str, torch.nn.Parameter]],
    batches: Iterator[dict],
    n_batches: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """{parameter name: mean squared gradient} of this rank's part of each parameter: its flat
    (padded) partition under ZeRO-3, the whole tensor below it. No optimizer step is taken: the
    gradients are read at a forced accumulation boundary and cleared."""
    # DeepSpeed is imported where used (see the module's marker).
    from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

    def grad(p: torch.nn.Parameter) -> torch.Tensor:
        g = safe_get_local_grad(p) if hasattr(p, "ds_id") else safe_get_full_grad(p)
        if g is None:
            return torch.zeros(p.ds_tensor.numel() if hasattr(p, "ds_id") else p.numel(), device=device)
        return g.detach().float().reshape(-1)

    acc: dict[str, torch.Tensor] = {}
    engine.eval()  # no dropout: the gradient at exactly these weights
    engine.optimizer.zero_grad()
    for _ in range(n_batches):
        b = {k: v.to(device) for k, v in next(batches).items()}
        logits = engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = token_loss_sum(logits, b["labels"]) / per_rank_tokens([b], device)
        engine.set_gradient_accumulation_boundary(True)
        engine.backward(loss, scale_wrt_gas=False)
        for name, p in params:
            g = grad(p)
            if name in acc:
                acc[name].add_(g.square())
            else:
                acc[name] = g.square()
        engine.optimizer.zero_grad()
    engine.train()
    return {n: a.div_(n_batches) for n, a in acc.items()}
