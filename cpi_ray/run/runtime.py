"""The Ray runtime every stage expects: joining or starting Ray (`connect_ray`), the environment
of a process that fits Ray Train trainers (`train_env`), and the resources one worker, actor or
task of a stage asks for (`worker_resources`)."""

from __future__ import annotations

import logging
import os
import socket
from typing import Optional

from cpi_ray.config.schema import PipelineConfig

# Imported where used: ray (seconds to import; the CLI imports this module at start-up).

log = logging.getLogger("cpi_ray")

TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_START_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def train_env() -> dict[str, str]:
    """Environment for a process that calls `TorchTrainer.fit` (Ray Train reads these there):
    the controller polls reports every 0.5 s instead of 2 s, and a trainer that finds no free
    resources waits an hour for them (queued behind other trainers on a small cluster, or while
    the autoscaler adds nodes) instead of failing start-up after a minute. Values already set
    in the environment win."""
    return {
        TRAIN_POLL_ENV: os.environ.get(TRAIN_POLL_ENV, "0.5"),
        TRAIN_START_ENV: os.environ.get(TRAIN_START_ENV, "3600"),
    }


def quiet_train_reports() -> None:
    """In a Ray Train worker: drop Ray's INFO line that prints every `ray.train.report` result
    whole (each job logs its own step line instead). Ray 2.60 logs it from
    `logging.getLogger(__file__)` in `ray/train/v2/_internal/execution/context.py`, a name that
    `LoggingConfig(log_level=...)` does not reach (it filters `ray.train.*` loggers only); ray is
    pinned to 2.60.* in pyproject.toml."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _train_resources(tc) -> dict[str, float]:
    res = {"CPU": float(tc.cpus_per_worker)}
    if tc.use_gpu:
        res["GPU"] = 1.0
    res.update(tc.custom_resources)
    return res


def worker_resources(cfg: PipelineConfig, stage: str) -> dict[str, float]:
    """The Ray resources one worker (trainers) or actor/task (the others) of `stage` asks for:
    the single place that turns the config into a resource request."""
    if stage in ("probe", "consolidate"):
        return _train_resources(getattr(cfg, stage))
    if stage in ("regions", "fuse"):
        sc = getattr(cfg, stage)
        return {"CPU": float(sc.cpus_per_actor), **sc.custom_resources}
    if stage == "evaluate":
        ec = cfg.evaluate
        res = {"CPU": float(ec.cpus_per_worker)}
        if ec.use_gpu:
            res["GPU"] = 1.0
        return {**res, **ec.custom_resources}
    if stage == "groups":
        return {}
    raise KeyError(stage)


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast, naming the address, when nothing answers there: `ray.init` would otherwise
    retry for minutes."""
    host_port = address.split("://", 1)[-1]
    if address == "auto" or ":" not in host_port:
        return
    host, _, port = host_port.rpartition(":")
    if not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"ray.address {address!r}: no Ray cluster answers there ({e})") from None


GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"  # read by `ray.init` when it starts a local Ray


def free_port() -> int:
    """A TCP port nothing listens on now (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def start_local_ray(runtime_env: Optional[dict] = None, **init_kwargs) -> None:
    """`ray.init` of a new local Ray whose workers know its address. Parts of Ray inside the
    cluster (Ray Train's placement-group cleaner, the state API) look their cluster up without
    an address and fail when another Ray runs on this machine, so the GCS port is fixed before
    start-up and passed to the workers as RAY_ADDRESS. The dashboard stays on (Ray's default):
    Ray Train needs it to start more than one worker group."""
    import ray

    port = free_port()
    address = f"{ray.util.get_node_ip_address()}:{port}"
    env = dict(runtime_env or {})
    env["env_vars"] = {**env.get("env_vars", {}), "RAY_ADDRESS": address}
    before = os.environ.get(GCS_PORT_ENV)
    os.environ[GCS_PORT_ENV] = str(port)
    try:
        ray.init(runtime_env=env, **init_kwargs)
    finally:
        if before is None:
            os.environ.pop(GCS_PORT_ENV, None)
        else:
            os.environ[GCS_PORT_ENV] = before


def connect_ray(cfg: PipelineConfig) -> str:
    """Join the cluster when there is one (`ray.address`, RAY_ADDRESS, or a cluster started with
    `ray start` on this machine), else start a local Ray for this process. Never another
    process's embedded Ray: a run that joined one would run in that process's environment and
    die with it. Returns a description for the log."""
    import ray

    # Trainers fitted from this process (consolidation, baselines) read these here.
    os.environ.update(train_env())
    if ray.is_initialized():
        return "already connected"
    env = (
        {"env_vars": {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "")}}
        if os.environ.get("DS_ACCELERATOR")
        else None
    )
    address = cfg.ray.address or ("auto" if os.environ.get("RAY_ADDRESS") else None)
    if address is not None and address != "local":
        _check_reachable(address)
        ray.init(address=address, namespace=cfg.ray.namespace, runtime_env=env, log_to_driver=True)
        return f"cluster at {address}"
    if address is None:
        # Only `ray start` records its cluster as this machine's current one; address="auto"
        # would join any Ray found running here, embedded ones included.
        from ray._private.services import find_bootstrap_address

        started = find_bootstrap_address(None)
        if started:
            try:
                ray.init(address=started, namespace=cfg.ray.namespace, runtime_env=env)
                return f"cluster started with `ray start` at {started}"
            except ConnectionError as e:
                log.warning(
                    "the cluster `ray start` recorded at %s does not answer (%s); starting a local Ray",
                    started,
                    e,
                )

    def start_local() -> None:
        start_local_ray(num_cpus=cfg.ray.num_cpus, namespace=cfg.ray.namespace, runtime_env=env)

    try:
        start_local()
    except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
        # On an overloaded machine the local raylet can miss Ray's start-up deadline; one more
        # try after cleaning up usually gets through.
        if "timed out during startup" not in str(e):
            raise
        log.warning("local Ray did not start in time (%s); trying once more", e)
        ray.shutdown()
        start_local()
    return "embedded local Ray"
