"""One storage root for a run, local or in a bucket (moto's S3 server on 127.0.0.1): run records,
the stage log and branches in a bucket, and the embedded SUMO data generated into it once. The
whole pipeline on a bucket root, killed and resumed from another working directory, runs on a
multi-node cluster whose nodes share no files: test_multinode.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from smart_r1.config import load_config
from smart_r1.distributed.run_identity import INIT, branch, check_run, record_stage
from smart_r1.storage import (copy_tree, exists, flush_logs, join, list_names, read_bytes, read_json, read_jsonl,
                              truncate_log, write_bytes, write_log_row)

TINY = Path(__file__).resolve().parents[2] / "pipelines" / "tiny.yaml"


def test_run_records_log_rows_and_branches_in_a_bucket(bucket, tmp_path):
    """Run identity, the stage log and folder copies on S3 (no Ray)."""
    out = bucket("identity/run")
    config = load_config(TINY, [f"out_dir={out}"])
    write_bytes(join(out, "init.pt"), b"init")
    record_stage(config, INIT)
    for stage in config.stages:
        write_bytes(join(out, stage.name, "model.pt"), stage.name.encode())
        record_stage(config, stage.name)
    write_bytes(join(out, "ray", "state.json"), b"{}")
    check_run(config)
    assert list_names(out) == ["bc", "init.pt", "ray", "rft", "run.json", "sft", "sft_final"]
    with pytest.raises(ValueError, match=r"stage 'rft' was made with different stages\.rft\.alpha") as e:
        check_run(load_config(TINY, [f"out_dir={out}", "rft.alpha=0.5"]))
    assert "s3://smart-r1/identity/run" in str(e.value)
    new = bucket("identity/branch")
    branched = branch(load_config(TINY, [f"out_dir={out}", "sft_final.lr=1e-5"]), new)
    assert branched.out_dir == new
    assert read_bytes(join(new, "rft", "model.pt")) == b"rft" and not exists(join(new, "sft_final"))
    assert not exists(join(new, "ray")), "Ray Train's state stays with its run"
    assert exists(join(out, "sft_final", "model.pt")), "the old run is untouched"
    # a bucket has no append: rows wait in the process until flushed (with each checkpoint)
    log = join(out, "bc", "train_log.jsonl")
    for step in (0, 1):
        write_log_row(log, {"progress": step, "loss": float(step)})
    assert read_jsonl(log) == []
    flush_logs()
    assert [r["progress"] for r in read_jsonl(log)] == [0, 1]
    write_log_row(log, {"progress": 2, "loss": 2.0})
    truncate_log(log, 1)  # resumed after step 0: steps 1 and 2 are redone, pending or uploaded
    write_log_row(log, {"progress": 1, "loss": 10.0})
    flush_logs()
    assert [(r["progress"], r["loss"]) for r in read_jsonl(log)] == [(0, 0.0), (1, 10.0)]
    copy_tree(out, tmp_path / "local", skip=("ray",))
    assert (tmp_path / "local" / "bc" / "train_log.jsonl").exists()


@pytest.mark.slow
def test_embedded_data_is_generated_into_the_bucket_once(bucket, monkeypatch):
    from smart_r1.data.dataset import count_scenarios
    from smart_r1.distributed import pipeline

    train = bucket("generated/data/train")
    assert pipeline.generate_into_store(train, "train", 2, seed=3) == train
    assert count_scenarios(train) == 2
    assert read_json(join(train, "generated.json")) == {"scenarios": 2, "seed": 3, "per_network": 0}
    assert read_json(join(train, "preprocess_report.json"))["scenarios"] == 2
    monkeypatch.setattr(pipeline, "make_dataset", lambda *a, **k: pytest.fail("a finished set was remade"))
    pipeline.generate_into_store(train, "train", 2, seed=3)
