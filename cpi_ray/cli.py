"""Command line: `cpi-ray run --config ...` (same as jobs/cpi_pipeline.py),
`cpi-ray check --config ...` (the data, tokenizer and storage, in seconds, before a cluster spends
anything) and `cpi-ray plan --config ...` (the resources and memory each stage needs)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Optional

import yaml

from cpi_ray.config.load import ConfigError, load_config
from cpi_ray.config.stages import STAGES
from cpi_ray.io.lease import RunBusyError, run_lease
from cpi_ray.pipeline.check import CheckError, check_config
from cpi_ray.pipeline.plan import PlanError, build_plan, plan_json
from cpi_ray.pipeline.runner import resolve_run_dir, run_pipeline
from cpi_ray.run.runtime import connect_ray
from cpi_ray.tune.space import SpaceError, check_space

EXIT_CONFIG = 2
EXIT_CHECK = 3


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def _add_config_args(p: argparse.ArgumentParser, run_dir: bool, stages: bool, set_example: str) -> None:
    p.add_argument("--config", required=True, help="pipeline YAML")
    if run_dir:
        p.add_argument("--run-dir", help="run directory (default: storage.path/storage.run_name)")
    if stages:
        p.add_argument("--stages", help=f"comma-separated subset of: {','.join(STAGES)}")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. --set {set_example} (repeatable)",
    )


def add_run_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p, run_dir=True, stages=True, set_example="regions.p=5")
    p.add_argument(
        "--tune",
        action="store_true",
        help="run the Ray Tune search of the config's `tune` section instead of one "
        "pipeline run (also when tune.enabled is true)",
    )


def _error(problem: object, code: int) -> int:
    """The command's last word: one line on stderr, and its exit code."""
    print(f"error: {problem}", file=sys.stderr)
    return code


def config_from_args(args: argparse.Namespace):
    """The validated config of `--config`, `--set` and `--stages` (raises ConfigError)."""
    overrides = list(args.overrides)
    if getattr(args, "stages", None):
        overrides.append(f"stages=[{args.stages}]")
    return load_config(args.config, overrides)


def run_command(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        return _error(e, EXIT_CONFIG)
    _setup_logging()
    log = logging.getLogger("cpi_ray")
    run_dir = resolve_run_dir(cfg, args.run_dir)
    try:
        # Before Ray starts: a bad row or field costs seconds, not a cluster's start-up.
        report = check_config(cfg, run_dir)
    except CheckError as e:
        return _error(e, EXIT_CHECK)
    log.info("check passed:\n%s", report.render())
    tuning = getattr(args, "tune", False) or cfg.tune.enabled
    if tuning:
        try:
            check_space(cfg)
        except SpaceError as e:
            return _error(e, EXIT_CONFIG)
    with contextlib.ExitStack() as held:
        try:
            # Before Ray starts: a second job on this run directory stops here, writing nothing.
            held.enter_context(run_lease(run_dir))
        except RunBusyError as e:
            return _error(e, 1)
        return _run(cfg, run_dir, tuning, log)


def _run(cfg, run_dir, tuning: bool, log: logging.Logger) -> int:
    try:
        where = connect_ray(cfg)
        log.info("Ray: %s", where)
        if tuning:
            from cpi_ray.tune.search import run_tune  # torch and Ray Tune: seconds, for --tune only

            result = run_tune(cfg, run_dir)
        else:
            result = run_pipeline(cfg, run_dir)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the job's last word must be the reason it failed
        log.debug("failure", exc_info=True)
        return _error(f"{type(e).__name__}: {e}", 1)
    print()
    print(result.render())
    return 0


def add_plan_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p, run_dir=False, stages=True, set_example="consolidate.num_workers=16")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def plan_command(args: argparse.Namespace) -> int:
    """Print the plan; touches neither Ray nor the network."""
    try:
        cfg = config_from_args(args)
        plan = build_plan(cfg, str(args.config))
    except (ConfigError, PlanError) as e:
        return _error(e, EXIT_CONFIG)
    print(plan_json(plan) if args.json else plan.render())
    return 0


def check_command(args: argparse.Namespace) -> int:
    """Print the resolved config and what `check_config` found; exit non-zero on a problem."""
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        return _error(e, EXIT_CONFIG)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_dir = resolve_run_dir(cfg, args.run_dir)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip())
    print()
    try:
        report = check_config(cfg, run_dir)
    except CheckError as e:
        return _error(e, EXIT_CHECK)
    print(report.render())
    print("ok")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="cpi-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_args(sub.add_parser("run", help="run the pipeline"))
    add_plan_args(sub.add_parser("plan", help="print each stage's resources and memory per worker"))
    check = sub.add_parser("check", help="check the data, tokenizer and storage before a run")
    _add_config_args(check, run_dir=True, stages=False, set_example="tasks.0.eval_size=50")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run_command(args)
    if args.command == "plan":
        return plan_command(args)
    if args.command == "check":
        return check_command(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
