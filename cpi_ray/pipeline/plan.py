"""`cpi-ray plan`: what each stage asks Ray for and how much memory one of its workers needs,
from the config and the model's shape alone, before anything runs.

The model's shape comes from its config.json (a local directory, the materialized tiny or demo
model, or a hub model already in the model cache), else from `model.architecture` (config.json
fields written into the pipeline config), else from `model.num_parameters`; the model is built on
PyTorch's meta device, so parameter counts are exact and nothing is downloaded or allocated.

Memory per worker, in bytes (P parameters, N workers of a trainer, w the weight dtype's size):

- probe, consolidate and the baselines (the SFT engine, DeepSpeed ZeRO): weights + gradients +
  optimizer states are 16 B per parameter (bf16: 2 + 2 + fp32 master, m, v 12; fp32: 4 + 4 +
  m, v 8); stage 1 divides the optimizer part by N, 2 also the gradients, 3 all of it, and under
  ZeRO-3 a rank additionally holds the unit being computed and the one prefetched, gathered in
  full (2 × the largest decoder layer or embedding, in the compute dtype), plus activations. An
  `offload_optimizer` in the job's `deepspeed` moves the optimizer part to host memory (a note).
- regions / fuse: streaming actors; a few chunk-sized buffers each, independent of model size.
- evaluate: the weights, a KV cache and the last logits per batch.

Disk per stage, in the run directory (w the saved dtype's size): what the stage keeps (models
P·w each, Fisher P·4, masks P/8) and what it holds on top while it runs: the DeepSpeed
checkpoints of a job with `checkpoint_every` (fp32 master, m and v, 12·P), two at a time while a
new one is persisted before the old one goes (each is first written to the worker's temporary
directory, a disk of its own node); a consolidation keeps every stage's model, and `final/`
(hard links to the last stage's files where the file system allows them, counted as a copy so
that a file system without links is not short of space). With
an unknown grouping, every task is counted as its own group (the most stages).

Activations are a rough upper estimate without recomputation: per token and layer about
10·hidden + 4·intermediate saved values (attention projections, norms, residuals, SwiGLU), plus the
logits (kept in the compute dtype, then fp32 for the loss and its gradient).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from cpi_ray.config.schema import EPI_MODES, PipelineConfig
from cpi_ray.config.stages import STAGE_FOLDERS
from cpi_ray.run.runtime import worker_resources

# Imported where used: torch, transformers, cpi_ray.models, cpi_ray.regions (slow; on the CLI start-up path).

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "fp32": 4, "bf16": 2}

# SmolLM2-135M-Instruct's config.json, so the demo can be planned before it is materialized.
DEMO_ARCHITECTURE: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}

# A decoder layer's working set on a GPU beyond the estimate: CUDA context, allocator slack,
# communication buffers. Reported separately, never hidden inside a total.
RUNTIME_OVERHEAD_NOTE = "plus about 1-3 GiB per process for the framework (CUDA context, allocator, buffers)"


class PlanError(ValueError):
    """The model's size cannot be known without downloading it."""


@dataclass(frozen=True)
class ModelFacts:
    name: str
    source: str  # where the numbers come from
    num_parameters: int
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    vocab_size: Optional[int] = None
    kv_dim: Optional[int] = None  # num_key_value_heads x head_dim
    largest_unit: Optional[int] = None  # parameters ZeRO-3 gathers at once, at most
    largest_unit_name: Optional[str] = None


@dataclass
class DiskUse:
    kept: list[tuple[str, int]] = field(default_factory=list)  # stays in the run directory
    transient: list[tuple[str, int]] = field(default_factory=list)  # on top, while it runs

    @property
    def kept_bytes(self) -> int:
        return sum(b for _, b in self.kept)

    @property
    def peak_bytes(self) -> int:
        return self.kept_bytes + sum(b for _, b in self.transient)


