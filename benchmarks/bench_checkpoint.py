"""What one learner checkpoint costs: the training state of SMART-tiny (`default` preset, 5.5M
parameters) with AdamW's moments, as `worker_kit.report` writes it, serialised and written to a
local folder and uploaded to an S3 bucket (moto's S3 server on 127.0.0.1, started here as the
tests start it), against the same written the way it was before (a Ray Train checkpoint holding
`state.pt` and `model.pt` plus `last_state.pt`, every RL step).

    python benchmarks/bench_checkpoint.py [--repeats 5] [--preset default]

Prints the sizes, the median seconds of each write, and last the line
`state_mb S serialise_s A local_s B s3_s C old_s3_s D`.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smart_r1.distributed.worker_kit import training_state  # noqa: E402
from smart_r1.model.checkpoint import save_checkpoint  # noqa: E402
from smart_r1.model.config import ModelConfig  # noqa: E402
from smart_r1.model.smart_tiny import SmartTiny  # noqa: E402
from smart_r1.storage import join, save_torch, write_bytes  # noqa: E402
from smart_r1.tokens.motion_vocab import NUM_TYPES, SHIFT, MotionVocab  # noqa: E402


def moto_server() -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free port of 127.0.0.1 with a bucket `bench`; (process, URI query)."""
    import pyarrow.fs as pafs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.2)
    query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    fs, _ = pafs.FileSystem.from_uri(f"s3://bench?{query}&allow_bucket_creation=true")
    fs.create_dir("bench")
    return proc, query


def trained_state(preset: str) -> tuple[SmartTiny, torch.optim.Optimizer]:
    """A model of `preset` and an AdamW that has taken one step (its two moments exist)."""
    vocab = MotionVocab(torch.randn(NUM_TYPES, 2048, SHIFT, 3))
    model = SmartTiny(ModelConfig.preset(preset, vocab_size=2048), vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return model, optimizer


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    model, optimizer = trained_state(args.preset)
    state = training_state(model, optimizer, progress=0)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    state_mb = buffer.tell() / 1e6
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(Path(d) / "model.pt", model)
        model_mb = (Path(d) / "model.pt").stat().st_size / 1e6
    print(f"{args.preset} preset: {model.num_parameters():,} parameters; state (weights + AdamW) {state_mb:.1f} MB, "
          f"model.pt {model_mb:.1f} MB", flush=True)

    def serialise():
        torch.save(training_state(model, optimizer, 0), io.BytesIO())

    proc, query = moto_server()
    try:
        with tempfile.TemporaryDirectory() as local:
            serialise_s = timed(serialise, args.repeats)
            local_s = timed(lambda: save_torch(training_state(model, optimizer, 0), join(local, "last_state.pt")),
                            args.repeats)
            s3 = f"s3://bench/run/rft?{query}"
            s3_s = timed(lambda: save_torch(training_state(model, optimizer, 0), join(s3, "last_state.pt")),
                         args.repeats)

            def old_report():  # before: state.pt and model.pt into a Ray Train checkpoint, plus last_state.pt
                with tempfile.TemporaryDirectory() as d:
                    torch.save(training_state(model, optimizer, 0), Path(d) / "state.pt")
                    save_checkpoint(Path(d) / "model.pt", model)
                    write_bytes(join(s3, "last_state.pt"), (Path(d) / "state.pt").read_bytes())
                    for name in ("state.pt", "model.pt"):
                        write_bytes(join(s3, "ray", "checkpoint", name), (Path(d) / name).read_bytes())

            old_s3_s = timed(old_report, args.repeats)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"median of {args.repeats}: serialise {serialise_s:.2f} s; write to a local folder (fsync, rename) "
          f"{local_s:.2f} s; upload to moto S3 {s3_s:.2f} s (serialising included); the old per-step report "
          f"to moto S3 ({2 * state_mb + model_mb:.0f} MB) {old_s3_s:.2f} s", flush=True)
    print(f"state_mb {state_mb:.1f} serialise_s {serialise_s:.2f} local_s {local_s:.2f} s3_s {s3_s:.2f} "
          f"old_s3_s {old_s3_s:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    main()
