"""The cluster configs and the image are valid for their tools, fit the GPU pipeline config and
their machines, keep Ray's dashboard / Jobs API behind token authentication, assume no shared
filesystem, retry from the bucket, and tell one CUDA story (torch build, base image, the nodes'
driver). Static checks only: no docker, no cloud, no network."""

from __future__ import annotations

import copy
import math
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from smart_r1.config import load_config

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = [REPO / "cluster" / "aws.yaml", REPO / "cluster" / "gcp.yaml"]
RAYJOBS = {"eks": REPO / "cluster" / "kuberay-rayjob.yaml", "gke": REPO / "cluster" / "kuberay-rayjob-gke.yaml"}
DOCKERFILE = REPO / "Dockerfile"
SCHEME = {"aws": "s3://", "gcp": "gs://", "eks": "s3://", "gke": "gs://"}
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


def _rayjob(cloud: str = "eks") -> tuple[dict, list[dict]]:
    docs = [d for d in yaml.safe_load_all(RAYJOBS[cloud].read_text()) if d]
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
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_dockerfile_one_ray_dependencies_before_code_no_test_extra():
    ins = _instructions()
    text = DOCKERFILE.read_text()
    base = _dockerfile_base()
    assert re.fullmatch(r"rayproject/ray:2\.60\.\d+-py311-cpu", base), base  # no CUDA beside torch's
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
    for cloud in RAYJOBS:  # one image everywhere
        assert raw["docker"]["image"] == _rayjob(cloud)[0]["spec"]["rayClusterSpec"]["headGroupSpec"][
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


@pytest.mark.parametrize("cloud", RAYJOBS)
def test_kuberay_rayjob(cloud):
    job, _ = _rayjob(cloud)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == _dockerfile_base().split(":")[1].split("-")[0]
    pipeline = _pipeline_from_entrypoint(spec["entrypoint"])
    _check_bucket_paths(pipeline, SCHEME[cloud])
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


@pytest.mark.parametrize("cloud", RAYJOBS)
def test_kuberay_rayjob_retries_resume_from_the_bucket(cloud):
    """KubeRay >= 1.2 retries a failed RayJob on a new RayCluster (`spec.backoffLimit`; the
    submitter Job's own retries are `spec.submitterConfig.backoffLimit`). A retry runs the same
    entrypoint, which resumes from out_dir in the bucket: it must not start over or branch."""
    job, _ = _rayjob(cloud)
    spec = job["spec"]
    assert isinstance(spec["backoffLimit"], int) and 1 <= spec["backoffLimit"] <= 5
    assert spec["shutdownAfterJobFinishes"] is True  # no idle GPUs after the last attempt
    assert "clusterSelector" not in spec  # a RayCluster of its own, made anew for each attempt
    args = shlex.split(spec["entrypoint"])
    assert not {"--restart", "--branch"} & set(args), "a retry would redo finished stages"
    pipeline = _pipeline_from_entrypoint(spec["entrypoint"])
    assert "://" in pipeline.out_dir and "://" in pipeline.ray.storage_path


@pytest.mark.parametrize("cloud", RAYJOBS)
def test_kuberay_token_auth_and_in_cluster_dashboard(cloud):
    job, docs = _rayjob(cloud)
    cluster = job["spec"]["rayClusterSpec"]
    # KubeRay's authOptions: RAY_AUTH_MODE=token and the Secret's token on every Ray container,
    # the autoscaler and the job submitter. The Secret is made by the user, never committed.
    auth = cluster["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]
    assert not any(d["kind"] == "Secret" for d in docs)
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


@pytest.mark.parametrize("cloud", RAYJOBS)
def test_kuberay_pods_fit_their_machines(cloud):
    job, _ = _rayjob(cloud)
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
            if cloud == "gke":  # GKE's GPU node pools by accelerator
                assert pod["nodeSelector"]["cloud.google.com/gke-accelerator"] == "nvidia-l4", name


@pytest.mark.parametrize("cloud", RAYJOBS)
def test_kuberay_object_storage_access_and_secrets(cloud):
    """Every pod reaches the bucket as the Kubernetes service account defined beside it: an IAM role
    on EKS (IRSA), a Google service account on GKE (Workload Identity)."""
    job, docs = _rayjob(cloud)
    cluster = job["spec"]["rayClusterSpec"]
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    for name, _, pod in _pods(cluster):
        annotations = accounts[pod["serviceAccountName"]]["metadata"]["annotations"]  # same file
        if cloud == "eks":
            role = annotations["eks.amazonaws.com/role-arn"]
            assert re.fullmatch(r"arn:aws:iam::<ACCOUNT_ID>:role/<[A-Z_]+>", role), name
        else:
            account = annotations["iam.gke.io/gcp-service-account"]
            assert re.fullmatch(r"<[A-Z_]+>@<PROJECT>\.iam\.gserviceaccount\.com", account), name
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
    for cloud in RAYJOBS:
        job, _ = _rayjob(cloud)
        assert not any(p in job["spec"]["entrypoint"] for p in SHARED_FS)
        for name, _, pod in _pods(job["spec"]["rayClusterSpec"]):
            for volume in pod.get("volumes", []):
                assert not set(volume) & {"hostPath", "nfs", "persistentVolumeClaim", "csi"}, (name, volume)
    # The GPU pipeline config's own storage root is a bucket too.
    storage = load_config(REPO / "pipelines" / "womd_gpu.yaml").ray.storage_path
    assert storage.startswith(("s3://", "gs://")), storage


# -- one CUDA story: the torch build, the base image and every node's driver agree ----------------

def _driver_branch(text) -> int:
    """'595.71.05', '580' or 'R580' -> the driver branch (595, 580)."""
    return int(str(text).lstrip("R").split(".")[0])


def _node_image(provider: str, node_config: dict) -> str:
    if provider == "aws":
        return node_config["ImageId"]
    (boot,) = [d for d in node_config["disks"] if d.get("boot")]
    return boot["initializeParams"]["sourceImage"]


def _readme_cluster_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("\n## Launching on a cluster")
    return text[start:text.index("\n## ", start + 1)]


def _cuda_story() -> dict:
    """Everything that states the torch build, the base image or a GPU node's driver."""
    return {"args": dict(a.split("=", 1) for w, a in _instructions() if w == "ARG" and "=" in a),
            "torch_run": _instructions()[_index(lambda w, a: w == "RUN" and "-r /tmp/torch.txt" in a)][1],
            "env": " ".join(a for w, a in _instructions() if w == "ENV"),
            "base": _dockerfile_base(),
            "pyproject": (REPO / "pyproject.toml").read_text(),
            "launchers": {p.stem: _load(p) for p in LAUNCHER},
            "rayjobs": {cloud: _rayjob(cloud)[0] for cloud in RAYJOBS},
            "readme": _readme_cluster_section()}


def cuda_disagreements(story: dict) -> list[str]:
    """Where the configs, pyproject.toml, the README and the Dockerfile disagree on the torch build
    (version, CUDA) or where a node image's stated driver is below the build's minimum."""
    out = []
    args, readme = story["args"], story["readme"]
    version, cuda, min_driver = args["TORCH_VERSION"], args["TORCH_CUDA"], int(args["MIN_NVIDIA_DRIVER"])
    pin = next(r for r in tomllib.loads(story["pyproject"])["project"]["dependencies"] if r.startswith("torch"))
    if pin != f"torch=={version}":
        out.append(f"pyproject.toml pins {pin}, the Dockerfile builds torch {version}")
    comment = " ".join(line.lstrip("# ") for line in story["pyproject"].splitlines() if line.startswith("#"))
    for phrase in (f"CUDA {cuda} build", f"driver >= {min_driver}"):
        if phrase not in comment:
            out.append(f"pyproject.toml's comment does not say {phrase!r}")
    if not all(s in story["torch_run"] for s in ("torch.version.cuda", "${TORCH_CUDA}", "${TORCH_VERSION}")):
        out.append("the Dockerfile does not check the installed torch's version and CUDA build")
    if re.search(r"-(gpu|cu\d+)$", story["base"]):
        out.append(f"the base image {story['base']} brings a CUDA of its own beside torch's")
    # what a CPU base lacks and nvidia/cuda images set: the container runtime's GPU request, and
    # the folder where GKE's device plugin mounts the driver's libraries
    for setting in ("NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_DRIVER_CAPABILITIES=compute", "/usr/local/nvidia/lib64"):
        if setting not in story["env"]:
            out.append(f"the image's environment lacks {setting}: its processes would not find the host's driver")
    for name, raw in story["launchers"].items():
        meta, provider = raw["metadata"], raw["provider"]["type"]
        if str(meta["torch_cuda"]) != cuda:
            out.append(f"{name}.yaml states torch CUDA {meta['torch_cuda']}, the Dockerfile builds {cuda}")
        if _driver_branch(meta["nvidia_driver"]) < min_driver:
            out.append(f"{name}.yaml's node image has driver {meta['nvidia_driver']}, CUDA {cuda} needs >= {min_driver}")
        images = {_node_image(provider, t["node_config"]) for t in raw["available_node_types"].values()}
        if images != {meta["node_image"]}:
            out.append(f"{name}.yaml's nodes boot {sorted(images)}, its metadata states {meta['node_image']}")
        family = re.search(r"-nvidia-(\d+)$", meta["node_image"])
        if family and int(family.group(1)) != _driver_branch(meta["nvidia_driver"]):
            out.append(f"{name}.yaml: the image family's driver {family.group(1)} is not the stated one")
        for text in (meta["node_image"], str(meta["nvidia_driver"])):
            if text not in readme:
                out.append(f"the README's cluster section does not name {name}.yaml's {text}")
    for cloud, job in story["rayjobs"].items():
        notes = job["metadata"]["annotations"]
        if str(notes["smart-r1/torch-cuda"]) != cuda:
            out.append(f"the {cloud} RayJob states torch CUDA {notes['smart-r1/torch-cuda']}, the Dockerfile builds {cuda}")
        if _driver_branch(notes["smart-r1/nvidia-driver"]) < min_driver:
            out.append(f"the {cloud} RayJob's GPU nodes have driver {notes['smart-r1/nvidia-driver']}, "
                       f"CUDA {cuda} needs >= {min_driver}")
        if notes["smart-r1/gpu-node-image"] not in readme:
            out.append(f"the README's cluster section does not name the {cloud} GPU node image")
    for phrase in (f"torch {version}", f"CUDA {cuda}", f">= {min_driver}", story["base"]):
        if phrase not in readme:
            out.append(f"the README's cluster section does not say {phrase!r}")
    return out


def test_one_cuda_story():
    story = _cuda_story()
    assert story["args"]["TORCH_CUDA"] == "13.0" and story["args"]["MIN_NVIDIA_DRIVER"] == "580"
    assert cuda_disagreements(story) == []


@pytest.mark.parametrize("change, where", [
    (lambda s: s["launchers"]["gcp"]["metadata"].update(nvidia_driver="550"), "gcp.yaml's node image has driver 550"),
    (lambda s: s["launchers"]["aws"]["available_node_types"]["gpu_learner"]["node_config"].update(ImageId="ami-0123"),
     "aws.yaml's nodes boot"),
    (lambda s: s["rayjobs"]["eks"]["metadata"]["annotations"].update({"smart-r1/torch-cuda": "12.8"}),
     "eks RayJob states torch CUDA 12.8"),
    (lambda s: s["rayjobs"]["gke"]["metadata"]["annotations"].update({"smart-r1/nvidia-driver": "570"}),
     "gke RayJob's GPU nodes have driver 570"),
    (lambda s: s["args"].update(TORCH_VERSION="2.12.0"), "pyproject.toml pins torch==2.13.0"),
    (lambda s: s.update(base="rayproject/ray:2.60.0-py311-gpu"), "brings a CUDA of its own"),
    (lambda s: s.update(env=s["env"].replace("/usr/local/nvidia/lib64", "")), "lacks /usr/local/nvidia/lib64"),
])
def test_one_cuda_story_fails_on_any_disagreement(change, where):
    story = copy.deepcopy(_cuda_story())
    change(story)
    assert any(where in message for message in cuda_disagreements(story)), cuda_disagreements(story)