@dataclass
class StagePlan:
    name: str
    engine: str
    layout: str  # how many trainers / workers / actors, in words
    units: int  # workers or actors when the stage runs at full width
    resources: dict[str, float]  # Ray resources one worker/actor asks for
    memory: list[tuple[str, int]] = field(default_factory=list)  # per worker
    driver_memory: list[tuple[str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    disk: DiskUse = field(default_factory=DiskUse)

    @property
    def memory_per_worker(self) -> int:
        return sum(b for _, b in self.memory)


@dataclass
class Plan:
    config: str
    model: ModelFacts
    dtype: str
    stages: list[StagePlan]

    def total_resources(self) -> dict[str, dict[str, float]]:
        """Per stage: every resource times the number of workers running at once."""
        return {s.name: {k: v * s.units for k, v in s.resources.items()} for s in self.stages}

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "model": asdict(self.model),
            "dtype": self.dtype,
            "stages": [{**asdict(s), "memory_per_worker": s.memory_per_worker} for s in self.stages],
        }

    def render(self) -> str:
        m = self.model
        shape = []
        if m.num_layers:
            shape.append(f"{m.num_layers} layers")
        if m.hidden_size:
            shape.append(f"hidden {m.hidden_size}")
        if m.vocab_size:
            shape.append(f"vocab {m.vocab_size}")
        lines = [
            f"plan for {self.config}",
            f"model: {m.name}: {_count(m.num_parameters)} parameters"
            + (f" ({', '.join(shape)})" if shape else "")
            + f", {self.dtype}; from {m.source}",
        ]
        if m.largest_unit:
            lines.append(
                f"largest unit gathered by ZeRO-3: {m.largest_unit_name}, {_count(m.largest_unit)} parameters"
            )
        for s in self.stages:
            lines += ["", f"{s.name}: {s.engine}", f"  runs as      {s.layout}"]
            if s.units:
                lines.append(f"  each asks    {_resources(s.resources)}")
            if s.memory:
                lines.append(f"  memory/each  {format_gib(s.memory_per_worker)} (estimate)")
                for label, b in s.memory:
                    lines.append(f"    {format_gib(b):>10}  {label}")
            for label, b in s.driver_memory:
                lines.append(f"  driver       {format_gib(b)}  {label}")
            if s.disk.kept or s.disk.transient:
                kept, peak = format_gib(s.disk.kept_bytes), format_gib(s.disk.peak_bytes)
                lines.append(f"  disk         {kept} kept, {peak} at its peak (estimate)")
                for label, b in s.disk.kept:
                    lines.append(f"    {format_gib(b):>10}  {label}")
                for label, b in s.disk.transient:
                    lines.append(f"    {format_gib(b):>10}  while it runs: {label}")
            for n in s.notes:
                lines.append(f"  note: {n}")
        kept = sum(s.disk.kept_bytes for s in self.stages)
        peak = max((s.disk.peak_bytes - s.disk.kept_bytes for s in self.stages), default=0)
        lines += [
            "",
            f"disk: {format_gib(kept)} kept in the run directory by these stages, {format_gib(kept + peak)} "
            "at the peak (plus the model cache)",
            f"Memory figures exclude the runtime: {RUNTIME_OVERHEAD_NOTE}.",
        ]
        return "\n".join(lines)


# ------------------------------------------------------------------------------- model facts


def model_facts(cfg: PipelineConfig) -> ModelFacts:
    """The model's parameter count and shape, without downloading or allocating weights."""
    from cpi_ray.models.loading import DEMO_NAME, model_cache_dir

    m = cfg.model
    cache = model_cache_dir(cfg)
    if m.source == "tiny":
        from cpi_ray.models.tiny import build_tiny_tokenizer

        t = m.tiny
        arch = {
            "model_type": "llama",
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "max_position_embeddings": t.max_position_embeddings,
            "vocab_size": len(build_tiny_tokenizer()),
            "tie_word_embeddings": False,
        }
        return facts_from_architecture(arch, "tiny random Llama", "model.tiny")
    if m.source == "demo":
        path = cache / DEMO_NAME
        if (path / "config.json").is_file():
            return facts_from_config_dir(path, DEMO_NAME, cfg.model.trust_remote_code)
        return facts_from_architecture(DEMO_ARCHITECTURE, DEMO_NAME, "its known config.json")
    local = Path(m.source).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise PlanError(f"model.source {m.source!r} has no config.json")
        return facts_from_config_dir(local, m.source, cfg.model.trust_remote_code)
    cached = cache / m.source.replace("/", "--")
    if (cached / "config.json").is_file():
        return facts_from_config_dir(cached, m.source, cfg.model.trust_remote_code)
    if m.architecture:
        return facts_from_architecture(m.architecture, m.source, "model.architecture")
    if m.num_parameters:
        return ModelFacts(name=m.source, source="model.num_parameters", num_parameters=m.num_parameters)
    raise PlanError(
        f"model.source {m.source!r} is neither a local directory nor in the model cache "
        f"({cached}); to plan without downloading it, give its config.json fields as "
        "model.architecture (or at least model.num_parameters)"
    )


def facts_from_config_dir(path: Path, name: str, trust_remote_code: bool = False) -> ModelFacts:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return _facts(config, name, f"{path / 'config.json'}", trust_remote_code)


def facts_from_architecture(arch: dict[str, Any], name: str, source: str) -> ModelFacts:
    from transformers import AutoConfig

    arch = dict(arch)
    model_type = arch.pop("model_type", None)
    if not model_type:
        raise PlanError(f"{source} needs model_type (e.g. llama), as in the model's config.json")
    return _facts(AutoConfig.for_model(model_type, **arch), name, source)


def _facts(config, name: str, source: str, trust_remote_code: bool = False) -> ModelFacts:
    import torch
    from transformers import AutoModelForCausalLM

    # On the meta device: exact shapes, no memory, no initialization cost worth mentioning.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already skips tied aliases; ids make it certain
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    layers = _decoder_layers(model)
    units: list[tuple[int, str]] = []
    if layers is not None and len(layers):
        units.append((sum(p.numel() for p in layers[0].parameters()), "one decoder layer"))
    # Modules outside the layer stack are gathered whole too (embeddings, lm_head).
    layer_ids = {id(p) for p in layers.parameters()} if layers is not None else set()
    for mod_name, mod in model.named_modules():
        own = [p for p in mod.parameters(recurse=False) if id(p) not in layer_ids]
        if own:
            units.append((sum(p.numel() for p in own), mod_name))
    largest, largest_name = max(units) if units else (None, None)
    text = getattr(config, "get_text_config", lambda: config)()
    heads = getattr(text, "num_attention_heads", None)
    hidden = getattr(text, "hidden_size", None)
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if hidden and heads else None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return ModelFacts(
        name=name,
        source=source,
        num_parameters=total,
        num_layers=getattr(text, "num_hidden_layers", None),
        hidden_size=hidden,
        intermediate_size=getattr(text, "intermediate_size", None),
        vocab_size=getattr(text, "vocab_size", None),
        kv_dim=kv_heads * head_dim if kv_heads and head_dim else None,
        largest_unit=largest,
        largest_unit_name=largest_name,
    )


def _decoder_layers(model):
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        return None
    return max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters()))


