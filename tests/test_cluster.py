"""The deployment files in cluster/: the launcher configs against Ray's own cluster-config schema
(and Ray's own config preparation), the RayJob against the KubeRay fields it uses, the node types
against what the 7B config's stages ask for, and no public dashboard, no secrets."""

from __future__ import annotations

import copy
import fnmatch
import json
import re
from pathlib import Path

import pytest
import yaml

from cpi_ray.config.load import load_config
from cpi_ray.run.runtime import worker_resources

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
# Which node type each stage of jobs/configs/llama7b.yaml must land on.
STAGE_NODE = {
    "probe": "gpu1_spot",
    "evaluate": "gpu1_spot",
    "regions": "cpu_stream",
    "fuse": "cpu_stream",
    "consolidate": "gpu8",
}


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _cluster_image() -> str:
    """The one image tag the deployment files use: the RayJob's head container's."""
    job = _load("kuberay-rayjob.yaml")
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


def _llama7b():
    return load_config(REPO / "jobs/configs/llama7b.yaml")


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


# ------------------------------------------------------------------------- cluster launcher


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_matches_rays_schema(name, ray_schema):
    import jsonschema

    cfg = _load(name)
    jsonschema.validate(cfg, ray_schema)
    # Ray's own path for `ray up`: provider defaults merged in, then validated again.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    # The provider defaults start the head with a public dashboard; ours must have replaced them.
    assert "0.0.0.0" not in json.dumps(prepared)


def test_schema_catches_a_broken_config(ray_schema):
    # The validation above has teeth: a misspelt field or a fractional resource fails.
    import jsonschema

    cfg = _load("aws.yaml")
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu8"]["max_worker"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema)
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu8"]["resources"]["zero3_gpu"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema)


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_node_types(name):
    cfg = _load(name)
    types = cfg["available_node_types"]
    assert set(types) == {"head", "cpu_stream", "gpu1_spot", "gpu8"}
    assert types["head"]["resources"] == {"CPU": 0}  # no stage workers on the head
    assert cfg["idle_timeout_minutes"] > 0
    for t in ("cpu_stream", "gpu1_spot", "gpu8"):
        assert types[t]["min_workers"] == 0 < types[t]["max_workers"] <= cfg["max_workers"]
    assert types["gpu8"]["resources"]["GPU"] == 8 and types["gpu1_spot"]["resources"]["GPU"] == 1
    spot = json.dumps(types["gpu1_spot"]["node_config"]).lower()
    assert "spot" in spot
    assert "spot" not in json.dumps(types["gpu8"]["node_config"]).lower()


