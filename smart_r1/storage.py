"""A run's storage: a local folder or a URI (`s3://bucket/prefix?endpoint_override=...`, `gs://`,
`file://`), read and written through `pyarrow.fs`. Every file is written atomically: a reader, or
a re-run after a crash at any point, sees the old content or the new one, never a part.

Local paths: the bytes go to a temporary name in the same folder, are flushed to disk, then
renamed over the target (`os.replace` is atomic on POSIX); a `file://` URI is a local path.
Other URIs (`s3://`, `gs://`, ...) go through `pyarrow.fs` in one upload, where an object
appears only once its upload completes. Folders of an object store are key prefixes: writing a
file "creates" them, and nothing here needs them made first.

Logs (JSON lines, one row per epoch or RL step) are the exception to whole-file writes: a local
log is appended to, a row at a time, and a reader leaves out a last row cut short by a crash;
an object store has no append, so a process batches its rows and uploads them with its
checkpoints (`write_log_row`, `flush_logs`).

Credentials: an object store's come from the environment (AWS_* variables, an instance role, a
GCS service account) or from the URI (`s3://KEY:SECRET@bucket/...`); a URI is written into the
run's records as given (config.json, MLflow params), so keep secrets out of it outside tests.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pyarrow.fs as pafs
import torch


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


# Object stores whose URIs read `scheme://[KEY:SECRET@]bucket/key?options`: one filesystem per
# (bucket, options), built once per process (building one may look up the bucket's region).
_BUCKET_SCHEMES = ("s3", "gs", "gcs")


@functools.lru_cache(maxsize=64)
def _bucket_filesystem(bucket_uri: str) -> tuple[pafs.FileSystem, str]:
    """`pyarrow.fs.FileSystem.from_uri` of a bucket's URI (no key), cached per process."""
    return pafs.FileSystem.from_uri(bucket_uri)


def resolve(path: str | Path) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path inside it) of a URI (`s3://bucket/key?endpoint_override=...`, `gs://`,
    `file://`, through `pyarrow.fs.FileSystem.from_uri`), or (None, path) for a local path.
    A `file://` URI resolves to the local filesystem, so writes to it stay atomic renames. A
    bucket's filesystem is built once per process and reused for every key in it."""
    if not is_uri(path):
        return None, str(path)
    text = str(path)
    scheme, _, rest = text.partition("://")
    if scheme in _BUCKET_SCHEMES:
        head, sep, query = rest.partition("?")
        authority, _, key = head.partition("/")
        fs, bucket = _bucket_filesystem(f"{scheme}://{authority}{sep}{query}")
        key = unquote(key).rstrip("/")
        return fs, f"{bucket}/{key}" if key else bucket
    fs, key = pafs.FileSystem.from_uri(text)
    if isinstance(fs, pafs.LocalFileSystem):
        return None, key
    return fs, key


def is_local(path: str | Path) -> bool:
    """A local folder or a `file://` URI (as opposed to an object store)."""
    return resolve(path)[0] is None


def root(path: str | Path) -> str:
    """A run's storage root as one string: a local path (or `file://` URI) made absolute, so that
    other processes and working directories find the same folder; other URIs as given."""
    fs, key = resolve(path)
    return str(Path(key).resolve()) if fs is None else str(path)


def display(path: str | Path) -> str:
    """A path or URI for messages: a URI's `user:secret@` is left out."""
    text = str(path)
    if not is_uri(text):
        return text
    scheme, _, rest = text.partition("://")
    authority, slash, tail = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{tail}"


def base_name(path: str | Path) -> str:
    """The last component of a path or a URI's key (`s3://b/runs/a?x=1` -> `a`)."""
    key = resolve(path)[1] if is_uri(path) else str(path)
    return Path(key.rstrip("/")).name


def join(base: str | Path, *names: str) -> str:
    """`base/name/...` for a local folder or a URI (keeping a URI's `?query`, e.g. an endpoint)."""
    text = str(base)
    if not is_uri(text):
        return str(Path(text).joinpath(*names))
    head, sep, query = text.partition("?")
    return f"{head.rstrip('/')}/{'/'.join(names)}{sep}{query}"


