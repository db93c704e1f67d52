"""`run_tune`: a Ray Tune search over the CPI-FT knobs.

The driver (this process) runs what every trial shares, once: the probes and the regions of the
base config (whose per-task score histograms make any other p a one-bin refinement), and scores
each probe (its task's expert) on its task's validation rows. Tune then runs one *driver
function* per trial (Train V2's pattern): it links the probes into its own run directory, gets
regions, groups and the fused model from the stage cache (computing and publishing only what no
trial made before), and fits the consolidation TorchTrainer(s) with `TuneReportCallback`, so that
every consolidation step reaches Tune with a validation loss (`val_loss`) that ASHA compares
between trials. A trial that finishes scores its final model on the validation rows; the
objective is each task's score over its expert's, averaged (`mean_normalized`) or the worst
task's (`min_normalized`). The eval split is never read.

Outputs under `<run_dir>/tune/`: `trials/<trial_id>/` (each trial's run directory and its
`trial.json`), `cache/<stage>/<fingerprint>/`, `experts.json`, `trials.json` and `trials.csv`,
`best.yaml` (the best trial's whole config, runnable as it is) and `best_model/` (its model).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from cpi_ray.config.schema import PipelineConfig
from cpi_ray.config.stages import STAGE_FOLDERS
from cpi_ray.data.formatting import encode_rows
from cpi_ray.data.tasks import load_splits, task_identity
from cpi_ray.evaluation.evaluate import score_model
from cpi_ray.evaluation.report import build_report, markdown_table
from cpi_ray.fusion.stage import FuseStage
from cpi_ray.io.atomic import atomic_file, read_json, write_json
from cpi_ray.models.loading import load_tokenizer, resolve_base_model
from cpi_ray.pipeline.runner import _write_config
from cpi_ray.regions.stage import HIST_FILE, GroupsStage, RegionsStage, load_groups
from cpi_ray.run.runtime import train_env
from cpi_ray.run.stage import RECORD_NAME, RunContext, stable_hash
from cpi_ray.training.consolidate import ConsolidateStage, stage_record
from cpi_ray.training.probe import ProbeStage
from cpi_ray.tune.cache import RAN, StageCache, link_tree
from cpi_ray.tune.space import apply_knobs, check_space, param_space

log = logging.getLogger("cpi_ray")

TUNE_DIR = "tune"
TRIAL_RECORD = "trial.json"
# A score of 0 for an expert would make every ratio infinite: its floor, in points (of 100).
EXPERT_FLOOR = 1.0


# ---------------------------------------------------------------------------- objective


def normalized_scores(scores: dict[str, float], experts: dict[str, float]) -> dict[str, float]:
    return {t: scores[t] / max(experts[t], EXPERT_FLOOR) for t in experts}


def objective_of(normalized: dict[str, float], kind: str) -> float:
    vals = list(normalized.values())
    return min(vals) if kind == "min_normalized" else sum(vals) / len(vals)


def validation_rows(cfg: PipelineConfig) -> dict[str, list[dict]]:
    return {t.name: load_splits(t, cfg.data.split_seed).val for t in cfg.tasks}


def _score(
    model_dir: str, rows: dict[str, list[dict]], cfg_dump: dict, tokenizer_dir: Optional[str]
) -> dict[str, float]:
    return score_model(model_dir, rows, PipelineConfig.model_validate(cfg_dump), tokenizer_dir)


def _score_remote(cfg: PipelineConfig):
    ev = cfg.evaluate
    # "DEFAULT": not inside the calling trial's placement group, which holds only the trial's
    # own small share (Tune makes child tasks inherit it otherwise).
    return ray.remote(
        num_cpus=ev.cpus_per_worker,
        num_gpus=1 if ev.use_gpu else 0,
        resources=dict(ev.custom_resources) or None,
        max_retries=0,
        scheduling_strategy="DEFAULT",
    )(_score)


def expert_scores(ctx: RunContext, out: Path) -> dict[str, float]:
    """Each probe scored on its own task's validation rows; kept in `out` for as long as the
    probes and the validation split are the same."""
    cfg = ctx.cfg
    key = stable_hash(
        {
            "probe": ctx.records["probe"]["fingerprint"],
            "tasks": [task_identity(t) for t in cfg.tasks],
            "data": cfg.data.model_dump(),
            "evaluate": cfg.evaluate.model_dump(exclude={"num_workers", "models"}),
        }
    )
    try:
        doc = read_json(out)
        if doc.get("key") == key:
            return doc["scores"]
    except (FileNotFoundError, ValueError):
        pass
    rows = validation_rows(cfg)
    score = _score_remote(cfg)
    refs = {
        t: score.remote(
            str(ctx.path("probes", t)), {t: rows[t]}, cfg.model_dump(mode="json"), str(ctx.base_model_dir)
        )
        for t in rows
    }
    scores = {t: float(ray.get(r)[t]) for t, r in refs.items()}
    write_json(out, {"key": key, "scores": scores, "val_rows": {t: len(r) for t, r in rows.items()}})
    return scores


# ---------------------------------------------------------------------------- stages


def load_histograms(regions_dir: Path) -> Optional[dict[str, np.ndarray]]:
    try:
        with np.load(regions_dir / HIST_FILE) as z:
            return {t: z[t] for t in z.files}
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------------- trial


def trial_dir_of(tune_dir: Path, trial_id: str) -> Path:
    return tune_dir / "trials" / trial_id


def _shared_stages(cfg_dump: dict, tdir: str, setup: dict[str, Any], doc: dict) -> dict:
    """The trial's probes (linked), regions, groups and fused model (from the stage cache).
    Runs as its own Ray task, outside the trial's placement group, so that the stages' actors
    and Ray Data ask the cluster for their resources. Returns the trial record so far."""
    logging.basicConfig(level=logging.INFO)
    cfg = PipelineConfig.model_validate(cfg_dump)
    tdir = Path(tdir)
    tune_dir = Path(setup["tune_dir"])
    ctx = RunContext(
        cfg=cfg, run_dir=tdir, base_model_dir=Path(setup["base_dir"]), base_model_id=setup["base_id"]
    )

    def save() -> None:
        write_json(tdir / TRIAL_RECORD, doc)

    # Probes are the driver's: linked, and the probe stage must find them current.
    if not (tdir / "probes").is_dir():
        link_tree(Path(setup["probes_dir"]), tdir / "probes")
    rec, ran = ProbeStage().execute(ctx)
    if ran:
        raise RuntimeError("trial retrained its probes: the shared probes did not match")
    doc["stages"]["probe"] = {"status": "shared", "fingerprint": rec["fingerprint"]}

    cache = StageCache(tune_dir / "cache")
    hists = load_histograms(Path(setup["histograms_dir"]))
    for stage in (RegionsStage(hists), GroupsStage(), FuseStage()):
        t0 = time.time()
        rec, how = cache.materialize(stage, ctx)
        doc["stages"][stage.name] = {
            "status": how,
            "fingerprint": rec["fingerprint"],
            "wall_s": round(time.time() - t0, 3),
        }
        save()
    doc["groups"] = load_groups(tdir)
    save()
    return doc


def trial_driver(knobs: dict[str, Any], setup: dict[str, Any]) -> None:
    """One trial: its stages in its own run directory, consolidation reporting every step to
    Tune, then the validation objective as the trial's last result."""
    trial_id = tune.get_context().get_trial_id()
    cfg = apply_knobs(PipelineConfig.model_validate(setup["cfg"]), knobs)
    tdir = trial_dir_of(Path(setup["tune_dir"]), trial_id)
    tdir.mkdir(parents=True, exist_ok=True)
    _write_config(cfg, tdir)
    doc: dict[str, Any] = {"trial_id": trial_id, "knobs": knobs, "stages": {}, "status": "running"}
    prepare = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy="DEFAULT")(_shared_stages)
    doc = ray.get(prepare.remote(cfg.model_dump(mode="json"), str(tdir), setup, doc))
    ctx = RunContext(
        cfg=cfg, run_dir=tdir, base_model_dir=Path(setup["base_dir"]), base_model_id=setup["base_id"]
    )
    for name, st in doc["stages"].items():
        ctx.records[name] = read_json(tdir / STAGE_FOLDERS[name] / RECORD_NAME)
        assert ctx.records[name]["fingerprint"] == st["fingerprint"]
        ctx.verified.add(name)  # checked against its record by _shared_stages just now

    def save() -> None:
        write_json(tdir / TRIAL_RECORD, doc)

    tok = load_tokenizer(ctx.base_model_dir, cfg.model.trust_remote_code)
    rows = validation_rows(cfg)
    val_examples = [ex for t in cfg.tasks for ex in encode_rows(tok, t, rows[t.name], cfg.data.max_seq_len)]
    t0 = time.time()
    stage = ConsolidateStage(callbacks=[TuneReportCallback()], val_examples=val_examples)
    rec, _ = stage.execute(ctx)
    doc["stages"]["consolidate"] = {
        "status": RAN,
        "fingerprint": rec["fingerprint"],
        "wall_s": round(time.time() - t0, 3),
    }
    last = stage_record(tdir / "consolidate" / f"stage-{len(doc['groups'])}")
    val_loss = float(last["val_loss"]) if last and last.get("val_loss") is not None else math.nan

    scores = ray.get(
        _score_remote(cfg).remote(
            str(tdir / "final"), rows, cfg.model_dump(mode="json"), str(ctx.base_model_dir)
        )
    )
    norm = normalized_scores(scores, setup["experts"])
    result = {
        "objective": objective_of(norm, cfg.tune.objective),
        "mean_normalized": objective_of(norm, "mean_normalized"),
        "min_normalized": objective_of(norm, "min_normalized"),
        "val_loss": val_loss,
        "finished": True,
        **{f"val_score/{t}": s for t, s in scores.items()},
        **{f"normalized/{t}": v for t, v in norm.items()},
    }
    doc.update(
        status="finished",
        val_scores=scores,
        normalized=norm,
        objective=result["objective"],
        val_loss=val_loss,
    )
    save()
    tune.report(result)