@pytest.mark.parametrize("name", LAUNCHER)
def test_each_stage_fits_the_node_type_meant_for_it(name):
    """The autoscaler can only start a node for a request that fits on one node of some type;
    the custom resources make it the intended type and no other."""
    cfg = _llama7b()
    types = {k: v["resources"] for k, v in _load(name)["available_node_types"].items()}
    for stage, node in STAGE_NODE.items():
        ask = worker_resources(cfg, stage)
        fits = [t for t, res in types.items() if all(res.get(k, 0) >= v for k, v in ask.items())]
        assert fits == [node], (stage, ask, fits)
    # ZeRO-3's workers all at once: 8 ranks on one 8-GPU node.
    ask = worker_resources(cfg, "consolidate")
    per_node = min(types["gpu8"][k] // v for k, v in ask.items())
    assert per_node >= cfg.consolidate.num_workers
    # All probes at once on the spot nodes.
    gpu1 = _load(name)["available_node_types"]["gpu1_spot"]
    assert gpu1["max_workers"] >= len(cfg.tasks) * cfg.probe.num_workers


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_keeps_token_auth_and_a_private_dashboard(name):
    cfg = _load(name)
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = [
        c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c
    ]
    assert len(starts) == 2
    for c in starts:
        assert c.index("export RAY_AUTH_MODE=token") < c.index("ray start")
    (head,) = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head


# Installing a package at boot, in any form a command could take.
INSTALLS = re.compile(
    r"\b(pip3?|uv pip|conda|mamba|micromamba)\s+install\b|-m\s+pip\b|-m\s+venv\b|\bvirtualenv\b"
)
PINNED_IMAGE = re.compile(r"[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)+:(\d+\.\d+\.\d+)")


def _all_commands(cfg: dict) -> list[str]:
    keys = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    cmds = [c for k in keys for c in cfg.get(k, [])]
    for node in cfg["available_node_types"].values():
        cmds += node.get("initialization_commands", []) + node.get("worker_setup_commands", [])
    return cmds


def _docker_of(cfg: dict, node_type: str) -> tuple[str, list[str]]:
    """The image and `docker run` options a node of this type gets, as Ray's updater merges them
    (StandardAutoscaler._get_node_specific_docker_config, DockerCommandRunner.run_init): the
    node type's `docker` over the global one, then run_options + head_/worker_run_options."""
    head = node_type == cfg["head_node_type"]
    docker = dict(cfg["docker"])
    if not head:
        docker.update(cfg["available_node_types"][node_type].get("docker", {}))
    role = "head" if head else "worker"
    image = docker.get(f"{role}_image", docker.get("image"))
    return image, docker.get("run_options", []) + docker.get(f"{role}_run_options", [])


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_installs_nothing_at_boot(name):
    from ray.autoscaler._private.util import prepare_config

    cfg = _load(name)
    # What `ray up` runs: Ray's provider defaults merged in (they pip-install on the head unless
    # the config sets its own command lists), setup_commands folded into head and worker lists.
    prepared = prepare_config(copy.deepcopy(cfg))
    for c in _all_commands(cfg) + _all_commands(prepared):
        assert not INSTALLS.search(c), c
        assert "venv" not in c, c
    # Nothing left that only an install made sense for.
    assert all("cpi-ray" not in src for src in cfg["file_mounts"]), cfg["file_mounts"]
    # Commands run in the image's container; the host only mounts the shared run directory.
    assert prepared["docker"]["container_name"]


def test_install_check_has_teeth():
    for c in (
        "~/venv/bin/pip install -q torch==2.13.0",
        "python -m pip install -e .",
        "pip3 install boto3",
        "uv pip install --system ray",
        "python3 -m venv ~/venv",
        "conda install -y numpy",
    ):
        assert INSTALLS.search(c), c
    for c in ("ray stop", "sudo apt-get install -y -qq nfs-common", "chmod 600 ~/.ray/auth_token"):
        assert not INSTALLS.search(c), c
    # Ray's own defaults install on every boot: a config that leaves out its lists gets them.
    from ray.autoscaler._private.util import prepare_config

    for name in LAUNCHER:
        cfg = _load(name)
        del cfg["head_setup_commands"]
        assert any(INSTALLS.search(c) for c in _all_commands(prepare_config(cfg))), name


@pytest.mark.parametrize("name", LAUNCHER)
def test_every_node_runs_the_same_pinned_image(name):
    cfg = _load(name)
    images = {t: _docker_of(cfg, t)[0] for t in cfg["available_node_types"]}
    assert len(set(images.values())) == 1, images
    (image,) = set(images.values())
    assert PINNED_IMAGE.fullmatch(image), f"{image}: pin a version tag (not latest, not a bare name)"
    assert image == _cluster_image(), (image, _cluster_image())
    assert cfg["docker"]["pull_before_run"] is True


@pytest.mark.parametrize("name", LAUNCHER)
def test_gpu_node_types_get_the_gpus_and_the_run_directory(name):
    cfg = _load(name)
    storage = _llama7b().storage.path
    for t, node in cfg["available_node_types"].items():
        _, opts = _docker_of(cfg, t)
        flags = " ".join(opts)
        # The shared run directory, mounted on the host, at the same path in the container.
        mounts = dict(re.findall(r"-v\s+(\S+?):(\S+)", flags))
        assert any(storage.startswith(dst + "/") and src == dst for src, dst in mounts.items()), (t, mounts)
        if node["resources"].get("GPU", 0):
            assert "--gpus all" in opts, (t, opts)
            shm = re.findall(r"--shm-size=(\d+)g\b", flags)
            assert len(shm) == 1 and int(shm[0]) >= 32, (t, opts)
        else:
            assert "--gpus" not in flags, (t, opts)


# --------------------------------------------------------------------------------- KubeRay

# The parts of the KubeRay v1 CRDs (RayJob, RayCluster) this manifest uses: the allowed keys at
# each level, so that a misspelt field fails here instead of being dropped by the API server.
RAYJOB_SPEC_KEYS = {
    "entrypoint",
    "runtimeEnvYAML",
    "jobId",
    "shutdownAfterJobFinishes",
    "ttlSecondsAfterFinished",
    "activeDeadlineSeconds",
    "backoffLimit",
    "rayClusterSpec",
    "clusterSelector",
    "submissionMode",
    "submitterPodTemplate",
    "submitterConfig",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "entrypointResources",
    "suspend",
    "managedBy",
    "deletionStrategy",
    "metadata",
}
RAYCLUSTER_SPEC_KEYS = {
    "rayVersion",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "headGroupSpec",
    "workerGroupSpecs",
    "headServiceAnnotations",
    "suspend",
    "managedBy",
    "gcsFaultToleranceOptions",
    "authOptions",
    "upgradeStrategy",
}
AUTOSCALER_KEYS = {
    "resources",
    "image",
    "imagePullPolicy",
    "securityContext",
    "idleTimeoutSeconds",
    "upscalingMode",
    "env",
    "envFrom",
    "volumeMounts",
    "version",
}
HEAD_KEYS = {
    "rayStartParams",
    "template",
    "serviceType",
    "headService",
    "enableIngress",
    "resources",
    "labels",
}
WORKER_KEYS = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "idleTimeoutSeconds",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "numOfHosts",
    "suspend",
    "resources",
    "labels",
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
UPSCALING_MODES = {"Default", "Aggressive", "Conservative"}


def _rayjob() -> dict:
    return _load("kuberay-rayjob.yaml")


def _custom(rsp: dict) -> dict:
    # KubeRay passes rayStartParams.resources verbatim to `ray start --resources=`: a quoted
    # JSON object inside a YAML string.
    raw = rsp.get("resources")
    if raw is None:
        return {}
    assert raw.startswith('"') and raw.endswith('"'), raw
    return json.loads(raw[1:-1].replace('\\"', '"'))


def test_rayjob_structure():
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_KEYS, set(spec) - RAYJOB_SPEC_KEYS
    assert spec["submissionMode"] in SUBMISSION_MODES
    assert spec["shutdownAfterJobFinishes"] is True and isinstance(spec["ttlSecondsAfterFinished"], int)
    yaml.safe_load(spec["runtimeEnvYAML"])

    # The entrypoint is the job script with a config that exists in this repository.
    m = re.search(r"python /app/(jobs/cpi_pipeline\.py) --config /app/(\S+)", spec["entrypoint"])
    assert m and (REPO / m.group(1)).is_file() and (REPO / m.group(2)).is_file()

    rc = spec["rayClusterSpec"]
    assert set(rc) <= RAYCLUSTER_SPEC_KEYS, set(rc) - RAYCLUSTER_SPEC_KEYS
    assert rc["rayVersion"].startswith("2.60")
    assert rc["enableInTreeAutoscaling"] is True
    assert set(rc["autoscalerOptions"]) <= AUTOSCALER_KEYS
    assert rc["autoscalerOptions"]["upscalingMode"] in UPSCALING_MODES
    assert rc["autoscalerOptions"]["idleTimeoutSeconds"] > 0

    head = rc["headGroupSpec"]
    assert set(head) <= HEAD_KEYS
    assert head["rayStartParams"] == {"num-cpus": "0"}
    assert head["template"]["spec"]["containers"][0]["name"] == "ray-head"

    groups = {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    assert set(groups) == {"cpu-stream", "gpu1-spot", "gpu8"}
    for g in groups.values():
        assert set(g) <= WORKER_KEYS, set(g) - WORKER_KEYS
        assert all(isinstance(v, int) for v in (g["replicas"], g["minReplicas"], g["maxReplicas"]))
        assert 0 == g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        # rayStartParams is a map of strings in the CRD; numbers are rejected by the API server.
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), g["rayStartParams"]
        (container,) = g["template"]["spec"]["containers"]
        res = container["resources"]
        assert res["requests"] == res["limits"]
        gpus = int(g["rayStartParams"].get("num-gpus", "0"))
        assert int(res["limits"].get("nvidia.com/gpu", "0")) == gpus
        assert float(g["rayStartParams"]["num-cpus"]) <= float(res["limits"]["cpu"])
        mounts = {v["mountPath"] for v in container["volumeMounts"]}
        assert "/mnt/cpi" in mounts  # the shared run directory
    assert "spot" in json.dumps(groups["gpu1-spot"]["template"]["spec"]["nodeSelector"])


def test_rayjob_groups_fit_the_stages():
    cfg = _llama7b()
    groups = {g["groupName"]: g for g in _rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    offered = {}
    for name, g in groups.items():
        rsp = g["rayStartParams"]
        offered[name] = {"CPU": float(rsp["num-cpus"]), "GPU": float(rsp.get("num-gpus", 0)), **_custom(rsp)}
    want = {
        "probe": "gpu1-spot",
        "evaluate": "gpu1-spot",
        "regions": "cpu-stream",
        "fuse": "cpu-stream",
        "consolidate": "gpu8",
    }
    for stage, group in want.items():
        ask = worker_resources(cfg, stage)
        fits = [n for n, res in offered.items() if all(res.get(k, 0) >= v for k, v in ask.items())]
        assert fits == [group], (stage, ask, fits)
    ask = worker_resources(cfg, "consolidate")
    assert min(offered["gpu8"][k] // v for k, v in ask.items()) >= cfg.consolidate.num_workers


# Node labels that pin a GPU model: GKE's, EKS with Karpenter's, NVIDIA GPU Feature Discovery's.
ACCELERATOR_LABELS = {
    "cloud.google.com/gke-accelerator",
    "karpenter.k8s.aws/instance-gpu-name",
    "nvidia.com/gpu.product",
}


def test_rayjob_pins_the_gpu_model_and_the_image():
    rc = _rayjob()["spec"]["rayClusterSpec"]
    pods = {"head": rc["headGroupSpec"]["template"]["spec"]}
    pods |= {g["groupName"]: g["template"]["spec"] for g in rc["workerGroupSpecs"]}
    images = {n: c["image"] for n, p in pods.items() for c in p["containers"]}
    assert len(set(images.values())) == 1, images
    assert PINNED_IMAGE.fullmatch(images["head"]), images["head"]
    for name, pod in pods.items():
        (container,) = pod["containers"]
        gpus = int(container["resources"].get("limits", {}).get("nvidia.com/gpu", "0"))
        selector = pod.get("nodeSelector", {})
        pinned = {k: v for k, v in selector.items() if k in ACCELERATOR_LABELS}
        if gpus:
            assert len(pinned) == 1 and all(v.strip() for v in pinned.values()), (name, selector)
            # NCCL and the object store need more than the container runtime's 64 MiB /dev/shm.
            assert "/dev/shm" in {v["mountPath"] for v in container["volumeMounts"]}, name
        else:
            assert not pinned, (name, selector)
    # The sizing in cluster/README.md is for 80 GB GPUs.
    gke = {pods[g]["nodeSelector"].get("cloud.google.com/gke-accelerator") for g in ("gpu1-spot", "gpu8")}
    assert gke == {"nvidia-a100-80gb"}, gke


def test_rayjob_keeps_token_auth_and_a_private_dashboard():
    job = _rayjob()
    rc = job["spec"]["rayClusterSpec"]
    assert rc["authOptions"] == {"mode": "token"}
    head = rc["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    assert "dashboard-host" not in head["rayStartParams"]  # KubeRay's in-pod default only


# ----------------------------------------------------------------------------- the image

# The CUDA major version each pinned torch release is built for: the image's base must ship the
# same toolkit, or DeepSpeed's fused-Adam JIT build runs against the wrong nvcc. Bumping torch
# means stating its CUDA major here and, if it changed, moving the base image with it.
TORCH_CUDA_MAJOR = {"2.13.0": "13"}


def _dockerfile() -> str:
    return (CLUSTER / "Dockerfile").read_text()


def _torch_pins(text: str) -> set[str]:
    return set(re.findall(r"\btorch==([0-9][0-9A-Za-z.+]*)", text))


def test_dockerfile_builds_on_a_pinned_ray_cuda_image():
    froms = re.findall(r"(?m)^FROM\s+(\S+)", _dockerfile())
    assert len(froms) == 1, froms
    m = re.fullmatch(r"rayproject/ray:(2\.60\.\d+)-py(\d)(\d+)-cu(\d+)(\d)", froms[0])
    assert m, f"{froms[0]}: not a pinned rayproject/ray:2.60.x-pyXY-cuXYZ tag"
    # The Python of the image is one the project supports.
    floor = re.search(r'requires-python = ">=3\.(\d+)"', (REPO / "pyproject.toml").read_text())
    assert m.group(2) == "3" and int(m.group(3)) >= int(floor.group(1))
    # The base's CUDA toolkit is the one the pinned torch is built for.
    (torch,) = _torch_pins(_dockerfile())
    assert torch in TORCH_CUDA_MAJOR, f"torch {torch}: add its CUDA major to TORCH_CUDA_MAJOR"
    assert m.group(4) == TORCH_CUDA_MAJOR[torch], f"{froms[0]} does not ship torch {torch}'s CUDA"


def test_image_pins_the_torch_that_ci_and_the_readme_install():
    pins = {
        "cluster/Dockerfile": _torch_pins(_dockerfile()),
        ".ci/run": _torch_pins((REPO / ".ci/run").read_text()),
        "README.md": _torch_pins((REPO / "README.md").read_text()),
    }
    assert all(len(p) == 1 for p in pins.values()), pins
    assert len(set().union(*pins.values())) == 1, pins


def test_image_installs_the_project_and_copies_what_it_needs():
    text = _dockerfile()
    assert re.search(r"pip install [^\n]*-e /app", text)
    copied = set()
    for srcs in re.findall(r"(?m)^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", text):
        copied |= set(srcs.split())
    assert {"pyproject.toml", "README.md", "cpi_ray", "jobs"} <= copied, copied
    assert all((REPO / c).exists() for c in copied), copied


def test_build_context_leaves_out_runs_venvs_and_caches():
    # BuildKit reads <Dockerfile>.dockerignore next to the Dockerfile; patterns are relative to
    # the build context (the repository root).
    ignore = CLUSTER / "Dockerfile.dockerignore"
    patterns = [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert {".git", ".venv", "runs", "**/__pycache__"} <= set(patterns), patterns

    def ignored(path: str) -> bool:
        # Enough of the .dockerignore matching for these patterns: "**/" matches any depth.
        return any(
            fnmatch.fnmatch(path, pat) or (pat.startswith("**/") and fnmatch.fnmatch(path, pat[3:]))
            for pat in patterns
        )

    for needed in ("pyproject.toml", "README.md", "cpi_ray", "cpi_ray/cli.py", "jobs/cpi_pipeline.py"):
        assert not ignored(needed), needed
    for dropped in (".git", ".venv", "runs", "cpi_ray/__pycache__", "cpi_ray.egg-info"):
        assert ignored(dropped), dropped


# ----------------------------------------------------------------------- all cluster files

SECRET_PATTERNS = [
    (r"AKIA[0-9A-Z]{16}", "an AWS access key id"),
    (r"(?i)aws_secret_access_key", "an AWS secret key"),
    (r"-----BEGIN [A-Z ]*PRIVATE KEY-----", "a private key"),
    (r"\bhf_[A-Za-z0-9]{30,}", "a Hugging Face token"),
    (r"\b[0-9a-f]{40,}\b", "a long hex string (a Ray token?)"),
    (r"(?i)(password|secret|token)\s*[:=]\s*['\"]?[A-Za-z0-9+/=_-]{16,}", "a literal credential"),
    (r"(?i)RAY_AUTH_TOKEN\s*\n?\s*value:", "a literal Ray token"),
]


def _cluster_files() -> list[Path]:
    return sorted(p for p in CLUSTER.iterdir() if p.is_file())


@pytest.mark.parametrize("path", _cluster_files(), ids=lambda p: p.name)
def test_no_public_dashboard_and_no_secrets(path):
    text = path.read_text()
    assert "0.0.0.0" not in text, f"{path.name} binds something to every interface"
    assert not re.search(r"(?i)serviceType:\s*(LoadBalancer|NodePort)", text)
    for pat, what in SECRET_PATTERNS:
        assert not re.search(pat, text), f"{path.name} seems to hold {what}"


def test_secret_scan_has_teeth():
    fake = "RAY_AUTH_TOKEN=" + "ab" * 32 + "\npassword: hunter2hunter2hunter2\n"
    hits = [what for pat, what in SECRET_PATTERNS if re.search(pat, fake)]
    assert "a long hex string (a Ray token?)" in hits and "a literal credential" in hits


def test_cluster_readme_covers_what_it_must():
    text = (CLUSTER / "README.md").read_text()
    for must in (
        "ray get-auth-token",
        "RAY_AUTH_MODE=token",
        "ray dashboard",
        "ssh -L",
        "cpi-ray plan",
        "70B",
        "7B",
        "ZeRO-3",
        "16 B",
        "## The image",
        "docker build -f cluster/Dockerfile -t",
        "docker push",
        "## Idle timeouts and stage gaps",
        "idle_timeout_minutes",
        "idleTimeoutSeconds",
    ):
        assert must in text, must


def test_cluster_readme_7b_numbers_follow_the_shipped_config():
    text = (CLUSTER / "README.md").read_text()
    section = text[text.index("### 7B") : text.index("### 70B")]
    tasks = len(_llama7b().tasks)
    counts = [int(n) for n in re.findall(r"(\d+) tasks\b", section)]
    assert counts and set(counts) == {tasks}, counts
    m = re.search(r"Cluster: (\d+) `gpu1_spot`", section)
    assert m and int(m.group(1)) == tasks
    # The image tag the README tells users to replace is the one the files ship with.
    assert f"`{_cluster_image()}`" in text
