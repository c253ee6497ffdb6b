"""Batch preprocessing: WOMD Scenario TFRecords -> Parquet shards, in parallel over files with Ray.

One shard per input file, written atomically to a local folder or a URI (`s3://`, `gs://`,
`file://`, through pyarrow.fs); a re-run skips finished shards. Bad records are
skipped, listed in `preprocess_report.json` and make the run's exit status non-zero.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray

from smart_r1.data.dataset import expand_inputs
from smart_r1.data.parquet import num_rows, write_shard
from smart_r1.data.tfrecord import RecordError, read_records
from smart_r1.data.womd import parse_scenario
from smart_r1.ray_runtime import ensure_ray
from smart_r1.storage import base_name, exists, join, read_bytes, resolve, write_json

REPORT_NAME = "preprocess_report.json"


@dataclass(frozen=True)
class BadRecord:
    file: str
    record: int  # index of the record in the file; -1 when the whole file failed
    error: str


@dataclass
class FileResult:
    file: str
    shard: str
    scenarios: int = 0
    skipped: bool = False  # the shard existed from an earlier run
    bad: list[BadRecord] = field(default_factory=list)


def shard_name(path: str | Path) -> str:
    name = base_name(path)  # a URI's key, without its ?query
    for suffix in (".tfrecord", ".tfrecords"):
        if suffix in name:
            name = name.replace(suffix, "")
    return name + ".parquet"


def convert_file(path: str, out_dir: str) -> FileResult:
    """Convert one TFRecord file into one shard in `out_dir` (a local folder or a URI); never
    raises for bad data."""
    shard = join(out_dir, shard_name(path))
    bad_list = join(out_dir, shard_name(path) + ".bad.json")  # this file's bad records, for re-runs
    result = FileResult(file=path, shard=shard)
    if exists(shard):
        result.skipped = True
        result.scenarios = num_rows(shard)
        if exists(bad_list):
            result.bad = [BadRecord(**b) for b in json.loads(read_bytes(bad_list))]
        return result
    records = []
    index = -1
    try:
        for index, data in enumerate(read_records(path)):
            try:
                records.append(parse_scenario(data, path, index))
            except RecordError as e:
                result.bad.append(BadRecord(path, e.index, e.reason))
    except RecordError as e:  # a damaged frame: nothing after it can be read
        result.bad.append(BadRecord(path, e.index, e.reason))
    except OSError as e:
        result.bad.append(BadRecord(path, -1, f"cannot read file: {e}"))
    # The bad list goes first: a finished shard always has its bad list beside it.
    if result.bad:
        write_json(bad_list, [asdict(b) for b in result.bad])
    write_shard(shard, records)
    result.scenarios = len(records)
    return result


def preprocess(pattern: str, out_dir: str | Path, num_workers: int | None = None,
               verbose: bool = True) -> dict:
    """Convert every file matching `pattern`; returns the report (also written to out_dir).
    `out_dir` is a local folder or a URI (`file://`, `s3://bucket/prefix`, `gs://...`): shards go
    there through pyarrow.fs, each written whole or not at all, so a re-run skips finished ones."""
    paths = expand_inputs(pattern)
    fs, local = resolve(out_dir)
    if fs is None:
        Path(local).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ensure_ray(num_workers)
    task = ray.remote(num_cpus=1)(convert_file)
    pending = [task.remote(p, str(out_dir)) for p in paths]
    results: list[FileResult] = []
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        results.append(ray.get(done[0]))
        if verbose:
            r = results[-1]
            state = "skipped (done before)" if r.skipped else f"{r.scenarios} scenarios, {len(r.bad)} bad"
            print(f"[{len(results)}/{len(paths)}] {r.file}: {state}", flush=True)
    results.sort(key=lambda r: r.file)
    bad = [asdict(b) for r in results for b in r.bad]
    report = {
        "files": len(paths),
        "files_skipped": sum(r.skipped for r in results),
        "scenarios": sum(r.scenarios for r in results),
        "bad_records": bad,
        "seconds": round(time.perf_counter() - started, 3),
        "shards": [r.shard for r in results],
    }
    write_json(join(out_dir, REPORT_NAME), report)
    return report
