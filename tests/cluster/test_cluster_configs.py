"""The cluster configs and the image are valid for their tools, fit the GPU pipeline config and
their machines, keep Ray's dashboard / Jobs API behind token authentication, and assume no shared
filesystem. Static checks only: no docker, no cloud, no network."""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from smart_r1.config import load_config

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = [REPO / "cluster" / "aws.yaml", REPO / "cluster" / "gcp.yaml"]
RAYJOB = REPO / "cluster" / "kuberay-rayjob.yaml"
DOCKERFILE = REPO / "Dockerfile"
SCHEME = {"aws": "s3://", "gcp": "gs://", "kuberay": "s3://"}  # the RayJob targets EKS
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SHARED_FS = ("/mnt/cluster_storage", "/data/", "/mnt/", "nfs", "efs", "filestore")

# The machines the configs name: vCPUs, memory (GiB), GPUs.
MACHINES = {
    "m6i.2xlarge": (8, 32, 0), "g5.12xlarge": (48, 192, 4), "c6i.16xlarge": (64, 128, 0),
    "n2-standard-8": (8, 32, 0), "g2-standard-48": (48, 192, 4), "c3-highcpu-44": (44, 88, 0),
}
# Left to the kubelet, system pods and daemon sets on each Kubernetes node.
KUBE_RESERVED_CPU, KUBE_MEMORY_FRACTION = 2.0, 0.9
# KubeRay's autoscaler sidecar in the head pod when autoscalerOptions.resources is unset.
AUTOSCALER_SIDECAR = (0.5, 0.5)  # CPU, GiB


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _rayjob() -> tuple[dict, list[dict]]:
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    jobs = [d for d in docs if d["kind"] == "RayJob"]
    assert len(jobs) == 1
    return jobs[0], docs


def _pipeline_from_entrypoint(entrypoint: str):
    args = shlex.split(entrypoint)
    assert args[:2] == ["python", "pipelines/sft_rft_sft.py"]
    assert (REPO / args[1]).is_file()
    config = args[args.index("--config") + 1]
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    return load_config(REPO / config, overrides)


def _check_bucket_paths(pipeline, scheme: str) -> None:
    """The run's storage root, Ray Train's storage and the data are object-store URIs of the
    provider's kind: nodes share no filesystem."""
    assert pipeline.out_dir.startswith(scheme), pipeline.out_dir
    assert pipeline.ray.storage_path.startswith(scheme), pipeline.ray.storage_path
    for name in ("train", "heldout"):
        path = getattr(pipeline.data, name)
        assert path.startswith(scheme), f"data.{name}={path!r} is not a {scheme} URI"


def _fits(pipeline, nodes: dict[str, dict[str, float]]) -> None:
    """Learners (DDP) fit one node type; rollout workers fit the autoscaling max."""
    r = pipeline.ray
    per_learner = {"CPU": r.cpus_per_learner, "GPU": 1.0 if r.use_gpu else 0.0}
    learner_nodes = [n for n, res in nodes.items()
                     if all(res["max_workers"] * res.get(k, 0.0) >= v * r.num_learners
                            for k, v in per_learner.items() if v)]
    assert learner_nodes, f"no node type can host {r.num_learners} learners of {per_learner}"
    if r.use_gpu:
        assert any(nodes[n].get("GPU", 0) >= 1 for n in learner_nodes)
    per_worker = {"CPU": r.cpus_per_rollout_worker, "GPU": r.gpus_per_rollout_worker}
    capacity = sum(res["max_workers"] * min(math.floor(res.get(k, 0.0) / v) for k, v in per_worker.items() if v)
                   for res in nodes.values())
    assert capacity >= r.num_rollout_workers, "rollout workers do not fit the autoscaling maximum"


def _flag(command: str, name: str) -> str | None:
    """The value of `--name=V` or `--name V` in a shell command line, else None."""
    match = re.search(rf"--{name}(?:=|\s+)(\S+)", command)
    return match.group(1) if match else None


# -- the Dockerfile -----------------------------------------------------------------------------

def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                           if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _dockerfile_base() -> str:
    froms = [args for word, args in _instructions() if word == "FROM"]
    assert len(froms) == 1, "one stage, one base"
    return froms[0]


