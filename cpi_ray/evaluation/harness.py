"""lm-evaluation-harness on the models the evaluate stage scores (`evaluate.harness_tasks`).

The benchmarks users compare models on (GSM8K, MMLU, ...) or their own task YAMLs
(`evaluate.harness_include_path`), run by `lm_eval.simple_evaluate` on the hf backend, or vLLM
when it is installed and the stage has a GPU. lm-eval is an optional extra (`cpi-ray[harness]`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Optional

from cpi_ray.config.schema import PipelineConfig

# Imported where used: lm_eval (an optional extra), torch, cpi_ray.models (slow: the CLI imports this module).

HARNESS_NAME = "harness.json"
_STDERR = "_stderr,"


def harness_missing() -> Optional[str]:
    """Why the harness cannot run here, or None."""
    if importlib.util.find_spec("lm_eval") is None:
        return "evaluate.harness_tasks needs lm-evaluation-harness: pip install 'cpi-ray[harness]'"
    return None


def task_manager(cfg: PipelineConfig):
    from lm_eval.tasks import TaskManager

    include = cfg.evaluate.harness_include_path
    return TaskManager(include_path=include) if include else TaskManager()


def unknown_tasks(cfg: PipelineConfig) -> list[str]:
    """The names in `evaluate.harness_tasks` that lm-eval (with the include path) does not know."""
    known = set(task_manager(cfg).all_tasks)
    return [t for t in cfg.evaluate.harness_tasks if t not in known]


def backend(cfg: PipelineConfig) -> str:
    use_vllm = cfg.evaluate.use_gpu and importlib.util.find_spec("vllm") is not None
    return "vllm" if use_vllm else "hf"


def run_harness(model_dir: str | Path, cfg: PipelineConfig, tokenizer_dir: str | Path) -> dict:
    """`{task: {"metrics": {name: value}, "stderr": {name: value}, "n": rows}}` of one model,
    metric names as lm-eval writes them (`exact_match,strict-match`)."""
    import lm_eval
    import torch

    from cpi_ray.models.loading import tokenizer_dir_for

    ev = cfg.evaluate
    kind = backend(cfg)
    args: dict[str, Any] = {
        "pretrained": str(model_dir),
        "tokenizer": str(tokenizer_dir_for(model_dir, tokenizer_dir)),
        "dtype": cfg.model.dtype,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    out = lm_eval.simple_evaluate(
        model=kind,
        model_args=args,
        tasks=list(ev.harness_tasks),
        task_manager=task_manager(cfg),
        num_fewshot=ev.harness_num_fewshot,
        limit=ev.harness_limit,
        batch_size=ev.batch_size,
        device="cuda" if torch.cuda.is_available() else "cpu",
        log_samples=False,
    )
    return parse_results(out)


def parse_results(out: dict) -> dict:
    results: dict[str, dict] = {}
    for task, metrics in out["results"].items():
        values = {
            k: v for k, v in metrics.items() if "," in k and _STDERR not in k and isinstance(v, (int, float))
        }
        stderr = {
            k.replace(_STDERR, ","): v
            for k, v in metrics.items()
            if _STDERR in k and isinstance(v, (int, float))
        }
        n = out.get("n-samples", {}).get(task, {}).get("effective")
        results[task] = {"metrics": values, "stderr": stderr, "n": n}
    return results


def harness_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    """A table of `eval/harness.json`: one row per model, one column per task and metric, each
    cell the value ± its standard error as lm-eval reports them."""
    models = doc.get("models", {})
    cols: list[tuple[str, str]] = []
    for per in models.values():
        for task, r in per.items():
            for metric in r["metrics"]:
                if (task, metric) not in cols:
                    cols.append((task, metric))
    header = ["model", *(f"{t} {m} (n={_n(models, t)})" for t, m in cols)]
    rows = []
    for model, per in models.items():
        cells = [model]
        for t, m in cols:
            r = per.get(t, {})
            v, se = r.get("metrics", {}).get(m), r.get("stderr", {}).get(m)
            cells.append(
                "" if v is None else f"{v:.4f}" + ("" if not isinstance(se, float) else f" ± {se:.4f}")
            )
        rows.append(cells)
    return header, rows


def _n(models: dict, task: str) -> Any:
    return next((per[task].get("n") for per in models.values() if task in per), "?")
