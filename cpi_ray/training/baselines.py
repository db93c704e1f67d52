"""Stage `baselines`: the comparisons of the paper, trained on the consolidation engine (Ray Train
+ DeepSpeed ZeRO-3) with the same data, seeds and recipe as CPI-FT.

- `full_mtl`: from the base model, all tasks mixed, CPI-FT's whole training budget (its probes
  and its consolidation stages together, in rows).
- `full_mtl_light`: the same with only CPI-FT's consolidation rows (the paper's framing of the
  consolidation as a lightweight phase; the comparison at equal total rows is `full_mtl`).
- `full_mtl_balanced`: `full_mtl` with every task in an equal share whatever its `weight`: with
  imbalanced tasks, what rebalancing alone does (CPI-FT's probes, and its consolidation with
  `consolidate.mix` balanced, give every task an equal share).
- `multistage`: from the base model, group by group with no freezing, the same budget split over
  the stages by task count; groups random (seeded), given, or CPI-FT's own (`cpi`).
- `dpi` (DPI, arXiv 2601.17777): CPI-FT without the fusion: from the base model, CPI-FT's groups
  in order, each for `consolidate.steps` on its own tasks with the earlier groups' cores frozen;
  with the probes it shares with CPI-FT it spends exactly CPI-FT's rows.
- `epi` (EPI, arXiv 2604.14010): `full_mtl` (same start, data and rows) with Evolving Parameter
  Isolation: every `epi.interval` steps the frozen set becomes the top `epi.ratio` percent of a
  moving average of per-element importance (`training.epi`).
- `sequential`: task A's probe (its single-task SFT) trained further on task B alone with the
  probe's budget: how much of A is forgotten.
- `sequential_cpi`: the same with A's core region frozen while B trains. With two tasks this is
  also DPI's and CPI-FT's mechanism in a staged setting (B trains with A's core frozen).
- `sequential_epi`: the same with EPI while B trains: its frozen set comes from B's own online
  importance, as EPI's does from whatever data it trains on.

Each mode writes `baselines/<mode>/` (HF model, plus `consolidate.json` per stage) and
`baselines/budget.json` records the rows and steps each mode used.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
from pathlib import Path
from typing import Optional

import torch

from cpi_ray.config.schema import EPI_MODES, EpiConfig, PipelineConfig
from cpi_ray.config.stages import STAGE_FOLDERS
from cpi_ray.data.batching import build_train_examples, mix_counts, mix_examples, task_weights
from cpi_ray.data.tasks import task_identity
from cpi_ray.io.atomic import read_json, write_json
from cpi_ray.io.masks import write_mask_file
from cpi_ray.io.records import RECORD_NAME, finished_item, load_record, stable_hash
from cpi_ray.io.safetensors_io import INDEX_NAME, CheckpointReader
from cpi_ray.models.loading import load_tokenizer
from cpi_ray.regions.grouping import read_groups
from cpi_ray.run.progress import METRICS_FILE, concat_metrics, tracking_spec
from cpi_ray.run.stage import RunContext, Stage
from cpi_ray.training.consolidate import (
    FROZEN_MASK,
    STAGE_RECORD,
    copy_model_dir,
    fit_group,
    stage_rows_per_task,
    union_masks,
)

log = logging.getLogger("cpi_ray")

MODE_RECORD = "baseline.json"  # in each mode's model directory: what it was trained from


def cpi_budget_rows(cfg: PipelineConfig, n_groups: int) -> int:
    """Training rows CPI-FT consumes: every probe plus every consolidation stage."""
    p, c = cfg.probe, cfg.consolidate
    return (
        p.steps * p.batch_size * p.num_workers * len(cfg.tasks)
        + c.steps * c.batch_size * c.num_workers * n_groups
    )


def random_groups(tasks: list[str], k: int, seed: int) -> list[list[str]]:
    order = list(tasks)
    random.Random(seed).shuffle(order)
    k = min(k, len(order))
    return [order[i::k] for i in range(k)]


def plan_modes(cfg: PipelineConfig, cpi_groups: Optional[list[list[str]]]) -> dict[str, dict]:
    """Per mode: its training stages as (tasks, frozen tasks, steps, lr) and where it starts."""
    b, c = cfg.baselines, cfg.consolidate
    names = [t.name for t in cfg.tasks]
    rows_per_step = c.batch_size * c.num_workers
    n_groups = len(cpi_groups) if cpi_groups else len(names)
    budget = cpi_budget_rows(cfg, n_groups)
    total_steps = max(1, math.ceil(budget / rows_per_step))
    plans: dict[str, dict] = {}
    for mode in b.modes:
        if mode == "full_mtl":
            plans[mode] = {
                "start": "base",
                "stages": [{"tasks": names, "frozen": [], "steps": total_steps, "lr": c.lr}],
            }
        elif mode == "full_mtl_balanced":
            stage = {"tasks": names, "frozen": [], "steps": total_steps, "lr": c.lr, "mix": "balanced"}
            plans[mode] = {"start": "base", "stages": [stage]}
        elif mode == "epi":
            stage = {"tasks": names, "frozen": [], "steps": total_steps, "lr": c.lr}
            plans[mode] = {"start": "base", "stages": [{**stage, "epi": cfg.epi.model_dump()}]}
        elif mode == "full_mtl_light":
            plans[mode] = {
                "start": "base",
                "stages": [{"tasks": names, "frozen": [], "steps": c.steps * n_groups, "lr": c.lr}],
            }
        elif mode == "multistage":
            if b.multistage_grouping == "given":
                groups = b.multistage_groups
            elif b.multistage_grouping == "cpi":
                if not cpi_groups:
                    raise ValueError("baselines.multistage_grouping cpi needs the groups stage")
                groups = cpi_groups
            else:
                groups = random_groups(names, b.multistage_num_groups, b.seed)
            plans[mode] = {
                "start": "base",
                "stages": [
                    {
                        "tasks": g,
                        "frozen": [],
                        "lr": c.lr,
                        "steps": max(1, round(total_steps * len(g) / len(names))),
                    }
                    for g in groups
                ],
            }
        elif mode == "dpi":
            if not cpi_groups:
                raise ValueError("baselines mode dpi needs the groups stage (CPI-FT's groups)")
            # CPI-FT's consolidation stages without the fusion: from the base model, each group on
            # its own tasks with the cores of the groups before it frozen. With the probes it
            # spends exactly CPI-FT's rows.
            plans[mode] = {
                "start": "base",
                "stages": [
                    {
                        "tasks": g,
                        "frozen": [t for earlier in cpi_groups[:k] for t in earlier],
                        "steps": c.steps,
                        "lr": c.lr,
                    }
                    for k, g in enumerate(cpi_groups)
                ],
            }
        else:
            a, bt = b.sequential
            p = cfg.probe
            steps = max(1, math.ceil(p.steps * p.batch_size * p.num_workers / rows_per_step))
            stage = {
                "tasks": [bt],
                "frozen": [a] if mode == "sequential_cpi" else [],
                "steps": steps,
                "lr": p.lr,
            }
            if mode == "sequential_epi":
                stage["epi"] = cfg.epi.model_dump()
            plans[mode] = {"start": f"probe:{a}", "stages": [stage]}
    for plan in plans.values():
        for st in plan["stages"]:
            weights = task_weights(cfg, st["tasks"], st.get("mix", "weights"))
            st["rows_per_task"] = mix_counts(st["tasks"], weights, st["steps"] * rows_per_step)
        plan["rows"] = sum(s["steps"] for s in plan["stages"]) * rows_per_step
    return plans


def cpi_budget(cfg: PipelineConfig, groups: Optional[list[list[str]]]) -> dict:
    """CPI-FT's training rows: in all, per probe, and per consolidation stage by task (as
    `consolidate.data` draws them), for `budget.json` beside the baselines' plans."""
    p, c = cfg.probe, cfg.consolidate
    groups = groups or [[t.name] for t in cfg.tasks]
    n = c.steps * c.batch_size * c.num_workers
    return {
        "rows": cpi_budget_rows(cfg, len(groups)),
        "probe_rows": {t.name: p.steps * p.batch_size * p.num_workers for t in cfg.tasks},
        "consolidate": {
            "data": c.data,
            "mix": c.mix,
            "stages": [
                {"tasks": g, "rows_per_task": stage_rows_per_task(cfg, groups, k, n)}
                for k, g in enumerate(groups)
            ],
        },
    }


