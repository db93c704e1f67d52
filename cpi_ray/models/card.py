"""Model cards: the `README.md` of every model directory the pipeline scores, as the hub shows it
(YAML metadata, then what the model is, how it was made, on which tasks, and its scores)."""

from __future__ import annotations

from typing import Any, Optional

import yaml

from cpi_ray.config.schema import PipelineConfig

CARD_NAME = "README.md"
PAPER = "https://arxiv.org/abs/2508.21741"


def _made_how(cfg: PipelineConfig, model: str) -> tuple[str, dict[str, Any]]:
    """What the model is, in one sentence, and the config sections that made it."""
    kind, _, detail = model.partition(":")
    if kind == "base":
        return "The base model, unchanged (scored for reference).", {}
    if kind == "probe":
        return (
            f"A probe: a short SFT of the base model on task `{detail}` alone, from which "
            "CPI-FT reads that task's core parameters.",
            {"probe": cfg.probe},
        )
    if kind == "fused":
        return (
            "The fused model of CPI-FT: each task's core parameters transplanted from its "
            "probe, the rest merged by SLERP, before consolidation.",
            {"regions": cfg.regions, "groups": cfg.groups, "fuse": cfg.fuse},
        )
    if kind == "final":
        return (
            "The CPI-FT model: the fused model trained group by group on "
            f"{cfg.consolidate.data} task data, earlier groups' cores frozen.",
            {"regions": cfg.regions, "groups": cfg.groups, "fuse": cfg.fuse, "consolidate": cfg.consolidate},
        )
    return (
        f"A baseline (`{detail}`): the base model fine-tuned without parameter isolation.",
        {"baselines": cfg.baselines},
    )


def model_card(
    cfg: PipelineConfig,
    model: str,
    base_model: str,
    scores: dict[str, float],
    stderr: dict[str, float],
    n_eval: dict[str, int],
    harness: Optional[dict] = None,
) -> str:
    meta: dict[str, Any] = {
        "base_model": base_model,
        "library_name": "transformers",
        "tags": ["cpi-ft", "cpi-ray", "parameter-isolation"],
    }
    hub = sorted(
        {
            t.hub_id
            for t in cfg.tasks
            if t.hub_id and "/" in t.hub_id and not t.hub_id.startswith((".", "/", "~"))
        }
    )
    if hub:
        meta["datasets"] = hub
    what, sections = _made_how(cfg, model)
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {cfg.storage.run_name}: {model}",
        "",
        f"{what} Base model: `{base_model}`. Made with cpi-ray, Core Parameter Isolation "
        f"Fine-Tuning ([CPI-FT]({PAPER})).",
        "",
        "## Tasks",
        "",
        "| task | source | format | score (0-100) | ± SE | n |",
        "|---|---|---|---|---|---|",
    ]
    for t in cfg.tasks:
        source = (
            t.path
            and f"file {t.path.rsplit('/', 1)[-1]}"
            or (f"hub {t.hub_id}" if t.hub_id else f"reasoning-gym {t.reasoning_gym.name}")
        )
        s = scores.get(t.name)
        lines.append(
            f"| {t.name} | {source} | {t.format} | "
            f"{'' if s is None else f'{s:.1f}'} | "
            f"{'' if t.name not in stderr else f'{stderr[t.name]:.1f}'} | "
            f"{n_eval.get(t.name, '')} |"
        )
    lines += [
        "",
        "Scores are greedy generations on held-out rows of each task, scored by the "
        "task's scorer; ± is the standard error over those rows.",
    ]
    if harness:
        lines += ["", "## lm-evaluation-harness", ""]
        for task, r in harness.items():
            for metric, v in r["metrics"].items():
                se = r.get("stderr", {}).get(metric)
                lines.append(
                    f"- {task} {metric}: {v:.4f}"
                    + (f" ± {se:.4f}" if isinstance(se, float) else "")
                    + (f" (n={r['n']})" if r.get("n") else "")
                )
    if sections:
        dump = {k: v.model_dump(mode="json", exclude={"custom_resources"}) for k, v in sections.items()}
        lines += ["", "## Settings", "", "```yaml", yaml.safe_dump(dump, sort_keys=False).rstrip(), "```"]
    return "\n".join(lines) + "\n"