def parent(path: str | Path) -> str:
    """The folder holding `path` (a URI keeps its `?query`)."""
    text = str(path)
    if not is_uri(text):
        return str(Path(text).parent)
    head, sep, query = text.partition("?")
    return f"{head.rstrip('/').rsplit('/', 1)[0]}{sep}{query}"


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


def glob_files(pattern: str) -> list[str]:
    """The files a path or URI names, sorted (a URI's as URIs): a glob on the base name
    (`s3://bucket/womd/training.tfrecord-*?endpoint_override=...`), every file of a folder, or the
    one file. Hidden names (temporaries) are left out; [] when nothing matches. In a URI `?`
    starts the query (the endpoint), so the glob's wildcards are `*` and `[...]`."""
    if is_local(pattern):  # a local path, or a file:// URI: the local glob (paths returned)
        key = resolve(pattern)[1]
        if Path(key).is_dir():
            return sorted(str(p) for p in Path(key).iterdir() if p.is_file() and not p.name.startswith("."))
        return sorted(p for p in glob.glob(key) if Path(p).is_file())
    head, sep, query = str(pattern).partition("?")
    folder_uri, _, name = head.rstrip("/").rpartition("/")
    if not any(c in name for c in "*["):
        if is_dir(pattern):
            return [join(pattern, n) for n in list_files(pattern, "")]
        return [str(pattern)] if exists(pattern) else []
    folder = f"{folder_uri}{sep}{query}"
    try:
        names = list_files(folder, "")
    except FileNotFoundError:
        return []
    return [join(folder, n) for n in names if fnmatch.fnmatchcase(n, name)]


def open_input(path: str | Path):
    """A random-access binary file for reading (local or URI), e.g. for `pyarrow.parquet`."""
    fs, key = resolve(path)
    if fs is None:
        return open(key, "rb")
    return fs.open_input_file(key)


def open_stream(path: str | Path):
    """A sequential binary stream for reading (local or URI), e.g. a TFRecord file in a bucket."""
    fs, key = resolve(path)
    if fs is None:
        return open(key, "rb")
    return fs.open_input_stream(key)


def read_bytes(path: str | Path) -> bytes:
    """A file's bytes (local or URI); FileNotFoundError when it does not exist."""
    fs, key = resolve(path)
    if fs is None:
        return Path(key).read_bytes()
    try:
        with fs.open_input_stream(key) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {display(path)}") from None


def read_text(path: str | Path) -> str:
    return read_bytes(path).decode()


_ABSENT = object()


def read_json(path: str | Path, default: Any = _ABSENT) -> Any:
    """A JSON file's value; `default` when the file does not exist (FileNotFoundError without one)."""
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        if default is _ABSENT:
            raise
        return default
    return json.loads(data)


def list_names(folder: str | Path) -> list[str]:
    """Names of the files and folders directly in `folder`, sorted ([] when it does not exist);
    hidden names (temporaries, markers) are left out."""
    fs, key = resolve(folder)
    if fs is None:
        names = [p.name for p in Path(key).iterdir()] if Path(key).is_dir() else []
    else:
        try:
            names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(key.rstrip("/"), allow_not_found=True))]
        except FileNotFoundError:
            names = []
    return sorted(n for n in names if not n.startswith("."))


def remove(path: str | Path) -> None:
    """Delete a file; nothing when it does not exist."""
    fs, key = resolve(path)
    if fs is None:
        Path(key).unlink(missing_ok=True)
    elif fs.get_file_info(key).type == pafs.FileType.File:
        fs.delete_file(key)


def remove_tree(path: str | Path) -> None:
    """Delete a folder and everything in it; nothing when it does not exist."""
    fs, key = resolve(path)
    if fs is None:
        shutil.rmtree(key, ignore_errors=True)
    elif fs.get_file_info(key).type == pafs.FileType.Directory:
        fs.delete_dir(key)