def _index(predicate) -> int:
    hits = [i for i, ins in enumerate(_instructions()) if predicate(*ins)]
    assert hits, "no such instruction"
    return hits[0]


def _project() -> dict:
    import tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_dockerfile_one_ray_dependencies_before_code_no_test_extra():
    ins = _instructions()
    text = DOCKERFILE.read_text()
    base = _dockerfile_base()
    assert re.fullmatch(r"rayproject/ray:2\.60\.\d+-py311(-gpu)?", base), base
    # The base image's Ray is the only one: it satisfies pyproject's pin, no venv beside it, and
    # no pip install names Ray (the dependency install holds it at the base image's version).
    ray_req = next(Requirement(r) for r in _project()["dependencies"] if Requirement(r).name == "ray")
    assert base.split(":")[1].split("-")[0] in ray_req.specifier
    runs = [args for word, args in ins if word == "RUN"]
    pips = [part.split("pip install", 1)[1] for r in runs for part in r.split("&&") if "pip install" in part]
    assert not any(re.search(r"(^|\s)['\"]?ray([\[=<>\s'\"]|$)", p) for p in pips)
    assert "venv" not in text and "virtualenv" not in text and "conda create" not in text
    assert "[test]" not in text and ".[test" not in text and "make install" not in text
    # Layers: pyproject.toml alone, the CUDA torch, the other dependencies (Ray held), the
    # evaluator without its deps; only then the code and the project itself without deps.
    copy_pyproject = _index(lambda w, a: w == "COPY" and a.split()[-2:] == ["pyproject.toml", "./"])
    torch = _index(lambda w, a: w == "RUN" and "pip install" in a and "torch" in a)
    deps = _index(lambda w, a: w == "RUN" and "pip install" in a and "deps.txt" in a)
    waymo = _index(lambda w, a: w == "RUN" and "pip install" in a and "waymo-open-dataset" in a)
    first_code = _index(lambda w, a: w in ("COPY", "ADD") and "pyproject.toml" not in a)
    project = _index(lambda w, a: w == "RUN" and re.search(r"pip install .*--no-deps .*-e \.", a))
    assert copy_pyproject < torch < deps < waymo < first_code < project
    assert "-c /tmp/keep-ray.txt" in ins[deps][1]
    assert not any(w in ("COPY", "ADD") and re.search(r"\bsmart_r1\b|\bpipelines\b|(^|\s)\.\s", a)
                   for w, a in ins[:first_code])
    # The evaluator pin is the Makefile's.
    waymo_pin = re.search(r"^WAYMO := (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert f"--no-deps {waymo_pin}" in ins[waymo][1]
    # What the image runs by default: the pipeline's --help, from the copied pipelines folder.
    cmd = next(args for word, args in ins if word == "CMD")
    assert yaml.safe_load(cmd) == ["python", "pipelines/sft_rft_sft.py", "--help"]
    assert (REPO / "pipelines" / "sft_rft_sft.py").is_file()
    assert any(w == "COPY" and a.split()[-2:] == ["pipelines", "./pipelines"] for w, a in ins)
    assert "pipelines/sft_rft_sft.py --help" in ins[project][1]  # tried at build time


def _workdir() -> str:
    return next(args for word, args in _instructions() if word == "WORKDIR")


# -- cluster launcher (AWS, GCP) ------------------------------------------------------------------

@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_configs(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(path)
    validate_config(prepare_config(_load(path)))  # Ray's own schema
    assert raw["docker"]["image"] == _rayjob()[0]["spec"]["rayClusterSpec"]["headGroupSpec"][
        "template"]["spec"]["containers"][0]["image"]
    assert raw["docker"]["image"].endswith("smart-r1:latest")
    types = raw["available_node_types"]
    assert types[raw["head_node_type"]]["resources"]["CPU"] == 0
    assert {"gpu_learner", "cpu_rollout"} <= set(types)
    assert all(types[n]["min_workers"] == 0 for n in ("gpu_learner", "cpu_rollout"))
    provider = raw["provider"]["type"]
    pipeline = _pipeline_from_entrypoint(raw["metadata"]["entrypoint"])
    assert pipeline.ray.storage_path == raw["metadata"]["storage_path"]
    _check_bucket_paths(pipeline, SCHEME[provider])
    assert pipeline.ray.use_gpu
    nodes = {n: {**t["resources"], "max_workers": t["max_workers"]} for n, t in types.items()}
    _fits(pipeline, nodes)
    # Ray's resources are those of the machine each node type names.
    for name, t in types.items():
        machine = t["node_config"]["InstanceType" if provider == "aws" else "machineType"]
        cpus, _, gpus = MACHINES[machine]
        assert t["resources"].get("CPU", cpus) <= cpus, name
        assert t["resources"].get("GPU", 0) == gpus, name
        if provider == "gcp" and gpus:
            assert sum(a["acceleratorCount"] for a in t["node_config"]["guestAccelerators"]) == gpus


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_token_auth_and_loopback_dashboard(path):
    raw = _load(path)
    docker = raw["docker"]
    # RAY_AUTH_MODE=token in the container of every node: run_options apply to head and workers,
    # and nothing more specific sets it otherwise.
    env = [o.split()[-1] for o in docker["run_options"] if o.split()[0] in ("--env", "-e")]
    assert "RAY_AUTH_MODE=token" in env
    overrides = [docker.get("head_run_options", []), docker.get("worker_run_options", [])]
    overrides += [t.get("docker", {}).get("worker_run_options", []) for t in raw["available_node_types"].values()]
    assert not any("RAY_AUTH_MODE" in o for opts in overrides for o in opts)
    commands = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    assert not any("RAY_AUTH_MODE" in c or "RAY_AUTH_TOKEN" in c for c in commands)
    # The token: the one made on the user's machine, at Ray's default path on every node.
    assert raw["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    # The dashboard / Jobs API: the head's loopback only, reached through `ray dashboard`.
    head_start = [c for c in raw["head_start_ray_commands"] if "ray start" in c]
    assert len(head_start) == 1 and "--head" in head_start[0]
    assert _flag(head_start[0], "dashboard-host") in LOOPBACK
    assert "8265" not in yaml.safe_dump(raw["provider"])  # no firewall rule opening it


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_object_storage_access(path):
    """Each node reaches the bucket through a role / service account the user fills in."""
    raw = _load(path)
    for name, t in raw["available_node_types"].items():
        config = t["node_config"]
        if raw["provider"]["type"] == "aws":
            arn = config["IamInstanceProfile"]["Arn"]
            assert re.fullmatch(r"arn:aws:iam::<ACCOUNT_ID>:instance-profile/<[A-Z_]+>", arn), (name, arn)
        else:
            (account,) = config["serviceAccounts"]
            assert re.fullmatch(r"<[A-Z_]+>@<PROJECT>\.iam\.gserviceaccount\.com", account["email"]), name
            assert "https://www.googleapis.com/auth/cloud-platform" in account["scopes"]


# -- KubeRay -------------------------------------------------------------------------------------

def _cpu(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _gib(quantity) -> float:
    units = {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 2**10, "K": 1e3 / 2**30, "M": 1e6 / 2**30,
             "G": 1e9 / 2**30, "T": 1e12 / 2**30}
    text = str(quantity)
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    return float(text) / 2**30


def _pods(cluster: dict) -> list[tuple[str, dict, dict]]:
    """(name, rayStartParams, pod spec) of the head and each worker group."""
    head = cluster["headGroupSpec"]
    return [("head", head["rayStartParams"], head["template"]["spec"])] + [
        (g["groupName"], g["rayStartParams"], g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]


def test_kuberay_rayjob():
    job, _ = _rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == _dockerfile_base().split(":")[1].split("-")[0]
    pipeline = _pipeline_from_entrypoint(spec["entrypoint"])
    _check_bucket_paths(pipeline, SCHEME["kuberay"])
    nodes = {}
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] == 0
        container = group["template"]["spec"]["containers"][0]
        assert container["image"].endswith("smart-r1:latest")
        limits = container["resources"]["limits"]
        assert float(group["rayStartParams"]["num-cpus"]) <= _cpu(limits["cpu"])
        gpus = float(group["rayStartParams"].get("num-gpus", 0))
        assert gpus == float(limits.get("nvidia.com/gpu", 0))
        nodes[group["groupName"]] = {"CPU": float(group["rayStartParams"]["num-cpus"]), "GPU": gpus,
                                     "max_workers": group["maxReplicas"]}
    _fits(pipeline, nodes)
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    for _, _, pod in _pods(cluster):
        for container in pod["containers"]:
            assert container["image"] == head["template"]["spec"]["containers"][0]["image"]
            assert container["workingDir"] == _workdir()


def test_kuberay_token_auth_and_in_cluster_dashboard():
    job, _ = _rayjob()
    cluster = job["spec"]["rayClusterSpec"]
    # KubeRay's authOptions: RAY_AUTH_MODE=token and the Secret's token on every Ray container,
    # the autoscaler and the job submitter. The Secret is made by the user, never committed.
    auth = cluster["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]
    assert not any(d["kind"] == "Secret" for d in _rayjob()[1])
    for name, _, pod in _pods(cluster):
        for container in pod["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert env.get("RAY_AUTH_MODE", {}).get("value", "token") == "token", name
    # The head binds all interfaces (the submitter pod calls the Jobs API in-cluster) only with
    # token auth, and nothing exposes it outside the cluster.
    head = cluster["headGroupSpec"]
    if head["rayStartParams"].get("dashboard-host", "0.0.0.0") not in LOOPBACK:  # KubeRay's default
        assert auth["mode"] == "token"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    assert "headService" not in head


def test_kuberay_pods_fit_their_machines():
    job, _ = _rayjob()
    cluster = job["spec"]["rayClusterSpec"]
    for name, params, pod in _pods(cluster):
        machine = pod["nodeSelector"]["node.kubernetes.io/instance-type"]
        cpus, memory, gpus = MACHINES[machine]
        cpu = mem = 0.0
        for container in pod["containers"]:
            resources = container["resources"]
            assert resources["requests"] == resources["limits"], name  # Guaranteed QoS
            cpu += _cpu(resources["requests"]["cpu"])
            mem += _gib(resources["requests"]["memory"])
            assert int(resources["requests"].get("nvidia.com/gpu", 0)) == gpus, name
        if name == "head" and cluster.get("enableInTreeAutoscaling"):
            assert "resources" not in cluster.get("autoscalerOptions", {})
            cpu, mem = cpu + AUTOSCALER_SIDECAR[0], mem + AUTOSCALER_SIDECAR[1]
        assert cpu <= cpus - KUBE_RESERVED_CPU, f"{name}: {cpu} CPUs on a {cpus}-vCPU {machine}"
        assert mem <= memory * KUBE_MEMORY_FRACTION, f"{name}: {mem:.1f} GiB on a {memory} GiB {machine}"
        if gpus:
            assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))


def test_kuberay_object_storage_access_and_secrets():
    job, docs = _rayjob()
    cluster = job["spec"]["rayClusterSpec"]
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    for name, _, pod in _pods(cluster):
        account = accounts[pod["serviceAccountName"]]  # defined in the same file
        role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        assert re.fullmatch(r"arn:aws:iam::<ACCOUNT_ID>:role/<[A-Z_]+>", role), name
        for container in pod["containers"]:
            for env in container.get("env", []):
                if re.search("PASSWORD|TOKEN|SECRET", env["name"]):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], env["name"]
    assert not re.search("PASSWORD|TOKEN|SECRET", job["spec"].get("runtimeEnvYAML", ""))


# -- no shared filesystem anywhere ---------------------------------------------------------------

def test_no_shared_filesystem_pretended():
    for path in LAUNCHER:
        raw = _load(path)
        commands = [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                  "worker_setup_commands", "head_start_ray_commands",
                                  "worker_start_ray_commands") for c in raw[key]]
        assert not any(re.search(r"\bmount\b", c) for c in commands), path.name
        assert set(raw["file_mounts"]) == {"~/.ray/auth_token"}, path.name
        assert not any(p in raw["metadata"]["entrypoint"] for p in SHARED_FS), path.name
    job, _ = _rayjob()
    assert not any(p in job["spec"]["entrypoint"] for p in SHARED_FS)
    for name, _, pod in _pods(job["spec"]["rayClusterSpec"]):
        for volume in pod.get("volumes", []):
            assert not set(volume) & {"hostPath", "nfs", "persistentVolumeClaim", "csi"}, (name, volume)
    # The GPU pipeline config's own storage root is a bucket too.
    storage = load_config(REPO / "pipelines" / "womd_gpu.yaml").ray.storage_path
    assert storage.startswith(("s3://", "gs://")), storage
