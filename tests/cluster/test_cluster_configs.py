"""The cluster configs are valid for their tools and fit the GPU pipeline config."""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import pytest
import yaml

from smart_r1.config import load_config

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = [REPO / "cluster" / "aws.yaml", REPO / "cluster" / "gcp.yaml"]
RAYJOB = REPO / "cluster" / "kuberay-rayjob.yaml"


def _dockerfile_base() -> str:
    return re.search(r"^FROM\s+(\S+)", (REPO / "Dockerfile").read_text(), re.M).group(1)


def _pipeline_from_entrypoint(entrypoint: str):
    args = shlex.split(entrypoint)
    assert args[:2] == ["python", "pipelines/sft_rft_sft.py"]
    assert (REPO / args[1]).exists() or args[1] == "pipelines/sft_rft_sft.py"
    config = args[args.index("--config") + 1]
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    # data paths exist on the cluster, not here
    overrides = [o for o in overrides if not o.startswith("data.")]
    return load_config(REPO / config, overrides)


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


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_configs(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    validate_config(prepare_config(yaml.safe_load(path.read_text())))  # Ray's own schema
    assert raw["docker"]["image"].endswith("smart-r1:latest")
    types = raw["available_node_types"]
    assert types[raw["head_node_type"]]["resources"]["CPU"] == 0
    assert {"gpu_learner", "cpu_rollout"} <= set(types)
    assert all(types[n]["min_workers"] == 0 for n in ("gpu_learner", "cpu_rollout"))
    storage = raw["metadata"]["storage_path"]
    assert storage.startswith("s3://" if raw["provider"]["type"] == "aws" else "gs://")
    pipeline = _pipeline_from_entrypoint(raw["metadata"]["entrypoint"])
    assert pipeline.ray.use_gpu
    nodes = {n: {**t["resources"], "max_workers": t["max_workers"]} for n, t in types.items()}
    _fits(pipeline, nodes)
    assert _dockerfile_base().startswith("rayproject/ray:2.60.0-py311")


def test_kuberay_rayjob():
    job = yaml.safe_load(RAYJOB.read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == _dockerfile_base().split(":")[1].split("-")[0]
    pipeline = _pipeline_from_entrypoint(spec["entrypoint"])
    nodes = {}
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] == 0
        container = group["template"]["spec"]["containers"][0]
        assert container["image"].endswith("smart-r1:latest")
        limits = container["resources"]["limits"]
        assert float(group["rayStartParams"]["num-cpus"]) <= float(limits["cpu"])
        gpus = float(group["rayStartParams"].get("num-gpus", 0))
        assert gpus == float(limits.get("nvidia.com/gpu", 0))
        nodes[group["groupName"]] = {"CPU": float(group["rayStartParams"]["num-cpus"]), "GPU": gpus,
                                     "max_workers": group["maxReplicas"]}
    _fits(pipeline, nodes)
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
