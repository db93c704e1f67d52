"""Stage `evaluate`: every available model generates greedily on every task's eval split and is
scored by the task's scorer.

One Ray task per model (`evaluate.cpus_per_worker` CPUs, a GPU with `evaluate.use_gpu`), at most
`evaluate.num_workers` at a time. Outputs: `eval/scores.json` (per-model, per-task scores in
0-100, and what a constant answer scores on each task) and `eval/predictions.jsonl` (every
generation with its answer and score, for inspection).
A requested model whose stage has not produced it (say `fused` before the fuse stage exists) is
skipped and listed as such; the stage's fingerprint covers exactly the models it scored, so it
runs again once more of them exist.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import ray
import torch

from cpi_ray.config.schema import PipelineConfig
from cpi_ray.config.stages import MODEL_KINDS, STAGE_FOLDERS
from cpi_ray.data.formatting import format_prompt
from cpi_ray.data.scorers import get_scorer
from cpi_ray.data.tasks import answer_text, load_splits, task_identity
from cpi_ray.evaluation.generate import greedy_generate
from cpi_ray.evaluation.harness import HARNESS_NAME, backend, run_harness
from cpi_ray.evaluation.report import build_report
from cpi_ray.evaluation.stats import mean_se
from cpi_ray.io.atomic import atomic_file, read_json, write_json
from cpi_ray.io.records import RECORD_NAME, file_sha256, load_record, stable_hash
from cpi_ray.models.card import CARD_NAME, model_card
from cpi_ray.models.loading import DEMO_HUB_ID, load_model, load_tokenizer, tokenizer_dir_for
from cpi_ray.run.progress import format_duration
from cpi_ray.run.runtime import worker_resources
from cpi_ray.run.stage import RunContext, Stage

log = logging.getLogger("cpi_ray")

PREDICTIONS_NAME = "predictions.jsonl"

# generate_fn(prompts, max_new_tokens) -> predictions, one per prompt
GenerateFn = Callable[[list[str], int], list[str]]


# ---------------------------------------------------------------------------------- scoring


def score_rows(
    tasks_rows: dict[str, list[dict]], cfg: PipelineConfig, tokenizer: Any, generate_fn: GenerateFn
) -> dict[str, dict]:
    """For each task: format its rows' prompts, generate, score. Returns
    `{task: {"score": mean x 100, "predictions": [...], "row_scores": [...]}}`."""
    out: dict[str, dict] = {}
    for name, rows in tasks_rows.items():
        task = cfg.task(name)
        scorer = get_scorer(task)
        prompts = [format_prompt(tokenizer, task, r) for r in rows]
        preds = generate_fn(prompts, task.max_new_tokens or cfg.evaluate.max_new_tokens)
        if len(preds) != len(rows):
            raise RuntimeError(f"task {name!r}: {len(preds)} generations for {len(rows)} prompts")
        row_scores = [scorer(p, r) for p, r in zip(preds, rows)]
        score = 100.0 * sum(row_scores) / len(row_scores) if row_scores else float("nan")
        out[name] = {"score": score, "predictions": preds, "row_scores": row_scores}
    return out


def constant_answer(
    cfg: PipelineConfig, tasks_rows: Optional[dict[str, list[dict]]] = None
) -> dict[str, dict]:
    """For each task, what answering its commonest gold answer on every eval row scores:
    `{task: {"answer": text, "rows": rows whose answer it is, "score": 0-100}}`. A model at
    that level may have learnt the answer format and nothing else (a counting task whose answer
    is mostly "1")."""
    if tasks_rows is None:
        tasks_rows = {t.name: load_splits(t, cfg.data.split_seed).eval for t in cfg.tasks}
    out = {}
    for name, rows in tasks_rows.items():
        task = cfg.task(name)
        answers = [answer_text(task, r) for r in rows]
        if not answers:
            continue
        counts = Counter(answers)
        common = max(counts, key=lambda a: (counts[a], a))  # ties: one fixed choice
        scorer = get_scorer(task)
        out[name] = {
            "answer": common,
            "rows": counts[common],  # of len(rows): 1 when every answer differs
            "score": 100.0 * sum(scorer(common, r) for r in rows) / len(rows),
        }
    return out


def evaluate_model_dir(
    model_dir: str | Path,
    tasks_rows: dict[str, list[dict]],
    cfg: PipelineConfig,
    tokenizer_dir: Optional[str | Path] = None,
) -> dict[str, dict]:
    """Load one model (and its tokenizer: from `model_dir` when it has one, else
    `tokenizer_dir`) and run `score_rows` with batched greedy generation."""
    model_dir = Path(model_dir)
    tok_dir = tokenizer_dir_for(model_dir, tokenizer_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(tok_dir, cfg.model.trust_remote_code)
    model = load_model(model_dir, cfg.model.dtype, cfg.model.trust_remote_code, device=device)

    def generate(prompts: list[str], max_new_tokens: int) -> list[str]:
        return greedy_generate(model, tok, prompts, max_new_tokens, cfg.evaluate.batch_size, device)

    return score_rows(tasks_rows, cfg, tok, generate)


def score_model(
    model_dir: str | Path,
    tasks_rows: dict[str, list[dict]],
    cfg: PipelineConfig,
    tokenizer_dir: Optional[str | Path] = None,
) -> dict[str, float]:
    """`{task: score}` of one model on the given rows, scores in 0-100."""
    return {t: r["score"] for t, r in evaluate_model_dir(model_dir, tasks_rows, cfg, tokenizer_dir).items()}


def _evaluate_task(
    model_dir: str, tasks_rows: dict[str, list[dict]], cfg: PipelineConfig, tokenizer_dir: str, what: str
) -> dict[str, dict]:
    """Body of the Ray task scoring one model: on the tasks' rows (`what="scores"`) or on the
    lm-eval harness tasks (`what="harness"`)."""
    t0 = time.time()
    if what == "harness":
        return {"harness": run_harness(model_dir, cfg, tokenizer_dir), "wall_s": time.time() - t0}
    result = evaluate_model_dir(model_dir, tasks_rows, cfg, tokenizer_dir)
    return {"tasks": result, "wall_s": time.time() - t0}


# ---------------------------------------------------------------------------------- stage

MODEL_CACHE = "models"  # eval/models/<model>.json: one model's scores, with the key they hold for


def weights_digest(model_dir: Path) -> str:
    """sha256 over a model directory's weight files and index (names and contents)."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).iterdir()):
        if f.suffix == ".safetensors" or f.name.endswith(".index.json") or f.name == "config.json":
            h.update(f.name.encode())
            h.update(file_sha256(f).encode())
    return h.hexdigest()


