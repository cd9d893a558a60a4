"""Writing files without losing data: small files are written atomically (a temporary file in
the same folder, fsync, rename), and a failed write (full disk, read-only folder, permission) is
a WriteError naming the path and the cause instead of a traceback."""
from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import shutil

from jaxgen.errors import WriteError

_CAUSES = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
           errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
           errno.EPERM: "permission denied", errno.ENOTDIR: "a part of the path is a file",
           errno.EEXIST: "it exists and is not a folder", errno.EISDIR: "it is a folder"}


def describe(e: OSError) -> str:
  return _CAUSES.get(e.errno, e.strerror or str(e))


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str = "write"):
  """Turns an OSError inside the block into a WriteError that names `path` and the cause."""
  try:
    yield
  except WriteError:
    raise
  except OSError as e:
    raise WriteError(f"Could not {what} {path}: {describe(e)} ({e.strerror or e}). Nothing that "
                     "was saved before was changed.") from e


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
  """Writes `data` to `path` so that `path` is always either the old file or the whole new one:
  a temporary file beside it, flushed to disk, then renamed over it."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with writing(path):
    try:
      with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    finally:
      if tmp.exists():
        tmp.unlink()
  return path


def atomic_write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
  return atomic_write_bytes(path, text.encode("utf-8"))


def append_text(path: str | os.PathLike, text: str) -> None:
  with writing(path, "append to"):
    with open(path, "a", encoding="utf-8") as f:
      f.write(text)


def make_dir(path: str | os.PathLike, what: str = "workdir") -> pathlib.Path:
  """Creates a folder (and its parents), with a WriteError naming the problem: the path is a
  file, or cannot be created."""
  path = pathlib.Path(path)
  if path.exists() and not path.is_dir():
    raise WriteError(f"The {what} {path} is a file, not a folder: choose another path.")
  with writing(path, f"create the {what}"):
    path.mkdir(parents=True, exist_ok=True)
  return path


def check_writable(directory: str | os.PathLike, what: str = "workdir") -> None:
  """WriteError unless a file can be created in `directory` (read-only mounts, permissions)."""
  directory = pathlib.Path(directory)
  probe = directory / f".jaxgen-write-test-{os.getpid()}"
  with writing(directory, f"write into the {what}"):
    probe.write_bytes(b"")
    probe.unlink()


def check_free_space(directory: str | os.PathLike, needed: int, what: str) -> None:
  """WriteError when the file system of `directory` has less than `needed` bytes free: a save
  that would fill the disk fails before it starts, and the earlier checkpoints stay as they
  are."""
  free = shutil.disk_usage(directory).free
  if free < needed:
    raise WriteError(f"Not enough disk space to {what} in {directory}: it needs about "
                     f"{needed / 2 ** 20:,.0f} MiB and {free / 2 ** 20:,.0f} MiB are free. Free "
                     "some space and run the same command again: it resumes from the last "
                     "checkpoint, which is intact.")
