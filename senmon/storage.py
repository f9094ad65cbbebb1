"""The storage root as a filesystem: a local directory or any URI pyarrow understands (s3://...).

Everything durable in senmon (datasets, the tokenizer, the registry file, Ray Train
checkpoints) lives under the storage root; this module turns the root into a pyarrow
filesystem plus base path and offers the one write primitive the rest relies on: write under a
temporary name, then rename, so readers see the old file or the new one and never half of one.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from senmon.config import is_uri


def filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, base path inside it) for a storage root."""
    if is_uri(root):
        fs, base = pafs.FileSystem.from_uri(root)
        return fs, base.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(root).resolve())


def new_run_id(prefix: str) -> str:
    """A training or merge run's id, which also names its checkpoint directory under the storage root: the time to
    the second for people reading a listing, and a random suffix, because the registry treats a second `register`
    with a known run id as a retry and returns the version already there (two merges within one second once did)."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes | None:
    """The file's content, or None when it does not exist."""
    if not exists(fs, path):
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` so that no reader ever sees a partial file (fsync'd when local)."""
    directory = path.rsplit("/", 1)[0]
    fs.create_dir(directory, recursive=True)
    if is_local(fs):
        tmp = f"{directory}/.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself survives a crash
        finally:
            os.close(fd)
    else:  # object stores: one PUT is atomic
        with fs.open_output_stream(path) as stream:
            stream.write(data)