# ---------------------------------------------------------------------------- driver


@dataclass
class TuneOutcome:
    tune_dir: Path
    trials: list[dict] = field(default_factory=list)
    best: Optional[dict] = None
    shared: dict = field(default_factory=dict)
    wall_s: float = 0.0

    def render(self) -> str:
        lines = [f"tune directory: {self.tune_dir}", "", trials_table(self.trials, markdown=False)]
        if self.best:
            lines += [
                "",
                f"best trial {self.best['trial_id']}: objective "
                f"{self.best['objective']:.4f}, knobs {self.best['knobs']}",
                f"best config: {self.tune_dir / 'best.yaml'}",
            ]
            if (self.tune_dir / "best_model").is_dir():
                lines.append(f"best model: {self.tune_dir / 'best_model'}")
        return "\n".join(lines)


def max_iterations(cfg: PipelineConfig) -> int:
    """Most results one trial can report: every consolidation step of every group (at most one
    group per task), plus the final objective."""
    dim = cfg.tune.search_space.get("consolidate.steps")
    steps = cfg.consolidate.steps
    if dim is not None:
        steps = int(max(dim.values() or [dim.uniform[1] if dim.uniform else dim.loguniform[1]]))
    return steps * len(cfg.tasks) + 1


def _scheduler(cfg: PipelineConfig):
    tc = cfg.tune
    if tc.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        metric="val_loss",
        mode="min",
        max_t=max_iterations(cfg),
        grace_period=tc.grace_period,
        reduction_factor=tc.reduction_factor,
    )


