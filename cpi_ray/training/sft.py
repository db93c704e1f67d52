"""Pieces of the SFT engine's loop (`cpi_ray.training.engine`): the optimizer's parameter groups
and the LR schedule from our config, memory options, and one optimizer step over accumulated
micro-batches."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from transformers import get_scheduler

from cpi_ray.config.schema import TrainConfig
from cpi_ray.run import faults


def param_groups(params: Iterable[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW's parameter groups for every trainer: decay on matrices only (norms and biases are
    conventionally excluded). A ZeRO-3 partitioned parameter's shape is its `ds_shape`."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig):
    """The LR schedule of every SFT job (probes, consolidation stages, baselines), transformers'
    `get_scheduler`: linear warm-up from 0 over `int(warmup_ratio * steps)` optimizer steps, then
    cosine or linear decay to 0 at `steps`, or constant."""
    name = "constant_with_warmup" if tc.schedule == "constant" else tc.schedule
    return get_scheduler(
        name, optimizer, num_warmup_steps=int(tc.warmup_ratio * tc.steps), num_training_steps=tc.steps
    )


def apply_memory_options(model: torch.nn.Module, tc: TrainConfig) -> None:
    """Activation recomputation when `gradient_checkpointing` is on (non-reentrant, as PyTorch
    and transformers recommend; it works under ZeRO-3's gathered parameters). The model's config
    is left as it is: a probe saves it."""
    if not tc.gradient_checkpointing:
        return
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def should_report(step: int, total: int, reports: int = 10) -> bool:
    """Whether 1-based `step` reports its metrics: about `reports` times per run and at the end.

    Ray Train V2's `report` hands results over through a queue of one that the controller polls,
    so reporting every step would pace fast steps at the polling interval
    (`TRAIN_POLL_ENV`, shortened by `train_env`)."""
    return step % max(1, total // reports) == 0 or step == total


def accumulate_loss(
    model: torch.nn.Module,
    batches: Iterator[dict],
    tc: TrainConfig,
    device: torch.device,
    backward: Optional[Callable[[torch.Tensor], None]] = None,
) -> tuple[float, int]:
    """Forward/backward `grad_accum` micro-batches. Returns the mean loss per supervised token
    of the whole step (every rank's rows) and the input (non-padding) tokens this rank processed.

    Each micro-batch's summed token loss is divided by the supervised-token count of the whole
    accumulated batch over all ranks, times the number of ranks (DeepSpeed averages the ranks'
    gradients), so that a step's gradient is the global batch's token mean however its rows and
    tokens fall on micro-batches and ranks. `backward` replaces `loss.backward()` (DeepSpeed's
    engine backward and step, which keeps precision itself)."""
    micro = [next(batches) for _ in range(tc.grad_accum)]
    per_rank = per_rank_tokens(micro, device)
    total = 0.0
    for b in micro:
        b = {k: v.to(device) for k, v in b.items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = token_loss_sum(logits, b["labels"]) / per_rank
        (backward or torch.Tensor.backward)(loss)
        total += float(loss.detach())
    return sum_over_ranks(total, device) / _world(), sum(int(b["attention_mask"].sum()) for b in micro)


def per_rank_tokens(batches: list[dict], device: torch.device) -> float:
    """What a rank divides its summed token loss by so that the gradient DeepSpeed averages over
    the ranks is the token mean of the whole global batch: the supervised tokens of `batches`
    summed over all ranks (at least 1), over the number of ranks."""
    local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    return max(sum_over_ranks(float(local), device), 1.0) / _world()


def _world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def sum_over_ranks(n: float, device: torch.device) -> float:
    """`n` summed over the job's ranks (a collective when torch.distributed is up), of n's type."""
    if _world() == 1:
        return n
    t = torch.tensor([n], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return type(n)(t.item())


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy over supervised (label != -100) positions, in fp32."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")


def kill_once(fault: dict) -> None:
    """Fault injection for tests: SIGKILL this worker once, after `delay_s` (8 s by default),
    which gives the controller time to poll the reports (and register the checkpoint) already
    made, so that the test knows which checkpoint the restart must use."""
    faults.kill_once(fault["marker"], float(fault.get("delay_s", 8.0)))
