"""The Ray Train learner: a `TorchTrainer` (Train V2) whose workers run one stage's training loop.

Ray Train checkpoints are reported every epoch / RL step, resumed after a worker failure through
`FailureConfig`, and copied to the stage folder so that a re-run of the pipeline resumes too. The
loops are `supervised_loop` (BC, CAT-K SFT) and `mpo_loop` (RFT); what they share is
`worker_kit`.
"""

from __future__ import annotations

from pathlib import Path

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from smart_r1.config import RayConfig
from smart_r1.distributed.mpo_loop import mpo_loop
from smart_r1.distributed.supervised_loop import supervised_loop
from smart_r1.distributed.worker_kit import MODEL_NAME, LearnerJob
from smart_r1.storage import copy_file


def run_learner(job: LearnerJob, ray_cfg: RayConfig, storage_path: str) -> str:
    """Run the stage's loop on a TorchTrainer; returns the path of the final SMART-tiny checkpoint."""
    loop = mpo_loop if job.stage.kind == "mpo" else supervised_loop
    Path(job.stage_dir).mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        loop,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=ray_cfg.num_learners, use_gpu=ray_cfg.use_gpu,
                                     resources_per_worker={"CPU": ray_cfg.cpus_per_learner,
                                                           **({"GPU": 1} if ray_cfg.use_gpu else {})}),
        run_config=RunConfig(name=job.run_name or f"{Path(job.stage_dir).parent.name}-{job.stage.name}",
                             storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=ray_cfg.max_learner_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=ray_cfg.keep_checkpoints)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"stage {job.stage.name}: learner failed") from result.error
    out = Path(job.stage_dir) / MODEL_NAME
    with result.checkpoint.as_directory() as d:
        copy_file(Path(d) / MODEL_NAME, out)
    return str(out)