def _files_under(folder: str | Path) -> list[str]:
    """Paths of every file under `folder`, relative to it, with '/' separators."""
    fs, key = resolve(folder)
    if fs is None:
        base = Path(key)
        return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
    prefix = key.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(i.path[len(prefix) + 1:] for i in infos if i.type == pafs.FileType.File)


def copy_tree(source: str | Path, target: str | Path, skip: tuple[str, ...] = ()) -> None:
    """Copy every file under `source` to the same place under `target` (local folders or URIs,
    each file atomically), leaving out entries whose first path component is in `skip`."""
    if is_local(source) and is_local(target):
        top = Path(resolve(source)[1])
        shutil.copytree(top, resolve(target)[1], dirs_exist_ok=True,
                        ignore=lambda folder, names: [n for n in names if Path(folder) == top and n in skip])
        return
    for rel in _files_under(source):
        parts = rel.split("/")
        if parts[0] not in skip:
            write_bytes(join(target, *parts), read_bytes(join(source, *parts)))


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
    """Copy a local file to `target` (a local path or a URI) atomically: locally to a temporary
    name beside `target`, then renamed; to an object store in one upload of the whole file."""
    fs, key = resolve(target)
    if fs is not None:
        write_bytes(target, Path(source).read_bytes())  # whole, so a failed read uploads nothing
        return
    target = Path(key)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.copy.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _log_rows(path: str | Path) -> tuple[list[dict], bool]:
    """(rows, whole) of a JSON-lines log ([] when absent); whole is False when the last line was
    cut short (a local append stopped by a crash: every row is written as one line ending in a
    newline, so a last line without one is a torn row, left out)."""
    try:
        text = read_text(path)
    except FileNotFoundError:
        return [], True
    whole = text.endswith("\n") or not text
    lines = text.splitlines() if whole else text.splitlines()[:-1]
    return [json.loads(line) for line in lines if line.strip()], whole


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines log ([] when absent; a torn last row, see `_log_rows`, left out)."""
    return _log_rows(path)[0]


# Rows of object-store logs not uploaded yet, by path (write_log_row / flush_logs).
_PENDING: dict[str, list[dict]] = {}


def write_log_row(path: str | Path, row: dict) -> None:
    """Add `row` to the JSON-lines log at `path`, without rewriting it.

    A local file gets the row appended at once, as one write of a whole line, flushed to disk. An
    object store has no append: its rows wait in this process until `flush_logs` uploads them
    (the learners flush with each checkpoint; rows logged after the newest checkpoint belong to
    work a resumed run redoes and logs again). Rows of work redone after a crash are dropped
    first with `truncate_log`, so each unit is logged once."""
    fs, key = resolve(path)
    if fs is not None:
        _PENDING.setdefault(str(path), []).append(row)
        return
    file = Path(key)
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def flush_logs(key: str = "progress") -> None:
    """Upload the rows `write_log_row` holds for object-store logs: each log is rewritten once
    with them (replacing rows whose `key` is not below its first new row's: a unit is logged once),
    in one upload, so a reader sees the log before or after, never a part. Local logs have nothing
    pending."""
    while _PENDING:
        path, rows = next(iter(_PENDING.items()))
        kept = [r for r in read_jsonl(path) if r.get(key, -1) < rows[0][key]]
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept + rows))
        del _PENDING[path]


def truncate_log(path: str | Path, first_redone: int, key: str = "progress") -> None:
    """Drop the rows of units from `first_redone` on (a resumed stage redoes them), and a torn last
    row, rewriting the log atomically; rows not uploaded yet are dropped alike."""
    rows, whole = _log_rows(path)
    kept = [r for r in rows if r.get(key, -1) < first_redone]
    if len(kept) != len(rows) or not whole:
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    if str(path) in _PENDING:
        _PENDING[str(path)] = [r for r in _PENDING[str(path)] if r.get(key, -1) < first_redone]
        if not _PENDING[str(path)]:
            del _PENDING[str(path)]
