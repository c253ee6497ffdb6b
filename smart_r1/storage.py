"""Files a run writes, written atomically: a reader, or a re-run after a crash at any point, sees
the old content or the new one, never a part.

Local paths: the bytes go to a temporary name in the same folder, are flushed to disk, then
renamed over the target (`os.replace` is atomic on POSIX); a `file://` URI is a local path.
Other URIs (`s3://`, `gs://`, ...) go through `pyarrow.fs` in one upload, where an object
appears only once its upload completes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def resolve(path: str | Path) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path inside it) of a URI (`s3://bucket/key?endpoint_override=...`, `gs://`,
    `file://`, through `pyarrow.fs.FileSystem.from_uri`), or (None, path) for a local path.
    A `file://` URI resolves to the local filesystem, so writes to it stay atomic renames."""
    if not is_uri(path):
        return None, str(path)
    fs, key = pafs.FileSystem.from_uri(str(path))
    if isinstance(fs, pafs.LocalFileSystem):
        return None, key
    return fs, key


def join(base: str | Path, name: str) -> str:
    """`base/name` for a local folder or a URI (keeping a URI's `?query`, e.g. an endpoint)."""
    text = str(base)
    if not is_uri(text):
        return str(Path(text) / name)
    head, sep, query = text.partition("?")
    return f"{head.rstrip('/')}/{name}{sep}{query}"


def exists(path: str | Path) -> bool:
    fs, key = resolve(path)
    if fs is None:
        return Path(key).exists()
    return fs.get_file_info(key).type != pafs.FileType.NotFound


def is_dir(path: str | Path) -> bool:
    fs, key = resolve(path)
    if fs is None:
        return Path(key).is_dir()
    return fs.get_file_info(key).type == pafs.FileType.Directory


def list_files(folder: str | Path, suffix: str) -> list[str]:
    """Names (not paths) of the files directly in `folder` ending in `suffix`, sorted; hidden
    names (temporaries) are left out. FileNotFoundError when the folder does not exist."""
    fs, key = resolve(folder)
    if fs is None:
        if not Path(key).is_dir():
            raise FileNotFoundError(f"no such data folder: {folder}")
        names = [p.name for p in Path(key).iterdir() if p.is_file()]
    else:
        try:
            infos = fs.get_file_info(pafs.FileSelector(key.rstrip("/"), recursive=False))
        except FileNotFoundError:
            raise FileNotFoundError(f"no such data folder: {folder}") from None
        names = [info.base_name for info in infos if info.type == pafs.FileType.File]
    return sorted(n for n in names if n.endswith(suffix) and not n.startswith("."))


def open_input(path: str | Path):
    """A random-access binary file for reading (local or URI), e.g. for `pyarrow.parquet`."""
    fs, key = resolve(path)
    if fs is None:
        return open(key, "rb")
    return fs.open_input_file(key)


def read_bytes(path: str | Path) -> bytes:
    with open_input(path) as f:
        return f.read()


def write_bytes(path: str | Path, data: bytes) -> None:
    fs, key = resolve(path)
    if fs is not None:  # object stores: the object appears only once its upload completes
        with fs.open_output_stream(key) as out:
            out.write(data)
        return
    path = Path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")


def save_torch(value: Any, path: str | Path) -> None:
    """`torch.save` of `value`, atomically."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    write_bytes(path, buffer.getvalue())


def copy_file(source: str | Path, target: str | Path) -> None:
    """Copy a local file atomically (to a temporary name beside `target`, then rename)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.copy.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file ([] when absent)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_log_row(path: str | Path, row: dict, key: str = "progress") -> None:
    """Put `row` into the JSON-lines log at `path`, replacing rows whose `key` is not below the
    row's (a step redone after a crash is logged once), atomically."""
    rows = [r for r in read_jsonl(path) if r.get(key, -1) < row[key]] + [row]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def truncate_log(path: str | Path, first_redone: int, key: str = "progress") -> None:
    """Drop the rows of steps from `first_redone` on (a resumed stage redoes them)."""
    rows = read_jsonl(path)
    kept = [r for r in rows if r.get(key, -1) < first_redone]
    if len(kept) != len(rows):
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