def _safe(model: str) -> str:
    return model.replace(":", "--")


def _cache_name(model: str, what: str) -> str:
    return f"{_safe(model)}.json" if what == "scores" else f"{_safe(model)}.{what}.json"


def _read_cached(path: Path, key: str) -> Optional[dict]:
    try:
        doc = read_json(path)
    except (FileNotFoundError, ValueError):
        return None
    return doc if doc.get("key") == key else None


def _is_model_dir(d: Path) -> bool:
    return (d / "config.json").is_file()


def _record_exists(ctx: RunContext, stage: str) -> bool:
    return stage in ctx.records or load_record(ctx.path(STAGE_FOLDERS[stage], RECORD_NAME)) is not None


class EvaluateStage(Stage):
    name = "evaluate"
    depends = ("probe",)  # when probes are evaluated; fuse/consolidate when their models exist
    version = 1

    # ------------------------------------------------------------------ models

    def resolve_models(self, ctx: RunContext) -> tuple[dict[str, Path], dict[str, str]]:
        """({model name: directory} to score, {model name: why it is skipped})."""
        models: dict[str, Path] = {}
        skipped: dict[str, str] = {}
        for kind in ctx.cfg.evaluate.models:
            if kind not in MODEL_KINDS:
                raise ValueError(
                    f"evaluate.models: unknown model {kind!r}; allowed: {', '.join(MODEL_KINDS)}"
                )
            stage = MODEL_KINDS[kind]
            if kind == "base":
                models["base"] = ctx.base_model_dir
                continue
            if kind == "probes":
                for t in ctx.task_names():
                    d = ctx.layout.probe(t)
                    if _is_model_dir(d):
                        models[f"probe:{t}"] = d
                    else:
                        skipped[f"probe:{t}"] = f"no model in {d}"
                continue
            if kind == "baselines":
                for mode in ctx.cfg.baselines.modes:
                    d = ctx.layout.baseline(mode)
                    if _record_exists(ctx, stage) and _is_model_dir(d):
                        models[f"baseline:{mode}"] = d
                    else:
                        skipped[f"baseline:{mode}"] = f"no model in {d}"
                continue
            d = ctx.path(kind)
            if not _record_exists(ctx, stage):
                skipped[kind] = f"stage {stage} has not run"
            elif not _is_model_dir(d):
                skipped[kind] = f"no model in {d}"
            else:
                models[kind] = d
        return models, skipped

    def dependencies(self, ctx: RunContext) -> tuple[str, ...]:
        kinds = ctx.cfg.evaluate.models
        deps: list[str] = []
        if "probes" in kinds:
            deps.append("probe")  # required: its absence is reported by fingerprint()
        for kind in ("fused", "final"):
            stage = MODEL_KINDS[kind]
            if kind in kinds and _record_exists(ctx, stage) and _is_model_dir(ctx.path(kind)):
                deps.append(stage)
        if "baselines" in kinds and ctx.cfg.baselines.modes and _record_exists(ctx, "baselines"):
            deps.append("baselines")
        return tuple(deps)

    @staticmethod
    def scoring_slice(cfg: PipelineConfig) -> dict:
        """What a model's per-task scores depend on, besides its weights."""
        return {
            "evaluate": cfg.evaluate.scoring_dump(),
            "tasks": [task_identity(t) for t in cfg.tasks],
            "split_seed": cfg.data.split_seed,
            "dtype": cfg.model.dtype,
        }

    def config_slice(self, cfg: PipelineConfig) -> dict:
        out = self.scoring_slice(cfg)
        if cfg.evaluate.harness_tasks:  # absent otherwise: runs from before the harness resume
            out["harness"] = cfg.evaluate.harness_dump()
        return out

    # ------------------------------------------------------------------ run

    def run(self, ctx: RunContext) -> list[Path]:
        cfg = ctx.cfg
        models, skipped = self.resolve_models(ctx)
        for m, why in skipped.items():
            log.info("evaluate: skipping %s (%s)", m, why)
        if not models:
            raise RuntimeError(
                "evaluate: none of the requested models exists "
                f"({', '.join(f'{m}: {w}' for m, w in skipped.items())})"
            )
        tasks_rows = {t.name: load_splits(t, cfg.data.split_seed).eval for t in cfg.tasks}
        log.info(
            "evaluate: %d model(s) on %s",
            len(models),
            ", ".join(f"{t} ({len(r)} rows)" for t, r in tasks_rows.items()),
        )

        res = worker_resources(cfg, "evaluate")
        remote = ray.remote(_evaluate_task).options(
            num_cpus=res.pop("CPU"),
            num_gpus=res.pop("GPU", 0),
            resources=res,
            # A lost node or a killed worker (system failures; a model's own error is not
            # retried) scores that model again: scoring is deterministic, the others are kept.
            max_retries=2,
            name="cpi-evaluate",
        )
        rows_ref = ray.put(tasks_rows)
        results: dict[str, dict] = {}
        pending: dict[Any, str] = {}
        # Each model's scores are kept as soon as it is scored, under a key of its weights and
        # of what scoring reads: a rerun (a model added, a run interrupted) scores only the rest.
        cache_dir = ctx.path(self.folder, MODEL_CACHE)
        digests = {m: weights_digest(d) for m, d in models.items()}
        jobs = {"scores": self.scoring_slice(cfg)}
        if cfg.evaluate.harness_tasks:
            jobs["harness"] = {"harness": cfg.evaluate.harness_dump(), "dtype": cfg.model.dtype}
        harness: dict[str, dict] = {}
        done_by = {"scores": results, "harness": harness}
        keys = {
            (m, what): stable_hash({"weights": digests[m], "scoring": sl})
            for m in models
            for what, sl in jobs.items()
        }
        queue = []
        for (m, what), key in keys.items():
            cached = _read_cached(cache_dir / _cache_name(m, what), key)
            if cached is not None:
                done_by[what][m] = cached
                log.info(
                    "evaluate: %s already %s (its weights unchanged), kept",
                    m,
                    "scored" if what == "scores" else "run through the harness",
                )
            else:
                queue.append((m, what))
        total, t_start = len(queue), time.time()
        while queue or pending:
            while queue and len(pending) < cfg.evaluate.num_workers:
                m, what = queue.pop(0)
                ref = remote.remote(str(models[m]), rows_ref, cfg, str(ctx.base_model_dir), what)
                pending[ref] = (m, what)
            done, _ = ray.wait(list(pending), num_returns=1)
            m, what = pending.pop(done[0])
            try:
                done_by[what][m] = ray.get(done[0])
            except Exception as e:
                for ref in pending:
                    ray.cancel(ref)
                raise RuntimeError(
                    f"evaluate: {'scoring' if what == 'scores' else 'the harness on'}"
                    f" model {m!r} ({models[m]}) failed: {e}"
                ) from e
            write_json(cache_dir / _cache_name(m, what), {"key": keys[m, what], **done_by[what][m]})
            r = done_by[what][m]
            finished = total - len(queue) - len(pending)
            eta = (time.time() - t_start) / finished * (total - finished)
            progress = f"{finished}/{total}, eta {format_duration(eta)}"
            if what == "scores":
                log.info(
                    "evaluate: %s scored (%s) in %.1fs: %s",
                    m,
                    progress,
                    r["wall_s"],
                    ", ".join(f"{t}={x['score']:.1f}" for t, x in r["tasks"].items()),
                )
            else:
                log.info(
                    "evaluate: %s through the harness (%s) in %.1fs: %s",
                    m,
                    progress,
                    r["wall_s"],
                    ", ".join(
                        f"{t} {k}={v:.4f}" for t, x in r["harness"].items() for k, v in x["metrics"].items()
                    ),
                )

        order = list(models)  # config order, not completion order
        scores = {
            "tasks": list(tasks_rows),
            "models": {m: str(models[m]) for m in order},
            "scores": {m: {t: results[m]["tasks"][t]["score"] for t in tasks_rows} for m in order},
            "n_eval": {t: len(r) for t, r in tasks_rows.items()},
            # The standard error of each score over its eval rows (the rows are a sample).
            "stderr": {
                m: {t: 100.0 * mean_se(results[m]["tasks"][t]["row_scores"])[1] for t in tasks_rows}
                for m in order
            },
            "skipped": skipped,
            "constant_answer": constant_answer(cfg, tasks_rows),
        }
        out_dir = ctx.path(self.folder)
        write_json(ctx.layout.eval_scores, scores)
        with atomic_file(out_dir / PREDICTIONS_NAME, "w") as f:
            for m in order:
                for t, rows in tasks_rows.items():
                    r = results[m]["tasks"][t]
                    task = cfg.task(t)
                    for i, row in enumerate(rows):
                        f.write(
                            json.dumps(
                                {
                                    "model": m,
                                    "task": t,
                                    "index": i,
                                    "prediction": r["predictions"][i],
                                    "answer": answer_text(task, row),
                                    "score": r["row_scores"][i],
                                }
                            )
                            + "\n"
                        )
        outputs = [
            ctx.layout.eval_scores,
            out_dir / PREDICTIONS_NAME,
            *(cache_dir / _cache_name(m, what) for m, what in keys),
        ]
        if harness:
            write_json(
                out_dir / HARNESS_NAME,
                {
                    "tasks": list(cfg.evaluate.harness_tasks),
                    "backend": backend(cfg),
                    "num_fewshot": cfg.evaluate.harness_num_fewshot,
                    "limit": cfg.evaluate.harness_limit,
                    "models": {m: harness[m]["harness"] for m in order},
                },
            )
            outputs.append(out_dir / HARNESS_NAME)
        else:  # a harness table of an earlier run with other settings would mislead
            (out_dir / HARNESS_NAME).unlink(missing_ok=True)
        outputs += self._write_cards(ctx, models, scores, harness)

        report = build_report(ctx.run_dir)
        log.info("evaluate: report written to %s", report / "index.html")
        return [*outputs, report]

    @staticmethod
    def _write_cards(
        ctx: RunContext, models: dict[str, Path], scores: dict, harness: dict[str, dict]
    ) -> list[Path]:
        """A model card (`README.md`, with this evaluation's scores) in every scored model's
        directory but the base model's, which is not the run's to write into."""
        source = ctx.cfg.model.source
        base = {"demo": DEMO_HUB_ID, "tiny": ctx.base_model_id}.get(source, source)
        written = []
        for m, d in models.items():
            if m == "base":
                continue
            card = model_card(
                ctx.cfg,
                m,
                base,
                scores["scores"][m],
                scores["stderr"][m],
                scores["n_eval"],
                harness.get(m, {}).get("harness"),
            )
            with atomic_file(Path(d) / CARD_NAME, "w") as f:
                f.write(card)
            written.append(Path(d) / CARD_NAME)
        return written

    def summary(self, ctx: RunContext) -> Optional[str]:
        try:
            data = read_json(ctx.layout.eval_scores)
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return format_table(data)


def format_table(data: dict) -> str:
    """Plain text table: one row per model, one column per task, then the average and the worst
    task (the two numbers the seesaw shows up in)."""
    tasks: Sequence[str] = data["tasks"]
    header = ["model", *tasks, "avg", "worst"]
    rows = []
    for m, per in data["scores"].items():
        vals = [per[t] for t in tasks]
        rows.append([m, *(f"{v:.1f}" for v in vals), f"{sum(vals) / len(vals):.1f}", f"{min(vals):.1f}"])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    n = ", ".join(f"{t}={k}" for t, k in data.get("n_eval", {}).items())
    out = [
        f"evaluation: scores 0-100 on held-out rows ({n})",
        line(header),
        line(["-" * w for w in widths]),
        *(line(r) for r in rows),
    ]
    const = data.get("constant_answer") or {}
    if const:
        out.append(
            "the commonest gold answer on every row: "
            + ", ".join(f"{t}={c['score']:.1f}" for t, c in const.items())
        )
    for m, why in data.get("skipped", {}).items():
        out.append(f"skipped {m}: {why}")
    return "\n".join(out)