class BaselinesStage(Stage):
    name = "baselines"
    # 2: fp32 runs train in fp32 (1 built them in bf16 on CPU); 3: the probes' LR schedule
    version = 3
    depends = ("probe",)

    def dependencies(self, ctx: RunContext) -> tuple[str, ...]:
        b = ctx.cfg.baselines
        deps = ["probe"]
        if {"sequential_cpi", "dpi"} & set(b.modes):
            deps.append("regions")
        if (
            "multistage" in b.modes
            and b.multistage_grouping == "cpi"
            or {"full_mtl", "full_mtl_light", "full_mtl_balanced", "dpi", "epi"} & set(b.modes)
        ):
            deps.append("groups")  # the budget counts CPI-FT's stages
        return tuple(dict.fromkeys(deps))

    def config_slice(self, cfg: PipelineConfig) -> dict:
        sl = {
            "baselines": cfg.baselines.model_dump(),
            "consolidate": cfg.consolidate.recipe_dump(),
            "probe": cfg.probe.recipe_dump(),
            "data": cfg.data.model_dump(),
            "tasks": [task_identity(t) for t in cfg.tasks],
            "max_shard_size": cfg.model.max_shard_size,
        }
        if set(EPI_MODES) & set(cfg.baselines.modes):  # runs without the modes keep their fingerprints
            sl["epi"] = cfg.epi.model_dump()
        return sl

    def run(self, ctx: RunContext) -> list[Path]:
        cfg = ctx.cfg
        groups_file = ctx.layout.groups_json
        cpi_groups = read_groups(groups_file) if groups_file.is_file() else None
        plans = plan_modes(cfg, cpi_groups)
        out_dir = ctx.path(self.folder)
        if not plans:
            log.info("baselines: no modes configured (baselines.modes)")
        self.fingerprint(ctx)  # fails early, naming the stage that has not run
        tok = load_tokenizer(ctx.base_model_dir, cfg.model.trust_remote_code)
        outputs: list[Path] = []
        for mode, plan in plans.items():
            start = (
                ctx.base_model_dir
                if plan["start"] == "base"
                else ctx.layout.probe(plan["start"].split(":", 1)[1])
            )
            final = out_dir / mode
            mode_fp = self.mode_fingerprint(ctx, mode, plan)
            if finished_item(final, MODE_RECORD, mode_fp, requires=(INDEX_NAME,)):
                log.info("baselines %s: already trained, kept (%s)", mode, final)
                outputs.append(final)
                continue
            prev = start
            work = out_dir / "stages" / mode
            for k, st in enumerate(plan["stages"]):
                out = work / f"stage-{k + 1}"
                fp = stable_hash({"mode": mode_fp, "k": k})
                rec = finished_item(out, STAGE_RECORD, fp, requires=(INDEX_NAME,))
                if rec is None:
                    mask_path = work / f"frozen-{k + 1}.mask.safetensors"
                    if st["frozen"]:
                        cores = [ctx.layout.mask(t) for t in st["frozen"]]
                        union_masks(cores, cores[0], mask_path, {"mode": mode})
                    else:
                        _empty_mask(prev, mask_path)
                    log.info(
                        "baselines %s stage %d/%d: tasks %s, %d steps, frozen %s",
                        mode,
                        k + 1,
                        len(plan["stages"]),
                        st["tasks"],
                        st["steps"],
                        st["frozen"] or "-",
                    )
                    stage_cfg = cfg.model_copy(deep=True)
                    stage_cfg.consolidate.steps = st["steps"]
                    stage_cfg.consolidate.lr = st["lr"]
                    stage_cfg.consolidate.freeze = "prior" if st["frozen"] else "none"
                    epi = EpiConfig.model_validate(st["epi"]) if st.get("epi") else None
                    examples = _mixed_examples(
                        stage_cfg,
                        tok,
                        st["tasks"],
                        st["steps"] * cfg.consolidate.batch_size * cfg.consolidate.num_workers,
                        seed=cfg.baselines.seed + k,
                        mix=st.get("mix", "weights"),
                    )
                    fit_group(
                        stage_cfg,
                        stage=k + 1,
                        tasks=st["tasks"],
                        frozen=st["frozen"],
                        start_dir=prev,
                        out_dir=out,
                        mask_path=mask_path,
                        examples=examples,
                        pad_id=tok.pad_token_id,
                        storage=ctx.layout.ray_storage,
                        fingerprint=fp,
                        job=f"baseline {mode} stage {k + 1}/{len(plan['stages'])}",
                        metrics_path=ctx.layout.train_log(f"baselines-{mode}-stage-{k + 1}"),
                        tracking=tracking_spec(cfg, ctx.layout),
                        rows_per_task=st["rows_per_task"],
                        epi=epi,
                    )
                prev = out
            # One loss curve for the mode: its stages' metrics in order, each line tagged.
            curve = concat_metrics(
                ({"stage": k + 1}, work / f"stage-{k + 1}" / METRICS_FILE) for k in range(len(plan["stages"]))
            )
            copy_model_dir(
                prev,
                final,
                skip=(FROZEN_MASK, STAGE_RECORD, METRICS_FILE),
                extra={MODE_RECORD: {"fingerprint": mode_fp, "mode": mode, **plan}},
                texts={METRICS_FILE: curve},
            )
            outputs.append(final)
        cpi = cpi_budget(cfg, cpi_groups)
        budget = {"cpi_rows": cpi["rows"], "cpi": cpi, "modes": plans}
        write_json(ctx.layout.budget_json, budget)
        # Intermediate stages only serve resumption within this stage; the finals are copied out.
        shutil.rmtree(out_dir / "stages", ignore_errors=True)
        return [*outputs, ctx.layout.budget_json]

    def mode_fingerprint(self, ctx: RunContext, mode: str, plan: dict) -> str:
        """What one mode's model depends on: the stage's config except the list of modes (adding
        a mode keeps the others), the base model, the plan, and the fingerprints of the stages
        it reads (the probe it starts from, the regions of the cores it freezes)."""
        sl = self.config_slice(ctx.cfg)
        sl["baselines"] = {k: v for k, v in sl["baselines"].items() if k != "modes"}
        sl.pop("epi", None)  # in the epi mode's plan
        reads = []
        if plan["start"] != "base":
            reads.append("probe")
        if any(st["frozen"] for st in plan["stages"]):
            reads.append("regions")
        inputs = {}
        for dep in reads:
            rec = ctx.records.get(dep) or load_record(ctx.path(STAGE_FOLDERS[dep], RECORD_NAME))
            inputs[dep] = None if rec is None else rec["fingerprint"]
        return stable_hash(
            {
                "config": sl,
                "base_model": ctx.base_model_id,
                "mode": mode,
                "plan": plan,
                "inputs": inputs,
                "version": self.version,
            }
        )

    def summary(self, ctx: RunContext) -> Optional[str]:

        try:
            budget = read_json(ctx.layout.budget_json)
        except (FileNotFoundError, ValueError):
            return None
        if not budget["modes"]:
            return None
        lines = [f"baselines (CPI-FT budget: {budget['cpi_rows']} rows)"]
        for mode, plan in budget["modes"].items():
            lines.append(
                f"  {mode:<15} {len(plan['stages'])} stage(s), {plan['rows']} rows, from {plan['start']}"
            )
        return "\n".join(lines)


def _mixed_examples(
    cfg: PipelineConfig, tok, tasks: list[str], n: int, seed: int, mix: str = "weights"
) -> list[dict]:
    per_task = build_train_examples(cfg, tok, tasks)
    return mix_examples(per_task, task_weights(cfg, tasks, mix), n, seed=seed)


def _empty_mask(model_dir: Path, out: Path) -> None:
    """An all-zero mask over the model's floating-point tensors: the trainer's 'nothing frozen'."""

    with CheckpointReader(model_dir) as r:
        numels = {n: r.info(n).numel for n in r.names() if r.info(n).dtype.is_floating_point}
    write_mask_file(
        out,
        {n: torch.zeros((k + 7) // 8, dtype=torch.uint8) for n, k in numels.items()},
        numels,
        {"frozen": "none"},
    )