def _search_alg(cfg: PipelineConfig):
    tc = cfg.tune
    if tc.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # optuna is an optional extra (cpi-ray[tune])

        class FinalResultOptuna(OptunaSearch):
            # Only a trial's last result carries the objective; consolidation steps carry the
            # val_loss that ASHA uses.
            def on_trial_result(self, trial_id: str, result: dict) -> None:
                if self.metric in result:
                    super().on_trial_result(trial_id, result)

        return FinalResultOptuna(metric="objective", mode="max", seed=tc.seed)

    # The variant generator is not a Searcher: it takes the concurrency limit itself.
    return BasicVariantGenerator(random_state=tc.seed, max_concurrent=tc.max_concurrent_trials)


def run_tune(cfg: PipelineConfig, run_dir: Path) -> TuneOutcome:
    """The whole search; see the module docstring. Raises SpaceError on a bad space before any
    work."""
    check_space(cfg)
    t_start = time.time()
    tc = cfg.tune
    run_dir.mkdir(parents=True, exist_ok=True)
    tune_dir = run_dir / TUNE_DIR
    tune_dir.mkdir(exist_ok=True)
    _write_config(cfg, run_dir)
    base_dir, base_id = resolve_base_model(cfg)
    ctx = RunContext(cfg=cfg, run_dir=run_dir, base_model_dir=base_dir, base_model_id=base_id)

    shared: dict[str, Any] = {}
    t0 = time.time()
    rec, ran = ProbeStage().execute(ctx)
    shared["probe"] = {
        "status": "ran" if ran else "current",
        "fingerprint": rec["fingerprint"],
        "wall_s": round(time.time() - t0, 3),
    }
    t0 = time.time()
    rec, how = StageCache(tune_dir / "cache").materialize(RegionsStage(), ctx)
    shared["regions"] = {
        "status": how,
        "fingerprint": rec["fingerprint"],
        "p": cfg.regions.p,
        "wall_s": round(time.time() - t0, 3),
    }
    t0 = time.time()
    experts = expert_scores(ctx, tune_dir / "experts.json")
    shared["experts"] = {"scores": experts, "wall_s": round(time.time() - t0, 3)}
    write_json(tune_dir / "shared.json", shared)
    log.info(
        "tune: probes %s, base regions %s, experts' validation scores %s",
        shared["probe"]["status"],
        how,
        experts,
    )

    setup = {
        "cfg": cfg.model_dump(mode="json"),
        "tune_dir": str(tune_dir),
        "base_dir": str(base_dir),
        "base_id": base_id,
        "probes_dir": str(run_dir / "probes"),
        "histograms_dir": str(run_dir / "regions"),
        "experts": experts,
    }
    # No CPU for the driver function by default: a fraction would keep a stage's actors (one
    # CPU each) from all fitting on a small node, and they wait for each other.
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, setup=setup),
        {"cpu": tc.cpus_per_trial, "memory": tc.trial_memory_mb * 2**20},
    )
    name = time.strftime("search-%Y%m%d-%H%M%S")
    # Trials fit their trainers in processes started from here: they inherit these.
    os.environ.update(train_env())
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(tc),
        tune_config=tune.TuneConfig(
            num_samples=tc.num_samples,
            max_concurrent_trials=(tc.max_concurrent_trials if tc.search_alg == "optuna" else None),
            scheduler=_scheduler(cfg),
            search_alg=_search_alg(cfg),
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(tune_dir / "_ray"),
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    grid = tuner.fit()

    trials = collect_trials(grid, tune_dir, cfg)
    outcome = TuneOutcome(tune_dir, trials, shared=shared)
    write_trials(tune_dir, trials)
    finished = [t for t in trials if t["status"] == "finished"]
    if not finished:
        errors = "; ".join(f"{t['trial_id']}: {t.get('error')}" for t in trials if t.get("error"))
        raise RuntimeError(f"no trial finished ({len(trials)} started){': ' + errors if errors else ''}")
    best = max(finished, key=lambda t: t["objective"])
    outcome.best = best
    best_cfg = apply_knobs(cfg, best["knobs"]).model_dump(mode="json")
    best_cfg["tune"]["enabled"] = False
    with atomic_file(tune_dir / "best.yaml", "w") as f:
        f.write(
            f"# best of {len(trials)} trial(s) of {name}: trial {best['trial_id']}, "
            f"{tc.objective} {best['objective']:.4f} (validation split)\n"
        )
        yaml.safe_dump(best_cfg, f, sort_keys=False)
    if tc.export_best:
        link_tree(trial_dir_of(tune_dir, best["trial_id"]) / "final", tune_dir / "best_model")
    outcome.wall_s = time.time() - t_start
    write_json(
        tune_dir / "search.json",
        {
            "name": name,
            "wall_s": round(outcome.wall_s, 3),
            "best_trial": best["trial_id"],
            "objective": tc.objective,
            "search_alg": tc.search_alg,
            "scheduler": tc.scheduler,
            "num_trials": len(trials),
            "shared": shared,
        },
    )
    try:
        build_report(run_dir, extra_sections=report_sections(outcome, cfg))
    except Exception as e:  # noqa: BLE001 - the search's results stand without the report
        log.warning("tune: report not written: %s", e)
    return outcome


def collect_trials(grid, tune_dir: Path, cfg: PipelineConfig) -> list[dict]:
    """One row per trial: knobs, how it ended, its scores and how it got each stage."""
    rows = []
    for res in grid:
        m = res.metrics or {}
        trial_id = m.get("trial_id") or Path(res.path).name
        try:
            doc = read_json(trial_dir_of(tune_dir, trial_id) / TRIAL_RECORD)
        except (FileNotFoundError, ValueError):
            doc = {}
        iters = int(m.get("training_iteration") or 0)
        if res.error is not None:
            status = "error"
        elif m.get("finished"):
            status = "finished"
        else:
            status = "stopped"  # ended by the scheduler before its last result
        row = {
            "trial_id": trial_id,
            "status": status,
            "iterations": iters,
            "knobs": {k: res.config[k] for k in cfg.tune.search_space if k in res.config},
            "objective": m.get("objective"),
            "mean_normalized": m.get("mean_normalized"),
            "min_normalized": m.get("min_normalized"),
            "val_loss": m.get("val_loss"),
            "normalized": doc.get("normalized"),
            "val_scores": doc.get("val_scores"),
            "groups": doc.get("groups"),
            "stages": doc.get("stages", {}),
        }
        if res.error is not None:
            row["error"] = f"{type(res.error).__name__}: {str(res.error).splitlines()[0][:300]}"
        rows.append(row)
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def write_trials(tune_dir: Path, trials: list[dict]) -> None:
    write_json(tune_dir / "trials.json", trials)
    knob_keys = sorted({k for t in trials for k in t["knobs"]})
    tasks = sorted({k for t in trials for k in (t.get("normalized") or {})})
    stages = ["regions", "groups", "fuse"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "trial_id",
            "status",
            "iterations",
            *knob_keys,
            "objective",
            "mean_normalized",
            "min_normalized",
            "val_loss",
            *(f"normalized/{t}" for t in tasks),
            *(f"{s}_status" for s in stages),
        ]
    )
    for t in trials:
        w.writerow(
            [
                t["trial_id"],
                t["status"],
                t["iterations"],
                *(t["knobs"].get(k) for k in knob_keys),
                *(t.get(c) for c in ("objective", "mean_normalized", "min_normalized", "val_loss")),
                *((t.get("normalized") or {}).get(x) for x in tasks),
                *((t["stages"].get(s) or {}).get("status") for s in stages),
            ]
        )
    with atomic_file(tune_dir / "trials.csv", "w") as f:
        f.write(buf.getvalue())


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def trials_table(trials: list[dict], markdown: bool = True) -> str:
    knob_keys = sorted({k for t in trials for k in t["knobs"]})
    header = [
        "trial",
        "status",
        "iters",
        *knob_keys,
        "objective",
        "val_loss",
        "groups",
        "regions",
        "groups stage",
        "fuse",
    ]
    body = []
    for t in trials:
        st = t.get("stages") or {}
        body.append(
            [
                t["trial_id"],
                t["status"],
                str(t["iterations"]),
                *(_fmt(t["knobs"].get(k)) for k in knob_keys),
                _fmt(t.get("objective")),
                _fmt(t.get("val_loss")),
                " → ".join("{" + ",".join(g) + "}" for g in t.get("groups") or []) or "-",
                *((st.get(s) or {}).get("status", "-") for s in ("regions", "groups", "fuse")),
            ]
        )
    if markdown:
        return markdown_table(header, body)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header, *body])


def report_sections(outcome: TuneOutcome, cfg: PipelineConfig) -> list[tuple[str, str]]:
    tc = cfg.tune
    intro = (
        f"{len(outcome.trials)} trial(s), search {tc.search_alg}, scheduler {tc.scheduler} "
        f"(over consolidation steps, on the validation loss); objective `{tc.objective}` on "
        "the validation split: each task's score over its expert's (probe's). Stage columns: "
        "`ran` computed by that trial, `cached` linked from a trial that computed it."
    )
    body = intro + "\n\n" + trials_table(outcome.trials)
    if outcome.best:
        b = outcome.best
        body += (
            f"\n\nBest: trial `{b['trial_id']}`, objective {b['objective']:.4f}, knobs "
            f"`{b['knobs']}`; config `tune/best.yaml`, model `tune/best_model/`."
        )
    return [("Tune trials", body)]
