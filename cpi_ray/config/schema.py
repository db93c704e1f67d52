"""Pydantic v2 models for the whole pipeline.

Every knob a stage reads lives here, with its allowed range, so that a bad value fails at load
time with a message naming the field, before any work starts.
"""

from __future__ import annotations

import importlib.util
import re
import string
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cpi_ray.config.stages import MODEL_KINDS, STAGES
from cpi_ray.io.sizes import parse_size

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def template_fields(template: str) -> list[str]:
    """The field names of a prompt template (`{instruction}`, `{meta.context}`); ValueError for a
    template without fields or with positional, converted or formatted ones."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"prompt_template {template!r}: {e}") from None
    names = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not name or name.isdigit() or spec or conversion or "[" in name:
            raise ValueError(
                f"prompt_template {template!r}: placeholders must be field names "
                f"like {{instruction}}, got {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}}"
            )
        names.append(name)
    if not names:
        raise ValueError(f"prompt_template {template!r} names no field")
    return names


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Ray's built-in resources have their own fields (cpus_per_worker, use_gpu, ...).
_BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}


def _custom_resources_field() -> Any:
    return Field(
        default_factory=dict,
        description=(
            "extra Ray resources each worker/actor of this stage asks for, e.g. {probe_gpu: 1}, so "
            "that the autoscaler starts the node type that offers them (see cluster/)"
        ),
    )


def _check_custom_resources(v: dict[str, float]) -> dict[str, float]:
    for name, amount in v.items():
        if name in _BUILTIN_RESOURCES:
            raise ValueError(
                f"custom_resources: {name!r} is a built-in resource; use the stage's "
                "own field (cpus_per_worker, use_gpu, ...)"
            )
        if not amount >= 0:
            raise ValueError(f"custom_resources: {name!r} must be >= 0")
    return v


CustomResources = Annotated[dict[str, float], AfterValidator(_check_custom_resources)]


class TinyModelConfig(_Section):
    """A random Llama small enough for tests and the smoke run."""

    hidden_size: int = Field(64, ge=8, le=4096)
    intermediate_size: int = Field(128, ge=8, le=16384)
    num_hidden_layers: int = Field(2, ge=1, le=64)
    num_attention_heads: int = Field(4, ge=1, le=64)
    num_key_value_heads: int = Field(2, ge=1, le=64)
    max_position_embeddings: int = Field(512, ge=16, le=32768)
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


class ModelConfig(_Section):
    """The base model: `demo` (SmolLM2-135M-Instruct from its wheel), `tiny` (random Llama), a
    local HF directory with safetensors, or a hub id (real clusters only)."""

    source: str = "demo"
    tiny: TinyModelConfig = TinyModelConfig()
    dtype: Literal["float32", "bfloat16"] = "float32"
    trust_remote_code: bool = False
    max_shard_size: str = Field("2GB", description="shard size of every model the pipeline writes")
    cache_dir: Optional[str] = Field(None, description="where demo/tiny/hub models are materialized")
    # Sizing hints for `cpi-ray plan` when the model's config.json is not on this machine (a hub
    # id not yet downloaded); the pipeline itself never reads them.
    architecture: Optional[dict[str, Any]] = Field(
        None,
        description="config.json fields of the model (model_type, hidden_size, "
        "num_hidden_layers, vocab_size, ...), for `cpi-ray plan` without downloading",
    )
    num_parameters: Optional[int] = Field(
        None,
        ge=1,
        description="parameter count, for `cpi-ray plan` when neither config.json nor "
        "model.architecture is available",
    )

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v)
        return v


class ReasoningGymSource(_Section):
    name: str = Field(..., description="reasoning-gym dataset name, e.g. spell_backward")
    size: int = Field(500, ge=2, le=1_000_000)
    seed: int = 0
    options: dict[str, Any] = Field(default_factory=dict)


TaskFormat = Literal["prompt_answer", "messages", "prompt_completion"]

# Default prompt/answer fields per format (`messages` reads `messages_field` instead).
_FORMAT_FIELDS: dict[str, tuple[Optional[str], Optional[str]]] = {
    "prompt_answer": ("question", "answer"),
    "prompt_completion": ("prompt", "completion"),
    "messages": (None, None),
}

# Fields added after run directories existed: left out of a task's fingerprint while at their
# default, so that runs written before them still resume.
_TASK_FIELDS_ADDED: dict[str, Any] = {
    "format": "prompt_answer",
    "messages_field": "messages",
    "prompt_template": None,
    "hub_name": None,
    "hub_revision": None,
    "hub_data_files": None,
}

BUILTIN_SCORERS = ("exact_match", "reasoning_gym", "numeric")


class TaskConfig(_Section):
    name: str
    # Exactly one source: a local jsonl/parquet file, a hub dataset id, or a reasoning-gym generator.
    path: Optional[str] = None
    hub_id: Optional[str] = None
    hub_name: Optional[str] = Field(None, description="the hub dataset's configuration, e.g. main")
    hub_revision: Optional[str] = Field(None, description="branch, tag or commit of the hub dataset")
    hub_split: str = "train"
    hub_data_files: Optional[str | list[str] | dict[str, str | list[str]]] = Field(
        None, description="data_files of datasets.load_dataset (file patterns in the hub repo)"
    )
    reasoning_gym: Optional[ReasoningGymSource] = None
    format: TaskFormat = Field(
        "prompt_answer",
        description=(
            "prompt_answer: a prompt field (or prompt_template) and an answer field; messages: "
            "chat turns (role/content) in messages_field, every assistant turn learned, the last "
            "one scored; prompt_completion: prompt and completion, each text or chat turns"
        ),
    )
    prompt_field: Optional[str] = Field(
        None, description="default: question (prompt_answer), prompt (prompt_completion)"
    )
    answer_field: Optional[str] = Field(
        None, description="default: answer (prompt_answer), completion (prompt_completion)"
    )
    messages_field: str = "messages"
    prompt_template: Optional[str] = Field(
        None,
        description="prompt_answer: the prompt built from several fields, e.g. "
        "'{instruction}\\n\\n{input}'; an empty field is dropped with the text before it",
    )
    scorer: str = Field(
        "exact_match", description="exact_match, numeric, reasoning_gym, or module:function(prediction, row)"
    )
    system_prompt: Optional[str] = None
    eval_size: int = Field(40, ge=1, description="rows held out for evaluation")
    val_size: int = Field(0, ge=0, description="rows held out for validation (tuning)")
    train_size: Optional[int] = Field(None, ge=1, description="cap on training rows")
    weight: float = Field(1.0, gt=0, description="share of this task in mixed training")
    max_new_tokens: Optional[int] = Field(
        None, ge=1, le=8192, description="generation budget at evaluation; None = evaluate.max_new_tokens"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(
                "task name must be 1-64 characters of letters, digits, '_', '.', '-' "
                "and start with a letter or digit"
            )
        return v

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: Optional[str]) -> Optional[str]:
        # Resolved on the driver: Ray workers do not share its working directory.
        return None if v is None else str(Path(v).expanduser().resolve())

    @field_validator("scorer")
    @classmethod
    def _scorer(cls, v: str) -> str:
        if v not in BUILTIN_SCORERS and not re.match(r"^[\w.]+:\w+$", v):
            raise ValueError("scorer must be exact_match, numeric, reasoning_gym or module:function")
        return v

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            template_fields(v)
        return v

    @model_validator(mode="before")
    @classmethod
    def _format_defaults(cls, data: Any) -> Any:
        # Filled before validation: the defaults depend on the format.
        if isinstance(data, dict):
            prompt, answer = _FORMAT_FIELDS.get(data.get("format", "prompt_answer"), (None, None))
            data = dict(data)
            if data.get("prompt_field") is None and prompt and not data.get("prompt_template"):
                data["prompt_field"] = prompt
            if data.get("answer_field") is None and answer:
                data["answer_field"] = answer
        return data

    def fingerprint_dump(self) -> dict[str, Any]:
        """`model_dump` without the later-added fields that are at their defaults."""
        d = self.model_dump(mode="json")
        for k, default in _TASK_FIELDS_ADDED.items():
            if d.get(k) == default:
                d.pop(k, None)
        return d

    @model_validator(mode="after")
    def _one_source(self) -> "TaskConfig":
        given = [s for s in ("path", "hub_id", "reasoning_gym") if getattr(self, s) is not None]
        if len(given) != 1:
            raise ValueError(
                f"task {self.name!r} needs exactly one source among path, hub_id, reasoning_gym"
                f" (got {given or 'none'})"
            )
        if self.path is not None:
            p = Path(self.path)
            if p.suffix not in (".jsonl", ".json", ".parquet"):
                raise ValueError(f"task file {self.path!r} must be .jsonl, .json or .parquet")
            if not p.is_file():
                raise ValueError(f"task file {self.path!r} does not exist")
        if self.scorer == "reasoning_gym" and self.reasoning_gym is None:
            raise ValueError("scorer reasoning_gym needs a reasoning_gym source")
        if self.hub_id is None:
            extra = [
                f for f in ("hub_name", "hub_revision", "hub_data_files") if getattr(self, f) is not None
            ]
            if extra:
                raise ValueError(f"task {self.name!r}: {', '.join(extra)} need a hub_id")
        if self.format == "messages":
            given = [
                f for f in ("prompt_field", "answer_field", "prompt_template") if getattr(self, f) is not None
            ]
            if given:
                raise ValueError(
                    f"task {self.name!r}: format messages reads messages_field, not {', '.join(given)}"
                )
        elif self.prompt_template is not None and self.format != "prompt_answer":
            raise ValueError(f"task {self.name!r}: prompt_template needs format prompt_answer")
        elif self.prompt_template is not None and self.prompt_field is not None:
            raise ValueError(f"task {self.name!r}: give prompt_field or prompt_template, not both")
        return self


class DataConfig(_Section):
    max_seq_len: int = Field(256, ge=16, le=131072)
    split_seed: int = 0
    packing: bool = Field(False, description="pack several rows per sequence (else pad by length)")
    require_chat_template: bool = Field(
        False,
        description="stop when the tokenizer has no chat template (else prompts are "
        "formatted as plain text, with a warning: right for base models)",
    )


class TrainConfig(_Section):
    """One SFT recipe; the probe and every consolidation stage use one each."""

    steps: int = Field(40, ge=1)
    batch_size: int = Field(
        8, ge=1, description="rows per optimizer step per worker, before accumulation split"
    )
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-5, gt=0, le=1.0)
    warmup_ratio: float = Field(
        0.1, ge=0, lt=1, description="linear warm-up from 0 over int(warmup_ratio * steps) optimizer steps"
    )
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="after warm-up (transformers' get_scheduler, the same for every trainer)"
    )
    weight_decay: float = Field(0.0, ge=0, le=1)
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    num_workers: int = Field(1, ge=1, description="Ray Train workers per trainer")
    cpus_per_worker: float = Field(1, gt=0)
    use_gpu: bool = False
    custom_resources: CustomResources = _custom_resources_field()
    max_failures: int = Field(
        2, ge=0, description="worker-group restarts from the latest checkpoint after a failure (Ray Train)"
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute each decoder layer's activations in the backward pass: saved "
        "activations drop to about one layer's plus each layer's input, for about a third more compute",
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(
        3,
        description="DeepSpeed ZeRO stage of the job: 3 shards parameters, gradients and optimizer "
        "states over its workers (element freezing needs it); 0 is plain data parallelism, for "
        "a small model on one worker",
    )
    deepspeed: dict[str, Any] = Field(
        default_factory=dict,
        description="merged over the generated DeepSpeed config (offload, bucket sizes, ...)",
    )
    checkpoint_every: int = Field(
        0,
        ge=0,
        description="optimizer steps between resumable checkpoints inside a job; 0 = none (a "
        "finished job's output is its checkpoint)",
    )

    # Where and how a job runs, not what it computes: changing them keeps a finished job.
    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {
            "cpus_per_worker",
            "custom_resources",
            "gradient_checkpointing",
            "max_failures",
            "zero_stage",
            "checkpoint_every",
        }
    )

    def recipe_dump(self, exclude: frozenset[str] = frozenset()) -> dict:
        """The fields that decide the trained weights (what fingerprints hash)."""
        return self.model_dump(exclude=set(self.EXECUTION_FIELDS | exclude))

    @model_validator(mode="after")
    def _accum(self) -> "TrainConfig":
        if self.batch_size % self.grad_accum:
            raise ValueError("batch_size must be a multiple of grad_accum")
        return self


class ProbeConfig(TrainConfig):
    fisher_batches: int = Field(8, ge=1, description="batches for the Fisher score (regions.score)")


class RegionsConfig(_Section):
    p: float = Field(1.0, gt=0, le=100, description="core ratio in percent: 0 < p <= 100")
    score: Literal["delta", "fisher", "delta_fisher"] = "delta"
    granularity: Literal["element", "row"] = "element"
    include: list[str] = Field(default_factory=list, description="regexes on tensor names")
    exclude: list[str] = Field(default_factory=list, description="regexes on tensor names")
    chunk_mib: int = Field(64, ge=1, le=4096)
    num_actors: int = Field(2, ge=1)
    cpus_per_actor: float = Field(1, gt=0)
    custom_resources: CustomResources = _custom_resources_field()
    max_candidates: int = Field(
        2_000_000,
        ge=1024,
        description="per task, units kept in memory near the threshold; bounds the driver's memory",
    )

    @field_validator("include", "exclude")
    @classmethod
    def _regex(cls, v: list[str]) -> list[str]:
        for pat in v:
            re.compile(pat)
        return v


class GroupsConfig(_Section):
    tau_mode: Literal["absolute", "chance"] = Field(
        "absolute",
        description="absolute: link tasks whose cores' Jaccard >= tau (the paper); "
        "chance: >= tau x p/(200-p), the expected Jaccard of two independent p% cores, so that a "
        "change of regions.p or regions.score does not by itself change what tau means",
    )
    tau: float = Field(
        0.1,
        ge=0,
        description="overlap threshold: a Jaccard in [0, 1] "
        "(tau_mode absolute), or a multiple of the chance Jaccard (tau_mode chance)",
    )
    order: Literal["random", "given", "size"] = "random"
    given: Optional[list[list[str]]] = None
    seed: int = 0

    @field_validator("tau")
    @classmethod
    def _tau(cls, v: float, info: ValidationInfo) -> float:
        if info.data.get("tau_mode", "absolute") == "absolute" and v > 1:
            raise ValueError(
                f"{v:g} is above 1, which no Jaccard reaches with tau_mode absolute "
                "(tau_mode chance takes a multiple of the chance level)"
            )
        return v


class FuseConfig(_Section):
    omega: Optional[float] = Field(
        None, ge=0, le=1, description="SLERP weight for two models; None = running spherical mean"
    )
    omega_overrides: dict[str, float] = Field(default_factory=dict, description="tensor-name regex -> omega")
    method: Literal["fold", "multislerp", "task_arithmetic", "ties"] = Field(
        "fold",
        description="non-core merge: fold (running SLERP), multislerp (spherical mean), "
        "task_arithmetic (base + scale x the sum of the task vectors), ties (trimmed, "
        "sign-elected mean of the task vectors, x scale)",
    )
    scale: float = Field(1.0, gt=0, description="task_arithmetic, ties: factor on the merged task vector")
    density: float = Field(
        1.0, gt=0, le=1, description="ties: share of each task vector kept per tensor (largest magnitudes)"
    )
    backbone: str = Field("base", description="'base' or a task name: where the fold starts")
    policy: Literal["magnitude", "mean", "priority"] = "magnitude"
    epsilon: float = Field(5e-4, gt=0, lt=1)
    num_actors: int = Field(2, ge=1)
    chunk_mib: int = Field(64, ge=1, le=4096)
    cpus_per_actor: float = Field(1, gt=0)
    custom_resources: CustomResources = _custom_resources_field()

    @field_validator("omega_overrides")
    @classmethod
    def _overrides(cls, v: dict[str, float]) -> dict[str, float]:
        for pat, w in v.items():
            re.compile(pat)
            if not 0 <= w <= 1:
                raise ValueError(f"omega for {pat!r} must be within [0, 1]")
        return v

    @model_validator(mode="after")
    def _method_knobs(self) -> "FuseConfig":
        vectors = self.method in ("task_arithmetic", "ties")
        if vectors and (self.omega is not None or self.omega_overrides):
            raise ValueError(
                "fuse.omega and fuse.omega_overrides are SLERP weights; "
                f"method {self.method} takes fuse.scale"
            )
        if vectors and self.backbone != "base":
            raise ValueError(
                f"fuse.backbone {self.backbone!r}: method {self.method} adds task vectors "
                "to the base (backbone: base)"
            )
        if not vectors and self.scale != 1.0:
            raise ValueError(f"fuse.scale applies to task_arithmetic and ties, not to method {self.method}")
        if self.method != "ties" and self.density != 1.0:
            raise ValueError(f"fuse.density applies to method ties, not to {self.method}")
        return self


class ConsolidateConfig(TrainConfig):
    freeze: Literal["prior", "others", "all", "none"] = "prior"
    data: Literal["mixed", "group"] = Field(
        "mixed",
        description="what each stage trains on: mixed, a mix of every task by its "
        "weight (the paper's mixed-task phase); group, the stage's own group's tasks (plus a "
        "replay share of earlier groups)",
    )
    replay: float = Field(
        0.0, ge=0, lt=1, description="with data group: share of earlier groups' data in each stage"
    )
    mix: Literal["weights", "balanced"] = Field(
        "weights",
        description="how a stage's rows split over its tasks: weights, by the tasks' `weight` "
        "(as the baselines mix them); balanced, equal shares whatever the weights (the paper's "
        "balanced mixed set: every task as present in consolidation as in its own probe)",
    )

    def recipe_dump(self, exclude: frozenset[str] = frozenset()) -> dict:
        d = super().recipe_dump(exclude)
        if d.get("mix") == "weights":  # runs from before the knob keep their fingerprints
            del d["mix"]
        return d

    @model_validator(mode="after")
    def _freezing_needs_zero3(self) -> "ConsolidateConfig":
        if self.freeze != "none" and self.zero_stage != 3:
            raise ValueError(
                f"zero_stage {self.zero_stage} with freeze {self.freeze}: element freezing works on "
                "ZeRO-3 partitions (set zero_stage: 3, or freeze: none)"
            )
        return self

    @field_validator("replay")
    @classmethod
    def _replay(cls, v: float, info: ValidationInfo) -> float:
        data = info.data.get("data", "mixed")
        if v and data != "group":
            raise ValueError(
                f"{v:g} needs consolidate.data group: with data {data} every stage "
                "already trains on every task"
            )
        return v


class BaselinesConfig(_Section):
    """Comparison modes trained on the same engine (ZeRO-3 trainer), data and seeds as CPI-FT."""

    modes: list[
        Literal[
            "full_mtl",
            "full_mtl_light",
            "full_mtl_balanced",
            "multistage",
            "dpi",
            "epi",
            "sequential",
            "sequential_cpi",
            "sequential_epi",
        ]
    ] = Field(
        default_factory=list,
        description="full_mtl: all tasks mixed, CPI-FT's whole budget; full_mtl_light: all tasks "
        "mixed, only CPI-FT's consolidation rows; full_mtl_balanced: full_mtl in equal task "
        "shares whatever the weights (what rebalancing alone does); multistage: group by group, "
        "no freezing; dpi: from the base model, CPI-FT's groups in order, each on its own tasks "
        "with the earlier groups' cores frozen (no fusion); epi: full_mtl with Evolving Parameter "
        "Isolation (the epi section); sequential: task A then B; sequential_cpi: A then B with A's "
        "core frozen; sequential_epi: A then B with EPI while B trains",
    )
    multistage_grouping: Literal["random", "given", "cpi"] = Field(
        "random", description="random (seeded), given (multistage_groups) or cpi (CPI-FT's groups)"
    )
    multistage_groups: Optional[list[list[str]]] = None
    multistage_num_groups: int = Field(2, ge=1)
    sequential: Optional[list[str]] = Field(None, description="[A, B]: train A, then B")
    seed: int = 0

    @model_validator(mode="after")
    def _seq(self) -> "BaselinesConfig":
        if {"sequential", "sequential_cpi", "sequential_epi"} & set(self.modes):
            if not self.sequential or len(self.sequential) != 2 or len(set(self.sequential)) != 2:
                raise ValueError("sequential modes need baselines.sequential: [A, B], two tasks")
        if self.multistage_grouping == "given" and "multistage" in self.modes and not self.multistage_groups:
            raise ValueError("multistage_grouping given needs multistage_groups")
        return self


# Baseline modes that train with Evolving Parameter Isolation (the `epi` section).
EPI_MODES = ("epi", "sequential_epi")


class EpiConfig(_Section):
    """Evolving Parameter Isolation (arXiv 2604.14010), baselines mode `epi`: multi-task SFT in
    which the frozen set is re-selected every `interval` steps from an online importance."""

    # State per element a rank owns: the fp32 moving average and the bool mask.
    STATE_BYTES: ClassVar[int] = 5
    # Per frozen element a rank owns: its fp32 held value and its int64 index.
    FROZEN_BYTES: ClassVar[int] = 12

    ratio: float = Field(
        5.0, gt=0, lt=100, description="percent of the model's elements frozen after each mask update"
    )
    interval: int = Field(10, ge=1, description="optimizer steps between mask updates")
    beta: float = Field(
        0.9, ge=0, lt=1, description="EMA decay of the importance, per mask update (0: the last one only)"
    )
    score: Literal["fisher", "taylor"] = Field(
        "fisher",
        description="per-element importance of a step's gradient g: fisher, g squared (the online "
        "form of regions.score fisher); taylor, |g x weight| (first-order loss change)",
    )


HARNESS_FIELDS = ("harness_tasks", "harness_include_path", "harness_num_fewshot", "harness_limit")


class EvaluateConfig(_Section):
    max_new_tokens: int = Field(64, ge=1, le=8192)
    batch_size: int = Field(16, ge=1)
    models: list[Literal[tuple(MODEL_KINDS)]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(MODEL_KINDS),
        description="which models to score: base, probes, fused, final, baselines",
    )
    num_workers: int = Field(1, ge=1, description="models scored at the same time, at most")
    cpus_per_worker: float = Field(1, gt=0)
    use_gpu: bool = Field(False, description="one GPU per model being scored")
    custom_resources: CustomResources = _custom_resources_field()
    harness_tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks run on every scored "
        "model (e.g. [gsm8k, mmlu]); needs the harness extra",
    )
    harness_include_path: Optional[str] = Field(None, description="a folder of your own lm-eval task YAMLs")
    harness_num_fewshot: Optional[int] = Field(None, ge=0, description="None: each task's own")
    harness_limit: Optional[int] = Field(
        None, ge=1, description="rows per harness task (a quick look; not a comparable score)"
    )

    @field_validator("harness_include_path")
    @classmethod
    def _include_path(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        p = Path(v).expanduser().resolve()  # resolved on the driver: workers do not share its cwd
        if not p.is_dir():
            raise ValueError(f"harness_include_path: {v!r} is not a directory")
        return str(p)

    def scoring_dump(self) -> dict[str, Any]:
        """What the per-task scores depend on: neither resources nor the harness settings."""
        return self.model_dump(
            exclude={"num_workers", "cpus_per_worker", "custom_resources", *HARNESS_FIELDS}
        )

    def harness_dump(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (*HARNESS_FIELDS, "batch_size")}


# Knobs a search may vary: probes are computed once and shared by every trial, so nothing of
# `probe`, `model`, `tasks` or `data` may differ between trials.
TUNABLE_SECTIONS = ("regions", "groups", "fuse", "consolidate")
_SPACE_KINDS = ("choice", "grid", "uniform", "loguniform")


class SearchDim(_Section):
    """One dimension of the search space: exactly one of `choice`/`grid` (a list of values) or
    `uniform`/`loguniform` ([low, high])."""

    choice: Optional[list[Any]] = None
    grid: Optional[list[Any]] = None
    uniform: Optional[list[float]] = None
    loguniform: Optional[list[float]] = None

    @model_validator(mode="after")
    def _one(self) -> "SearchDim":
        given = [k for k in _SPACE_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"a search dimension needs exactly one of {', '.join(_SPACE_KINDS)} (got {given or 'none'})"
            )
        kind = given[0]
        v = getattr(self, kind)
        if kind in ("choice", "grid") and not v:
            raise ValueError(f"{kind} needs at least one value")
        if kind in ("uniform", "loguniform"):
            if len(v) != 2 or not v[0] < v[1]:
                raise ValueError(f"{kind} needs [low, high] with low < high")
            if kind == "loguniform" and v[0] <= 0:
                raise ValueError("loguniform needs low > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in _SPACE_KINDS if getattr(self, k) is not None)

    def values(self) -> Optional[list[Any]]:
        """The finite set of values (choice, grid), else None."""
        return self.choice if self.choice is not None else self.grid


class TuneConfig(_Section):
    enabled: bool = False
    num_samples: int = Field(4, ge=1, description="trials (random, optuna); grid: repeats of the grid")
    max_concurrent_trials: int = Field(1, ge=1)
    search_space: dict[str, SearchDim] = Field(
        default_factory=dict,
        description="dotted config key (regions.p, groups.tau, fuse.omega, consolidate.lr, "
        "consolidate.steps, ...) -> {choice|grid: [values]} or {uniform|loguniform: [low, high]}",
    )
    search_alg: Literal["random", "grid", "optuna"] = Field(
        "random",
        description="grid: every dimension a grid or choice, all combinations; "
        "optuna: needs the optional extra `tune`",
    )
    scheduler: Literal["asha", "fifo"] = "asha"
    objective: Literal["mean_normalized", "min_normalized"] = Field(
        "mean_normalized",
        description="over the tasks, each task's validation score divided by "
        "its expert's (its probe's); min_normalized is the seesaw-aware choice",
    )
    grace_period: int = Field(
        2,
        ge=1,
        description="ASHA: results a trial reports (one per "
        "consolidation report, about ten per group) before it can be stopped",
    )
    reduction_factor: float = Field(2.0, gt=1)
    cpus_per_trial: float = Field(
        0,
        ge=0,
        description="CPUs of the trial's driver function itself; its trainers, actors "
        "and scoring tasks ask for their own",
    )
    trial_memory_mb: int = Field(
        256,
        ge=1,
        description="memory (Ray's logical resource) the trial's driver function "
        "reserves; also what lets it hold no CPU, as Tune needs a non-empty reservation",
    )
    seed: int = 0
    export_best: bool = Field(True, description="copy the best trial's model to tune/best_model/")

    @field_validator("search_space")
    @classmethod
    def _keys(cls, v: dict[str, SearchDim]) -> dict[str, SearchDim]:
        for key in v:
            section, _, field = key.partition(".")
            if section not in TUNABLE_SECTIONS or not field or "." in field:
                raise ValueError(
                    f"search_space key {key!r}: must be <section>.<field> with "
                    f"section one of {', '.join(TUNABLE_SECTIONS)}"
                )
            model = {
                "regions": RegionsConfig,
                "groups": GroupsConfig,
                "fuse": FuseConfig,
                "consolidate": ConsolidateConfig,
            }[section]
            if field not in model.model_fields:
                raise ValueError(f"search_space key {key!r}: {section} has no field {field!r}")
        return v

    @model_validator(mode="after")
    def _alg(self) -> "TuneConfig":
        if self.search_alg == "grid":
            bad = [k for k, d in self.search_space.items() if d.values() is None]
            if bad:
                raise ValueError(f"search_alg grid needs choice/grid dimensions; {bad} are ranges")
        if self.search_alg == "optuna":
            if importlib.util.find_spec("optuna") is None:
                raise ValueError("search_alg optuna needs optuna (pip install -e '.[tune]')")
            bad = [k for k, d in self.search_space.items() if d.grid is not None]
            if bad:
                raise ValueError(f"search_alg optuna takes no grid dimensions ({bad}); use choice")
        return self


class StorageConfig(_Section):
    path: str = Field(
        "runs",
        description="root of every run directory: a local path, or an "
        "s3:// / gs:// URI that keeps the run durable (uploaded stage by stage)",
    )
    run_name: str = "cpi-run"
    local_path: str = Field(
        "~/.cache/cpi-ray/runs",
        description="with an s3:// or gs:// path: where the stages "
        "work on their copy of the run (on multi-node clusters, a mount every node shares)",
    )
    lease_ttl_s: float = Field(
        300.0,
        ge=10,
        description="with an s3:// or gs:// path: the run's lease object in the store lapses this "
        "long after its holder's last renewal (a job that died); another job then takes it over",
    )
    check_free_space: bool = Field(
        True,
        description="stop before a stage when the run directory's disk cannot hold what the stages "
        "still write (cpi-ray plan's estimate), instead of failing mid-write",
    )

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        scheme = v.split("://", 1)[0] if "://" in v else ""
        if scheme not in ("", "file", "s3", "gs", "gcs"):
            raise ValueError(f"storage.path: scheme {scheme!r} is not supported (a local path, s3://, gs://)")
        if scheme in ("s3", "gs", "gcs") and not v.split("://", 1)[1].split("?")[0].strip("/"):
            raise ValueError("storage.path: the URI names no bucket")
        return v.removeprefix("file://")

    @property
    def remote(self) -> bool:
        return "://" in self.path

    @property
    def work_root(self) -> str:
        """Where run directories live on this machine (or shared mount)."""
        return self.local_path if self.remote else self.path

    @field_validator("run_name")
    @classmethod
    def _rn(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("run_name must be letters, digits, '_', '.', '-'")
        return v


class ExportConfig(_Section):
    """Optional upload of a finished model (with its model card) to the Hugging Face hub."""

    hub_repo_id: Optional[str] = Field(None, description="e.g. my-org/llama-cpi-ft; None: no upload")
    model: Literal["final", "fused"] = "final"
    private: bool = True

    @field_validator("hub_repo_id")
    @classmethod
    def _repo(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not re.match(r"^[\w.-]+/[\w.-]+$", v):
            raise ValueError("hub_repo_id must be namespace/name")
        return v


class RayConfig(_Section):
    address: Optional[str] = Field(
        None,
        description="a cluster address ('auto': any Ray running on this machine); "
        "'local' always starts an embedded Ray; None joins the cluster named by RAY_ADDRESS or "
        "started with `ray start` on this machine, else starts its own embedded Ray (never "
        "another run's)",
    )
    num_cpus: Optional[int] = Field(None, ge=1, description="for a local Ray only")
    namespace: str = "cpi-ray"


class LoggingConfig(_Section):
    """Where every SFT job's per-step metrics go, besides its model's `metrics.jsonl` and the
    console (rank 0 logs, as Ray Train recommends)."""

    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="trackers: tensorboard (event files under <run>/logs/tensorboard/), mlflow "
        "(MLFLOW_TRACKING_URI), wandb (WANDB_* settings); the last two are extras: "
        "pip install 'cpi-ray[mlflow]' / 'cpi-ray[wandb]'",
    )
    project: str = Field("cpi-ray", min_length=1, description="the mlflow experiment / wandb project")
    every_steps: Optional[int] = Field(
        None, ge=1, description="a console line every N optimizer steps (default: ten per job)"
    )


class PipelineConfig(_Section):
    model: ModelConfig = ModelConfig()
    tasks: list[TaskConfig] = Field(..., min_length=1)
    data: DataConfig = DataConfig()
    probe: ProbeConfig = ProbeConfig()
    regions: RegionsConfig = RegionsConfig()
    groups: GroupsConfig = GroupsConfig()
    fuse: FuseConfig = FuseConfig()
    consolidate: ConsolidateConfig = ConsolidateConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    epi: EpiConfig = EpiConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    tune: TuneConfig = TuneConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    logging: LoggingConfig = LoggingConfig()
    stages: list[str] = Field(default_factory=lambda: list(STAGES))

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in STAGES]
        if bad:
            raise ValueError(f"unknown stage(s) {bad}; allowed: {', '.join(STAGES)}")
        return [s for s in STAGES if s in v]

    @model_validator(mode="after")
    def _cross(self) -> "PipelineConfig":
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate task names: {dup}")
        if self.groups.order == "given":
            given = [n for g in (self.groups.given or []) for n in g]
            if sorted(given) != sorted(names):
                raise ValueError("groups.given must list every task exactly once")
        b = self.baselines
        for t in [*(b.sequential or []), *(n for g in b.multistage_groups or [] for n in g)]:
            if t not in names:
                raise ValueError(f"baselines: unknown task {t!r} (tasks: {', '.join(names)})")
        if b.multistage_groups and sorted(n for g in b.multistage_groups for n in g) != sorted(names):
            raise ValueError("baselines.multistage_groups must list every task exactly once")
        epi = [m for m in b.modes if m in EPI_MODES]
        if epi and self.consolidate.zero_stage != 3:
            raise ValueError(
                f"baselines.modes: {epi[0]} freezes elements on ZeRO-3 partitions; consolidate.zero_stage "
                f"is {self.consolidate.zero_stage} (set it to 3)"
            )
        if self.fuse.backbone not in ("base", *names):
            raise ValueError(f"fuse.backbone must be 'base' or a task name ({', '.join(names)})")
        return self

    def task(self, name: str) -> TaskConfig:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)