# ------------------------------------------------------------------------------ arithmetic


def train_state_bytes(params: int, precision: str, zero_stage: int, world: int) -> dict[str, float]:
    """DeepSpeed's per-rank bytes for weights, gradients and optimizer states (AdamW), by ZeRO
    stage: 1 partitions the optimizer states, 2 also the gradients, 3 also the weights."""
    if precision == "bf16":
        w, g, o = 2, 2, 12  # bf16 weights and grads; fp32 master weights, m and v
    else:
        w, g, o = 4, 4, 8  # fp32 weights and grads; m and v
    if zero_stage >= 1:
        o = o / world
    if zero_stage >= 2:
        g = g / world
    if zero_stage >= 3:
        w = w / world
    return {"weights": params * w, "gradients": params * g, "optimizer": params * o}


def activation_bytes(
    facts: ModelFacts, micro_batch: int, seq_len: int, compute_bytes: int, recompute: bool = False
) -> Optional[int]:
    """Saved activations of one micro-batch (rough); None without the shape. With `recompute`
    (gradient checkpointing) only each layer's input is kept, plus one layer's full set while
    its backward recomputes it."""
    if not (facts.num_layers and facts.hidden_size and facts.vocab_size):
        return None
    inter = facts.intermediate_size or 4 * facts.hidden_size
    tokens = micro_batch * seq_len
    per_layer = tokens * (10 * facts.hidden_size + 4 * inter) * compute_bytes
    logits = tokens * facts.vocab_size * (compute_bytes + 8)  # compute dtype, fp32 copy, its grad
    if recompute:
        return facts.num_layers * tokens * facts.hidden_size * compute_bytes + per_layer + logits
    return facts.num_layers * per_layer + logits


