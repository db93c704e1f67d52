"""DeepSpeed plumbing of the SFT engine: the generated DeepSpeed config, the distributed set-up
inside a Ray Train worker, partition-wise loading of an HF model from sharded safetensors under
ZeRO-3 (a whole model below it) and tensor-by-tensor export back to sharded safetensors.

Nothing here ever holds the whole model on one rank: loading copies each rank's own flat slice of
each tensor straight from the memory-mapped checkpoint into its partition (no communication), and
export all-gathers one tensor at a time, rank 0 writing shards as they fill.

"""

from __future__ import annotations

import copy
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch

from cpi_ray.config.schema import TrainConfig
from cpi_ray.io.atomic import atomic_dir
from cpi_ray.io.safetensors_io import CheckpointReader, save_model_dir, save_sharded

# A worker sets DS_ACCELERATOR before DeepSpeed first loads and picks its accelerator; transformers'
# DeepSpeed integration loads DeepSpeed too.
# Imported where used: deepspeed, transformers, ray (in Ray Train workers only).

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------- config


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` merged over `base`, recursively for nested dicts; other values replace."""
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def build_ds_config(
    cfg: TrainConfig,
    world_size: int,
    use_gpu: bool = False,
    section: str = "consolidate",
    hidden_size: Optional[int] = None,
) -> dict[str, Any]:
    """The DeepSpeed config of one SFT job: our recipe, with the user's `<section>.deepspeed`
    dict deep-merged over it (offload, bucket sizes, ... win). With the model's `hidden_size`,
    ZeRO-3's bucket sizes and persistence threshold follow it the way transformers' Trainer fills
    its "auto" values; DeepSpeed's fixed defaults (5e8-element buckets) suit billions of
    parameters and cost a small model gigabytes of buffers."""
    micro = cfg.batch_size // cfg.grad_accum
    opt_params: dict[str, Any] = {
        "lr": cfg.lr,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": cfg.weight_decay,
    }
    if not use_gpu:
        # DeepSpeed's fused Adam needs CUDA; torch's AdamW is exact and portable on CPU.
        opt_params["torch_adam"] = True
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": micro * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.max_grad_norm or 0.0,
        "optimizer": {"type": "AdamW", "params": opt_params},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": {
            "stage": cfg.zero_stage,
            "overlap_comm": use_gpu,
            "contiguous_gradients": True,
            "stage3_gather_16bit_weights_on_model_save": False,
            **(
                {
                    "reduce_bucket_size": hidden_size * hidden_size,
                    "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                    "stage3_param_persistence_threshold": 10 * hidden_size,
                }
                if hidden_size and cfg.zero_stage == 3
                else {}
            ),
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    merged = deep_merge(generated, cfg.deepspeed)
    if cfg.deepspeed.get("fp16", {}).get("enabled") and not use_gpu:
        raise ValueError(
            f"{section}.deepspeed enables fp16, which DeepSpeed does not support on CPU;"
            " use precision: bf16 or fp32"
        )
    # The batch arithmetic must stay consistent whatever the user overrode.
    mb = merged["train_micro_batch_size_per_gpu"]
    ga = merged["gradient_accumulation_steps"]
    if "train_batch_size" not in cfg.deepspeed:
        merged["train_batch_size"] = mb * ga * world_size
    elif merged["train_batch_size"] != mb * ga * world_size:
        raise ValueError(
            f"{section}.deepspeed: train_batch_size {merged['train_batch_size']} != micro batch "
            f"{mb} x accumulation {ga} x workers {world_size}"
        )
    return merged


# ---------------------------------------------------------------------------- distributed


def set_accelerator_env(use_gpu: bool) -> None:
    """Must run before DeepSpeed is first imported in this process."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed's CPU accelerator counts its devices (ZeRO-3 asks on every gradient
        # reduce-scatter) by running `numactl --hardware` unless LOCAL_SIZE says it, as
        # DeepSpeed's own launcher sets it: the ranks on this node (Ray Train's local world).
        if "LOCAL_WORLD_SIZE" in os.environ:
            os.environ.setdefault("LOCAL_SIZE", os.environ["LOCAL_WORLD_SIZE"])


def worker_device(use_gpu: bool) -> torch.device:
    """This worker's device; on GPU also made current, so that zero.Init and DeepSpeed place
    partitions on the GPU Ray Train assigned."""
    if not use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    device = ray.train.torch.get_device()
    torch.cuda.set_device(device)
    return device


def init_distributed(use_gpu: bool) -> None:
    """Attach DeepSpeed's comm layer to the process group Ray Train (or a launcher) created;
    create one from the env:// variables when there is none."""
    set_accelerator_env(use_gpu)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", verbose=False)
    if not use_gpu:
        _unlink_shm_workspace()


# DeepSpeed's CPU comm (`shm.cpp`) gives each rank a shared-memory workspace of ~66 MiB when all
# ranks are on one node (LOCAL_SIZE == world size), named by uid, MASTER_ADDR, MASTER_PORT and
# rank, and never unlinks it: every CPU job would leave one per rank in /dev/shm, memory that
# outlives the job (gigabytes after a few dozen jobs, until Ray's memory monitor kills workers).
SHM_DIR = Path("/dev/shm")


def shm_workspace_name(rank: int) -> str:
    """The name DeepSpeed's CPU comm gives rank `rank`'s workspace in this job."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_shm_workspace() -> None:
    """Unlink this rank's workspace once every rank has mapped every workspace (DeepSpeed maps
    them all inside `init_distributed`; the barrier waits for the slowest rank): the mappings
    stay valid, and the memory goes when the last process using it exits, killed or not."""
    torch.distributed.barrier()
    # Absent when DeepSpeed made none (ranks on several nodes, or its shm op not built).
    (SHM_DIR / shm_workspace_name(torch.distributed.get_rank())).unlink(missing_ok=True)


# ---------------------------------------------------------------------------- parameters


def named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Distinct parameters in module order, each under its first name (a tied lm_head stays
    under the embedding's name, as `save_pretrained` writes it)."""
    return list(model.named_parameters(remove_duplicate=True))


def local_range(param) -> tuple[int, int, int]:
    """(start, stop, partition size) of this rank's flat slice of a ZeRO-3 parameter.

    DeepSpeed pads each parameter to a multiple of the partition world size; rank r owns
    elements [r·part, (r+1)·part) of the padded flat tensor, so `stop` is clipped to ds_numel
    and the partition's tail (stop - start .. part) is padding."""
    import deepspeed.comm as dist

    part = param.ds_tensor.ds_numel
    rank = dist.get_rank(group=param.ds_process_group)
    start = min(part * rank, param.ds_numel)
    stop = min(start + part, param.ds_numel)
    return start, stop, part


def checkpoint_name(name: str, reader: CheckpointReader) -> str:
    if name in reader:
        return name
    raise KeyError(f"{reader.path}: the model's parameter {name!r} is not in the checkpoint")


# ---------------------------------------------------------------------------- loading


def is_zero3(ds_config: Mapping[str, Any]) -> bool:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3


def load_engine_model(
    model_dir: str | os.PathLike,
    ds_config: Mapping[str, Any],
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
):
    """The job's model before `deepspeed.initialize`: partitioned under ZeRO-3
    (`load_zero3_model`), whole on every rank below it. Returns (model, hf_ds_config or None)."""
    if is_zero3(ds_config):
        return load_zero3_model(model_dir, ds_config, dtype, trust_remote_code)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    return model, None


def load_zero3_model(
    model_dir: str | os.PathLike,
    ds_config: Mapping[str, Any],
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
):
    """Build the HF causal LM of `model_dir` under `zero.Init` (each rank allocates only its
    partitions) and fill every partition from the sharded safetensors, each rank reading only its
    own slice of each tensor. Returns (model, hf_ds_config); keep the second alive while training
    so that transformers knows ZeRO-3 is on."""
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers import initialization as hf_init
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, prevent_arange_dtype_change
    from transformers.modeling_utils import set_zero3_state

    hf_ds = HfDeepSpeedConfig(dict(ds_config))
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with ExitStack() as stack:
        # Random init is skipped: every element is overwritten from the checkpoint below.
        stack.enter_context(hf_init.no_init_weights())
        stack.enter_context(prevent_arange_dtype_change())
        # dtype=None: the config's bf16 flag decides. An explicit dtype is ignored where the
        # accelerator has no fp16 (DeepSpeed 0.19's `dtype or fp16 if fp16_supported else bf16`
        # precedence), so on CPU fp32 runs were built, and trained, in bf16.
        stack.enter_context(deepspeed.zero.Init(config_dict_or_path=dict(ds_config), dtype=None))
        stack.enter_context(set_zero3_state())
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        # Under zero.Init the tied output embedding comes out as a parameter of its own: tie it
        # again so that it is the input embedding's parameter, as in the checkpoint.
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
    wrong = {str(p.dtype) for p in model.parameters() if p.dtype != dtype}
    if wrong:
        raise RuntimeError(f"{model_dir}: parameters built as {', '.join(sorted(wrong))}, not {dtype}")
    with CheckpointReader(model_dir) as reader:
        fill_partitions(model, reader)
        fill_buffers(model, reader)
    return model, hf_ds


@torch.no_grad()
def fill_partitions(model: torch.nn.Module, reader: CheckpointReader) -> None:
    for name, p in named_parameters(model):
        src = checkpoint_name(name, reader)
        info = reader.info(src)
        if tuple(info.shape) != tuple(p.ds_shape):
            raise ValueError(
                f"{reader.path}: {src!r} has shape {tuple(info.shape)}, the model expects {tuple(p.ds_shape)}"
            )
        start, stop, part = local_range(p)
        local = p.ds_tensor.data
        local[: stop - start].copy_(reader.read_flat(src, start, stop))
        local[stop - start :].zero_()


@torch.no_grad()
def fill_buffers(model: torch.nn.Module, reader: CheckpointReader) -> None:
    """Persistent buffers saved in the checkpoint (rare in causal LMs) are not partitioned."""
    for name, b in model.named_buffers():
        if name in reader:
            b.copy_(reader.read(name))


@torch.no_grad()
def load_fp32_master(params: list[tuple[str, torch.nn.Parameter]], reader: CheckpointReader) -> None:
    """Set the optimizer's fp32 master partitions to the checkpoint's values exactly.

    Needed in bf16 training: the master is otherwise created from the bf16 working copy, which
    would round every element (and break bitwise-frozen elements) before the first step."""
    from deepspeed.utils import safe_set_local_fp32_param

    for name, p in params:
        if not p.requires_grad:
            continue
        start, stop, part = local_range(p)
        value = torch.zeros(part, dtype=torch.float32)
        value[: stop - start] = reader.read_flat(checkpoint_name(name, reader), start, stop)
        safe_set_local_fp32_param(p, value)


# ---------------------------------------------------------------------------- export


def gathered_tensors(
    model: torch.nn.Module, dtypes: Optional[Mapping[str, torch.dtype]] = None, rank0_only: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full tensor) for every parameter, all-gathered one at a time from the fp32
    master partitions (the optimizer's exact values, not the bf16 working copy). Collective: every
    rank must exhaust it. With `rank0_only`, other ranks get empty placeholders."""
    import deepspeed.comm as dist
    from deepspeed.utils import safe_get_full_fp32_param

    rank = dist.get_rank()
    for name, p in named_parameters(model):
        full = safe_get_full_fp32_param(p)
        if full is None and hasattr(p, "ds_id"):
            # Not trainable: no master copy; gather the working copy instead.
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                full = p.data.detach().clone()
        elif full is None:  # below ZeRO-3 in fp32 the parameter is its own master
            full = p.data
        if rank0_only and rank != 0:
            yield name, torch.empty(0)
            continue
        dt = (dtypes or {}).get(name, full.dtype)
        yield name, full.detach().to("cpu", dtype=dt).reshape(getattr(p, "ds_shape", p.shape)).contiguous()


def gathered_partitions(
    params: list[tuple[str, torch.nn.Parameter]], local: Mapping[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full tensor) of per-parameter values each rank holds for its own partition
    (`local[name]`, the padded partition's length under ZeRO-3, the full tensor below it), one
    tensor at a time on rank 0. Collective: every rank must exhaust it."""
    import deepspeed.comm as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    for name, p in params:
        part = local[name].detach()
        if not hasattr(p, "ds_id"):
            yield name, part.to("cpu").reshape(p.shape).contiguous() if rank == 0 else torch.empty(0)
            continue
        pieces = [torch.empty_like(part) for _ in range(world)] if world > 1 else [part]
        if world > 1:
            dist.all_gather(pieces, part.contiguous())
        if rank == 0:
            full = torch.cat(pieces)[: p.ds_numel]
            yield name, full.to("cpu").reshape(p.ds_shape).contiguous()
        else:
            yield name, torch.empty(0)


def export_tensors(
    tensors: Iterator[tuple[str, torch.Tensor]], out_dir: str | os.PathLike, max_shard_size: int
) -> None:
    """Exhaust a collective tensor iterator on every rank; rank 0 writes the tensors atomically as
    sharded safetensors into `out_dir`."""
    import deepspeed.comm as dist

    if dist.get_rank() == 0:
        with atomic_dir(Path(out_dir)) as tmp:
            save_sharded(tensors, tmp, max_shard_size)
    else:
        for _ in tensors:
            pass
    dist.barrier()


def export_hf_model(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    src_dir: str | os.PathLike,
    max_shard_size: int,
    extra_files: Optional[Mapping[str, str | bytes]] = None,
) -> Optional[Path]:
    """Write the ZeRO-3 model as an HF model directory (atomically, on rank 0), each tensor in the
    dtype it has in `src_dir` (the model the stage started from), side files (config, tokenizer)
    copied from `src_dir`. Collective; returns the path on rank 0, None elsewhere."""
    import deepspeed.comm as dist

    with CheckpointReader(src_dir) as reader:
        dtypes = {n: reader.info(n).dtype for n in reader.names()}
    tensors = gathered_tensors(model, dtypes)
    out: Optional[Path] = None
    if dist.get_rank() == 0:
        out = save_model_dir(tensors, out_dir, max_shard_size, extra_files=extra_files, copy_from=src_dir)
    else:
        for _ in tensors:
            pass
    dist.barrier()
    return out


# ---------------------------------------------------------------------------- memory


def rank_state_bytes(params: list[tuple[str, torch.nn.Parameter]], optimizer) -> int:
    """Bytes this rank holds to train `params`: weights, the fp32 master where it is a copy of its
    own, gradients and AdamW's two moments; ZeRO-3 partitions (read back from DeepSpeed) or whole
    tensors (`optimizer`'s state, e.g. a plain torch AdamW)."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

    total = 0
    for _, p in params:
        if not hasattr(p, "ds_id"):
            total += 2 * p.numel() * p.element_size()  # weight and gradient
            state = getattr(optimizer, "state", {}).get(p, {})
            total += sum(
                v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.dim()
            )
            continue
        part = p.ds_tensor
        total += part.numel() * part.element_size() + part.numel() * 4  # partition, fp32 gradient
        master = safe_get_local_fp32_param(p)
        if master is not None and master.data_ptr() != part.data_ptr():
            total += master.numel() * master.element_size()
        for key in ("exp_avg", "exp_avg_sq"):
            st = safe_get_local_optimizer_state(p, key)
            total += 0 if st is None else st.numel() * st.element_size()
    return total
