"""The job path end to end: a real two-node Ray (a head and a second node joined with
`ray start --address`, both on loopback, token authentication on), the pipeline submitted with
`ray job submit --working-dir .`, its outputs read back, and proof that work ran on both nodes.

Nothing here touches other Ray instances on the machine: each node has its own temp dir and
ports, and is stopped by signalling the `ray start --block` process that owns it (never
`ray stop`, which kills every Ray process of the user).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _ray_cli() -> str | None:
    # The CLI installed next to this interpreter first: the one matching the imported ray.
    here = Path(sys.executable).with_name("ray")
    return str(here) if here.is_file() else shutil.which("ray")


RAY = _ray_cli()


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class LoopbackCluster:
    """A head and one worker node, each a `ray start --block` child in its own session."""

    def __init__(self, root: Path, head_cpus: int, worker_cpus: int):
        self.root = root
        self.token_path = root / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(
            {
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                "RAY_USAGE_STATS_ENABLED": "0",
                # Stop on SIGTERM at once instead of draining the node first (up to minutes).
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                "RAY_TRAIN_V2_ENABLED": "1",
                "DS_ACCELERATOR": "cpu",
                "TOKENIZERS_PARALLELISM": "false",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            }
        )
        self.gcs_port, self.dash_port, self.client_port = _free_ports(3)
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"
        self.procs: list[subprocess.Popen] = []
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus

    def _node_args(self, name: str) -> list[str]:
        agent, agent_grpc, rt_env, metrics, nm, om = _free_ports(6)
        tmp = self.root / name
        tmp.mkdir()
        # No --node-ip-address: Ray replaces a loopback one with the machine's address anyway.
        # What faces clients, the dashboard and job API, is bound to 127.0.0.1 on the head.
        return [
            "--block",
            f"--temp-dir={tmp}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={rt_env}",
            f"--metrics-export-port={metrics}",
            f"--node-manager-port={nm}",
            f"--object-manager-port={om}",
            "--disable-usage-stats",
        ]

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.log", "wb")
        self.procs.append(
            subprocess.Popen(
                [RAY, "start", *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def start(self) -> None:
        self._spawn(
            "head",
            [
                "--head",
                f"--port={self.gcs_port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dash_port}",
                f"--ray-client-server-port={self.client_port}",
                f"--num-cpus={self.head_cpus}",
                '--resources={"cpi_test_head": 1}',
                *self._node_args("head"),
            ],
        )
        self._wait(lambda: len(self.nodes()) == 1, "head node")
        self._spawn(
            "worker",
            [
                f"--address=127.0.0.1:{self.gcs_port}",
                f"--num-cpus={self.worker_cpus}",
                '--resources={"cpi_test_worker": 1}',
                *self._node_args("worker"),
            ],
        )
        self._wait(lambda: len(self.nodes()) == 2, "second node")

    def _wait(self, ready, what: str, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(
                        f"ray start exited ({p.returncode}) while waiting for {what}:\n{self.logs()}"
                    )
            try:
                if ready():
                    return
            except (subprocess.CalledProcessError, json.JSONDecodeError):
                pass
            time.sleep(1)
        raise TimeoutError(f"{what} not up after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.root.glob("*.log")))

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=REPO
        )

    def state(self, kind: str, *filters: str) -> list[dict]:
        args = ["list", kind, "--address", self.dashboard, "--format", "json", "--detail", "--limit", "10000"]
        for f in filters:
            args += ["--filter", f]
        r = self.cli(*args)
        r.check_returncode()
        return json.loads(r.stdout)

    def nodes(self) -> list[dict]:
        return [n for n in self.state("nodes") if n["state"] == "ALIVE"]

    def stop(self) -> None:
        # SIGTERM to `ray start --block` makes it shut down the processes of its own node.
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        # Any process still naming this cluster's temp dir belongs to it (workers, agents).
        import psutil

        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(str(self.root) in a for a in proc.info["cmdline"] or ()):
                    proc.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass


@pytest.fixture
def loopback_cluster():
    if RAY is None:
        pytest.skip("the `ray` command line is not installed")
    # A short root: Ray's unix socket paths live under it and must stay below ~107 bytes.
    root = Path(tempfile.mkdtemp(prefix="cpi-"))
    # One CPU per node: a 2-worker probe cannot fit on either node alone, so every probe's
    # worker group spans both nodes.
    cluster = LoopbackCluster(root, head_cpus=1, worker_cpus=1)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_job_submit_runs_on_both_nodes(loopback_cluster):
    c = loopback_cluster
    run_dir = c.root / "run"
    job_id = f"cpi-test-{secrets.token_hex(4)}"
    # One task of the smoke config: the two one-CPU nodes hold one 2-worker probe at a time, and
    # every trainer costs a worker-group start-up, so more tasks only add time, not coverage.
    entry = [
        "python",
        "jobs/cpi_pipeline.py",
        "--config",
        "jobs/configs/smoke.yaml",
        "--run-dir",
        str(run_dir),
        "--stages",
        "probe,evaluate",
        "--set",
        "tasks=[{name: reverse, path: jobs/data/reverse.jsonl, eval_size: 24}]",
        "--set",
        f"storage.path={c.root / 'storage'}",
        "--set",
        "probe.steps=4",
        "--set",
        "probe.num_workers=2",
        "--set",
        "evaluate.models=[base,probes]",
        "--set",
        "evaluate.num_workers=2",
    ]
    submit = c.cli(
        "job",
        "submit",
        "--address",
        c.dashboard,
        "--submission-id",
        job_id,
        "--working-dir",
        ".",
        "--",
        *entry,
        timeout=420,
    )
    status = c.cli("job", "status", "--address", c.dashboard, job_id)
    assert "succeeded" in status.stdout.lower(), (
        f"job did not succeed:\n{status.stdout}\n{status.stderr}\n--- submit output ---\n"
        f"{submit.stdout[-6000:]}\n{submit.stderr[-3000:]}\n--- nodes ---\n{c.logs()}"
    )

    # The outputs the two stages promise, written where the job was told to write them.
    probe = json.loads((run_dir / "probes" / "reverse" / "probe.json").read_text())
    assert probe["task"] == "reverse" and probe["steps"] == 4
    assert (run_dir / "probes" / "reverse" / "model.safetensors.index.json").is_file()
    scores = json.loads((run_dir / "eval" / "scores.json").read_text())
    assert set(scores["models"]) == {"base", "probe:reverse"}
    for model_scores in scores["scores"].values():
        assert set(model_scores) == {"reverse"} and 0 <= model_scores["reverse"] <= 100
    assert (run_dir / "probes" / "stage.json").is_file() and (run_dir / "eval" / "stage.json").is_file()

    # Which node is which, by the custom resource each was started with.
    node_of = {}
    for n in c.state("nodes"):
        res = n.get("resources_total") or {}
        node_of[n["node_id"]] = (
            "head" if "cpi_test_head" in res else "worker" if "cpi_test_worker" in res else "?"
        )
    assert sorted(node_of.values()) == ["head", "worker"]
    # Ray Train's workers are actors: with one CPU per node, the 2-worker probe spans both.
    train_workers = [a for a in c.state("actors") if a["class_name"] == "RayTrainWorker"]
    assert len(train_workers) >= 2, train_workers
    assert {node_of[a["node_id"]] for a in train_workers} == {"head", "worker"}