# ------------------------------------------------------------------------------ the plan


def build_plan(cfg: PipelineConfig, config_name: str = "config", facts: Optional[ModelFacts] = None) -> Plan:
    facts = facts or model_facts(cfg)
    builders = {
        "probe": _probe,
        "regions": _regions,
        "groups": _groups,
        "fuse": _fuse,
        "consolidate": _consolidate,
        "baselines": _baselines,
        "evaluate": _evaluate,
    }
    stages = [builders.get(s, _unsized)(cfg, facts, s) for s in cfg.stages]
    for sp in stages:
        sp.disk = stage_disk(cfg, facts, sp.name)
    return Plan(config=config_name, model=facts, dtype=cfg.model.dtype, stages=stages)


# ------------------------------------------------------------------------------ disk


def stage_disk(cfg: PipelineConfig, f: ModelFacts, name: str) -> DiskUse:
    """What stage `name` writes into the run directory (see the module's docstring)."""
    from cpi_ray.regions.scores import needs_fisher

    P, n = f.num_parameters, len(cfg.tasks)
    model = P * DTYPE_BYTES[cfg.model.dtype]
    mask = math.ceil(P / 8)
    zero3_ckpt = 12 * P

    def checkpoints(tc, trainers: int) -> list[tuple[str, int]]:
        # DeepSpeed checkpoints (fp32 master weights, m and v) while a job runs, when it makes
        # them: the last and the one being persisted.
        if not (tc.checkpoint_every and tc.checkpoint_every < tc.steps):
            return []
        return [
            (
                f"DeepSpeed checkpoints of {trainers} trainer(s) (2 x {format_gib(zero3_ckpt)} each)",
                2 * trainers * zero3_ckpt,
            )
        ]

    stage_ckpts = checkpoints(cfg.consolidate, 1)
    if name == "probe":
        kept = [(f"{n} probe model(s)", n * model)]
        if needs_fisher(cfg.regions.score):
            kept.append((f"{n} Fisher score(s) (fp32)", n * P * 4))
        return DiskUse(kept, checkpoints(cfg.probe, n))
    if name == "regions":
        return DiskUse([(f"{n} bit-packed core mask(s) (P/8 bytes)", n * mask)])
    if name == "fuse":
        return DiskUse([("the fused model", model)])
    if name == "consolidate":
        given = cfg.groups.given if cfg.groups.order == "given" and cfg.groups.given else None
        k = len(given) if given else n
        return DiskUse(
            [(f"{k} stage model(s) + their frozen masks, and final/", k * (model + mask) + model)],
            [("the frozen-set mask being built", mask), *stage_ckpts],
        )
    if name == "baselines":
        modes = list(cfg.baselines.modes)
        stages = [cfg.baselines.multistage_num_groups if m == "multistage" else 1 for m in modes]
        if not modes:
            return DiskUse()
        return DiskUse(
            [(f"{len(modes)} baseline model(s)", len(modes) * model)],
            [(f"a mode's stage models until it is copied out (up to {max(stages)})", max(stages) * model)]
            + stage_ckpts,
        )
    return DiskUse()


