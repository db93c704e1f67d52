"""The job path end to end: a real two-node Ray (a head and a second node joined with
`ray start --address`, both on loopback, token authentication on), the pipeline submitted with
`ray job submit --working-dir .`, its outputs read back, and proof that work ran on both nodes;
then the second node lost (every process of it killed, as when a spot instance is reclaimed)
mid-probe and, after a replacement node joins, mid-evaluate: the run completes with the outputs
of a run that lost nothing.

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
                # A lost node (its health check refused) is declared dead after ~5 s instead of
                # ~15 s; a slow answer from a node of a busy machine still has 10 s.
                "RAY_health_check_period_ms": "1000",
                "RAY_health_check_timeout_ms": "10000",
                "RAY_health_check_failure_threshold": "5",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            }
        )
        self.gcs_port, self.dash_port, self.client_port = _free_ports(3)
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"
        self.procs: dict[str, subprocess.Popen] = {}  # node name -> its `ray start --block`
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
        self.procs[name] = subprocess.Popen(
            [RAY, "start", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
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
                '--resources={"cpi_test_head": 1, "cpi_node_head": 1}',
                *self._node_args("head"),
            ],
        )
        self._wait(lambda: len(self.nodes()) == 1, "head node")
        self.add_node("worker")

    def add_node(self, name: str) -> None:
        """Join one more node (`cpi_test_worker` resource, `worker_cpus` CPUs) named `name`."""
        self._spawn(
            name,
            [
                f"--address=127.0.0.1:{self.gcs_port}",
                f"--num-cpus={self.worker_cpus}",
                json.dumps({"cpi_test_worker": 1, f"cpi_node_{name}": 1}, separators=(",", ":")).join(
                    ["--resources=", ""]
                ),
                *self._node_args(name),
            ],
        )
        self._wait(lambda: name in self.node_names().values(), f"node {name}")

    def kill_node(self, name: str) -> int:
        """SIGKILL every process of node `name` (its `ray start`, raylet, agents and workers: they
        all name the node's temp dir), as a machine that vanishes. Returns how many."""
        import psutil

        owner = self.procs.pop(name)
        tmp = str(self.root / name)
        killed = 0
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(
                    a == tmp or a.endswith(f"={tmp}") or f"{tmp}/" in a for a in proc.info["cmdline"] or ()
                ):
                    proc.kill()
                    killed += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        owner.wait(timeout=30)
        return killed

    def node_names(self) -> dict[str, str]:
        """Alive node id -> the name it was started under (its `cpi_node_<name>` resource)."""
        out = {}
        for n in self.nodes():
            for r in n.get("resources_total") or {}:
                if r.startswith("cpi_node_"):
                    out[n["node_id"]] = r[len("cpi_node_") :]
        return out

    def _wait(self, ready, what: str, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in self.procs.values():
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
        if r.stdout.strip() == "No resource in the cluster":  # what `ray list` prints for none
            return []
        return json.loads(r.stdout)

    def nodes(self) -> list[dict]:
        return [n for n in self.state("nodes") if n["state"] == "ALIVE"]

    def stop(self) -> None:
        # SIGTERM to `ray start --block` makes it shut down the processes of its own node.
        for p in reversed(self.procs.values()):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs.values()):
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


def pipeline_entry(c: LoopbackCluster, run_dir: Path, *sets: str) -> list[str]:
    """The job's entrypoint: probe and evaluate of one smoke task, `sets` overriding the rest.

    One task: the two one-CPU nodes hold one 2-worker probe at a time, and every trainer costs a
    worker-group start-up, so more tasks only add time, not coverage."""
    overrides = [
        "tasks=[{name: reverse, path: jobs/data/reverse.jsonl, eval_size: 24}]",
        f"storage.path={c.root / 'storage'}",
        "probe.steps=4",
        "probe.num_workers=2",
        "evaluate.models=[base,probes]",
        "evaluate.num_workers=2",
        *sets,
    ]
    entry = ["python", "jobs/cpi_pipeline.py", "--config", "jobs/configs/smoke.yaml"]
    entry += ["--run-dir", str(run_dir), "--stages", "probe,evaluate"]
    for o in overrides:
        entry += ["--set", o]
    return entry


def submit(
    c: LoopbackCluster, entry: list[str], wait: bool = True
) -> tuple[str, subprocess.CompletedProcess]:
    job_id = f"cpi-test-{secrets.token_hex(4)}"
    args = ["job", "submit", "--address", c.dashboard, "--submission-id", job_id, "--working-dir", "."]
    r = c.cli(*args, *([] if wait else ["--no-wait"]), "--", *entry, timeout=420)
    return job_id, r


def assert_succeeded(c: LoopbackCluster, job_id: str, submit_out: subprocess.CompletedProcess) -> None:
    status = c.cli("job", "status", "--address", c.dashboard, job_id)
    logs = c.cli("job", "logs", "--address", c.dashboard, job_id).stdout
    assert "succeeded" in status.stdout.lower(), (
        f"job did not succeed:\n{status.stdout}\n{status.stderr}\n--- submit output ---\n"
        f"{submit_out.stdout[-3000:]}\n{submit_out.stderr[-3000:]}\n--- job logs ---\n{logs[-8000:]}"
        f"\n--- nodes ---\n{c.logs()}"
    )


def test_job_submit_runs_on_both_nodes(loopback_cluster):
    c = loopback_cluster
    run_dir = c.root / "run"
    job_id, out = submit(c, pipeline_entry(c, run_dir))
    assert_succeeded(c, job_id, out)

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


def _wait_for(cond, what: str, c: LoopbackCluster, job_id: str, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        status = c.cli("job", "status", "--address", c.dashboard, job_id).stdout.lower()
        if "succeeded" in status or "failed" in status or "stopped" in status:
            got = cond()  # it may have come true since it was last asked
            if got:
                return got
            logs = c.cli("job", "logs", "--address", c.dashboard, job_id).stdout
            raise AssertionError(f"job ended before {what}:\n{status}\n{logs[-6000:]}")
        time.sleep(0.5)
    raise TimeoutError(f"no {what} after {timeout}s")


def _model_tensors(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.glob("*.safetensors"))}


def test_a_node_lost_mid_probe_and_mid_evaluate_changes_no_output(loopback_cluster):
    """Spot reclaim, twice: the second node dies while it holds a probe worker, a replacement
    joins, and that node dies while it scores a model. The probe resumes from its last
    checkpoint (bitwise the weights of a run that lost nothing), the lost model is scored again
    on what is left (the same scores)."""
    c = loopback_cluster
    # Long enough for a checkpoint (every 10 steps) to be registered before the kill, and an
    # evaluation of each model that lasts seconds (batch 1, 24 rows, up to 128 new tokens), so
    # a kill lands mid-way.
    sets = [
        "probe.steps=200",
        "probe.checkpoint_every=10",
        "evaluate.batch_size=1",
        "evaluate.max_new_tokens=128",
    ]
    ref_dir, run_dir = c.root / "ref", c.root / "run"
    job_id, out = submit(c, pipeline_entry(c, ref_dir, *sets))
    assert_succeeded(c, job_id, out)

    job_id, out = submit(c, pipeline_entry(c, run_dir, *sets), wait=False)
    assert out.returncode == 0, out.stderr

    def registered_checkpoint():
        for snap in (run_dir / "_ray").glob("probe-reverse-*/checkpoint_manager_snapshot.json"):
            try:
                if json.loads(snap.read_text()).get("checkpoint_results"):
                    return snap
            except (OSError, ValueError):
                pass  # being written
        return None

    _wait_for(registered_checkpoint, "registered probe checkpoint", c, job_id)
    assert c.kill_node("worker") > 0
    c.add_node("spare")  # the autoscaler's replacement

    def scoring_on_spare():
        names = c.node_names()
        for t in c.state("tasks", "name=cpi-evaluate", "state=RUNNING"):
            if names.get(t.get("node_id")) == "spare":
                return t
        return None

    _wait_for(scoring_on_spare, "model being scored on the replacement node", c, job_id)
    assert c.kill_node("spare") > 0
    # Nothing replaces it: the model it was scoring is scored again on the head.
    _wait_for(
        lambda: "succeeded" in c.cli("job", "status", "--address", c.dashboard, job_id).stdout.lower(),
        "job success",
        c,
        job_id,
    )

    probe = json.loads((run_dir / "probes" / "reverse" / "probe.json").read_text())
    assert probe["resumed_at_step"] > 0, probe  # restarted from the checkpoint, not from step 0
    ref_probe = ref_dir / "probes" / "reverse"
    assert _model_tensors(run_dir / "probes" / "reverse") == _model_tensors(ref_probe)
    # The loss curve kept is the whole run's, one line per step, as the run without a loss.
    steps = [
        json.loads(ln)["step"] for ln in (run_dir / "probes/reverse/metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 201))
    ref_scores = json.loads((ref_dir / "eval" / "scores.json").read_text())
    scores = json.loads((run_dir / "eval" / "scores.json").read_text())
    assert scores["scores"] == ref_scores["scores"]
    assert set(scores["scores"]) == {"base", "probe:reverse"}