def bytes_under(path: Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class DiskSpaceError(RuntimeError):
    """The run directory's file system cannot hold what the next stages write."""


def check_free_space(
    plan: Plan, run_dir: Path, stages: list[str], free: Optional[int] = None
) -> tuple[int, int]:
    """Stop, naming what is needed against what is free and where, when the file system of
    `run_dir` cannot take the outputs `stages` still have to write (their kept bytes less what
    their folders already hold) plus the largest peak among them. Returns (needed, free) bytes."""
    by_name = {s.name: s for s in plan.stages}
    todo = [by_name[s] for s in stages if s in by_name]
    missing = {s.name: max(0, s.disk.kept_bytes - bytes_under(run_dir / STAGE_FOLDERS[s.name])) for s in todo}
    peak = max((s.disk.peak_bytes - s.disk.kept_bytes for s in todo), default=0)
    needed = sum(missing.values()) + peak
    probe = run_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free if free is None else free
    if needed > free:
        parts = ", ".join(f"{name} {format_gib(b)}" for name, b in missing.items() if b) or "no new outputs"
        if peak:
            parts += f", and {format_gib(peak)} while the largest runs"
        raise DiskSpaceError(
            f"disk: {', '.join(missing)} need about {format_gib(needed)} in {run_dir} ({parts}); "
            f"{format_gib(free)} free there. Free space, point storage.path elsewhere, or set "
            "storage.check_free_space false"
        )
    return needed, free


def _activations_label(tc, micro: int, seq_len: int) -> str:
    how = "recomputed per layer" if tc.gradient_checkpointing else "rough"
    return f"activations (micro-batch {micro} x {seq_len} tokens, {how})"


def _unsized(cfg: PipelineConfig, f: ModelFacts, name: str) -> StagePlan:
    return StagePlan(name=name, engine="(not sized by cpi-ray plan)", layout="?", units=0, resources={})


def _engine_memory(cfg: PipelineConfig, f: ModelFacts, tc) -> tuple[list[tuple[str, int]], list[str], int]:
    """Per-rank memory of one SFT job on the engine (DeepSpeed, the job's ZeRO stage over its
    workers): weights, gradients and AdamW states, the gathered units under ZeRO-3, activations.
    Returns (memory lines, notes, ZeRO stage)."""
    N = tc.num_workers
    stage = int(tc.deepspeed.get("zero_optimization", {}).get("stage", tc.zero_stage))
    states = train_state_bytes(f.num_parameters, tc.precision, stage, N)
    zo = tc.deepspeed.get("zero_optimization", {})
    offload = stage >= 1 and zo.get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
    notes = [f"ZeRO-{stage} over {N} rank(s), {tc.precision}"]
    if offload:
        # The optimizer part (fp32 master, m, v: partitioned like the rest) leaves the GPU.
        host = states.pop("optimizer")
        device = zo["offload_optimizer"]["device"]
        notes.append(
            f"offload_optimizer {device}: {format_gib(host)} of optimizer states per rank in "
            f"{'host memory' if device == 'cpu' else 'NVMe'} ({format_gib(host * N)} per {N}-rank job)"
        )
    per = sum(train_state_bytes(1, tc.precision, 0, 1).values()) - (
        train_state_bytes(1, tc.precision, 0, 1)["optimizer"] if offload else 0
    )
    what = "weights + gradients" + ("" if offload else " + AdamW states")
    head = f"{per / N:g} B/param = {per} / {N} ranks" if stage >= 3 else f"ZeRO-{stage}"
    mem = [(f"{what} ({head})", int(sum(states.values())))]
    compute = 2 if tc.precision == "bf16" else 4
    if stage >= 3:
        if f.largest_unit:
            mem.append(
                (
                    f"gathered: current + prefetched unit (2 x {f.largest_unit_name}, {compute} B/param)",
                    2 * f.largest_unit * compute,
                )
            )
        else:
            notes.append("gathered layer unknown: give model.architecture for it")
    micro = tc.batch_size // tc.grad_accum
    act = activation_bytes(f, micro, cfg.data.max_seq_len, compute, tc.gradient_checkpointing)
    if act is not None:
        mem.append((_activations_label(tc, micro, cfg.data.max_seq_len), act))
    else:
        notes.append("activations unknown: give model.architecture for them")
    if N > 1 and tc.use_gpu:
        notes.append(f"{N} GPU workers: one {N}-GPU node (or {N} GPUs across nodes over the network)")
    return mem, notes, stage


def _probe(cfg: PipelineConfig, f: ModelFacts, name: str = "") -> StagePlan:
    tc = cfg.probe
    n_tasks = len(cfg.tasks)
    mem, notes, stage = _engine_memory(cfg, f, tc)
    plan = StagePlan(
        name="probe",
        engine=f"Ray Train + DeepSpeed ZeRO-{stage}, one trainer per task (full fine-tuning)",
        layout=f"{n_tasks} trainer(s) at once x {tc.num_workers} worker(s)",
        units=n_tasks * tc.num_workers,
        resources=worker_resources(cfg, "probe"),
        memory=mem,
        notes=notes,
    )
    if tc.use_gpu and plan.memory_per_worker > 80 * GIB:
        notes.append(
            "more than an 80 GiB GPU holds: more probe.num_workers (ZeRO-3 shards the states), "
            "precision bf16, probe.gradient_checkpointing or a smaller micro-batch (probe.grad_accum)"
        )
    return plan


def _consolidate(cfg: PipelineConfig, f: ModelFacts, name: str = "") -> StagePlan:
    tc = cfg.consolidate
    mem, notes, _ = _engine_memory(cfg, f, tc)
    return StagePlan(
        name="consolidate",
        engine="Ray Train + DeepSpeed ZeRO, one trainer per group in turn",
        layout=f"1 trainer at a time x {tc.num_workers} worker(s)",
        units=tc.num_workers,
        resources=worker_resources(cfg, "consolidate"),
        memory=mem,
        notes=notes,
    )


def _baselines(cfg: PipelineConfig, f: ModelFacts, name: str = "") -> StagePlan:
    # The baselines train on the consolidation engine with its settings.
    modes = list(getattr(getattr(cfg, "baselines", None), "modes", []) or [])
    cons = _consolidate(cfg, f)
    if not modes:
        return StagePlan(
            name="baselines",
            engine=cons.engine,
            layout="no modes configured: nothing runs",
            units=0,
            resources={},
        )
    memory, notes = list(cons.memory), ["same engine, workers and memory as consolidate"]
    if set(EPI_MODES) & set(modes):
        # EPI's statistics live in each rank's ZeRO-3 partition: they shrink with the ranks.
        n, e = cfg.consolidate.num_workers, cfg.epi
        memory.append(
            (
                f"epi: moving average + mask ({e.STATE_BYTES} B/param / {n} ranks)",
                int(e.STATE_BYTES * f.num_parameters / n),
            )
        )
        memory.append(
            (
                f"epi: frozen set ({e.ratio:g}% of elements, {e.FROZEN_BYTES} B each / {n} ranks)",
                int(e.FROZEN_BYTES * e.ratio / 100 * f.num_parameters / n),
            )
        )
        notes = ["same engine and workers as consolidate; epi adds its statistics"]
    return StagePlan(
        name="baselines",
        engine=cons.engine,
        layout=f"{len(modes)} mode(s) ({', '.join(modes)}), one trainer at a time x "
        f"{cfg.consolidate.num_workers} worker(s)",
        units=cons.units,
        resources=cons.resources,
        memory=memory,
        notes=notes,
    )


def _regions(cfg: PipelineConfig, f: ModelFacts, name: str = "") -> StagePlan:
    rc = cfg.regions
    n_tasks = len(cfg.tasks)
    # An actor reads its chunk in blocks of 4M elements (base, probe, score, key arrays live at
    # once), so its memory is set by the block, not by the chunk or the model.
    block = 4 * 2**22 * 4
    return StagePlan(
        name="regions",
        engine="Ray Data over (shard, tensor, chunk) items, actor pool",
        layout=f"{rc.num_actors} actor(s), work items of regions.chunk_mib={rc.chunk_mib} MiB",
        units=rc.num_actors,
        resources=worker_resources(cfg, "regions"),
        memory=[("streaming blocks (base, probe, score, keys: 4 x 16 MiB)", block)],
        driver_memory=[
            (f"bit-packed masks ({n_tasks} task(s) x P/8 bytes)", n_tasks * math.ceil(f.num_parameters / 8))
        ],
        notes=["memory per actor does not grow with the model; more actors, more read bandwidth"],
    )


def _groups(cfg: PipelineConfig, f: ModelFacts, name: str = "") -> StagePlan:
    n = len(cfg.tasks)
    return StagePlan(
        name="groups",
        engine="driver: Jaccard overlap of the masks, components",
        layout="on the driver, no Ray resources",
        units=0,
        resources={},
        driver_memory=[("two packed masks at a time (2 x P/8 bytes)", 2 * math.ceil(f.num_parameters / 8))],
        notes=[f"{n * (n - 1) // 2} pair(s) of tasks"],
    )


def _fuse(cfg: PipelineConfig, f: ModelFacts, name: str = "") -> StagePlan:
    fc = cfg.fuse
    chunk = fc.chunk_mib * 2**20
    return StagePlan(
        name="fuse",
        engine="pool of Ray actors, one output shard at a time each",
        layout=f"{fc.num_actors} actor(s) (at most one per output shard)",
        units=fc.num_actors,
        resources=worker_resources(cfg, "fuse"),
        memory=[("chunk buffers for base, every task model and masks (fuse.chunk_mib budget)", chunk)],
        notes=["numpy-only actors: memory does not grow with the model or the shard size"],
    )


def _evaluate(cfg: PipelineConfig, f: ModelFacts, name: str = "") -> StagePlan:
    ec = cfg.evaluate
    w = DTYPE_BYTES[cfg.model.dtype]
    mem = [(f"weights ({cfg.model.dtype})", f.num_parameters * w)]
    if f.num_layers and f.kv_dim and f.vocab_size:
        seq = cfg.data.max_seq_len + ec.max_new_tokens
        mem.append(
            (
                f"KV cache (batch {ec.batch_size} x {seq} tokens)",
                2 * f.num_layers * ec.batch_size * seq * f.kv_dim * w,
            )
        )
        mem.append(
            ("logits of the prompt pass (rough)", ec.batch_size * cfg.data.max_seq_len * f.vocab_size * 4)
        )
    models = []
    for kind in ec.models:
        if kind == "probes":
            models += [f"probe:{t.name}" for t in cfg.tasks]
        elif kind == "baselines":
            models += list(getattr(getattr(cfg, "baselines", None), "modes", []) or [])
        else:
            models.append(kind)
    return StagePlan(
        name="evaluate",
        engine="Ray tasks, one per model scored",
        layout=f"{len(models)} model(s), {min(ec.num_workers, len(models))} at a time",
        units=min(ec.num_workers, len(models)),
        resources=worker_resources(cfg, "evaluate"),
        memory=mem,
    )


# ------------------------------------------------------------------------------ formatting


def format_gib(b: float) -> str:
    if b >= GIB / 10:
        return f"{b / GIB:.2f} GiB"
    return f"{b / 2**20:.1f} MiB"


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def _resources(res: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in res.items())


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=2)
