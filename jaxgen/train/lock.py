"""One writer per workdir: `train` holds WORKDIR/jaxgen.lock (host, PID, start time) while it
runs. A second `train` on the same workdir stops at once with a message naming the holder;
readers (`sample`, `eval`, `generate`) never take the lock. A lock left by a process that no
longer runs on this host is stale and taken over with a warning. `wait_until_free` lets a
reader that needs the finished run (the metric's shared feature network) wait for the writer."""
from __future__ import annotations

import json
import logging
import os
import pathlib
import socket
import time

from jaxgen.errors import WorkdirBusyError
from jaxgen.files import writing

log = logging.getLogger(__name__)

LOCK_FILE = "jaxgen.lock"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _read(path: pathlib.Path) -> dict:
  try:
    holder = json.loads(path.read_text())
    return holder if isinstance(holder, dict) else {}
  except (OSError, ValueError):
    return {}


class WorkdirLock:
  """Context manager: takes WORKDIR/jaxgen.lock on enter, removes it on exit."""

  def __init__(self, workdir: str | os.PathLike):
    self.path = pathlib.Path(workdir) / LOCK_FILE
    self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    self.held = False

  def _create(self) -> bool:
    with writing(self.path, "create the lock"):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        json.dump(self.me, f)
    return True

  def acquire(self) -> None:
    for _ in range(3):
      if self._create():
        self.held = True
        return
      holder = _read(self.path)
      pid, host = holder.get("pid"), holder.get("host")
      if host == self.me["host"] and isinstance(pid, int) and pid == self.me["pid"]:
        raise WorkdirBusyError(f"{self.path.parent} is already being trained by this process.")
      if host == self.me["host"] and isinstance(pid, int) and not _alive(pid):
        log.warning("Taking over the stale lock %s of process %d, which no longer runs.",
                    self.path, pid)
        try:
          self.path.unlink()
        except FileNotFoundError:
          pass
        continue
      if not holder:  # being written this instant, or unreadable: look again
        time.sleep(0.05)
        continue
      since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
      raise WorkdirBusyError(
          f"{self.path.parent} is being trained by process {pid} on host {host} (since "
          f"{since}): one training per workdir. Wait for it to finish, or use another "
          f"--workdir; sample, eval and generate can read it meanwhile. If that process no "
          f"longer runs, delete {self.path}.")
    raise WorkdirBusyError(f"Could not take the lock {self.path}: it keeps changing.")

  def release(self) -> None:
    if self.held:
      self.held = False
      if _read(self.path).get("pid") == self.me["pid"]:
        self.path.unlink(missing_ok=True)

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


def live_holder(workdir: str | os.PathLike) -> dict | None:
  """The holder of WORKDIR's lock if a process holds it (on another host: assumed alive),
  else None (no lock, or a stale one of a process of this host that no longer runs)."""
  path = pathlib.Path(workdir) / LOCK_FILE
  if not path.exists():
    return None
  holder = _read(path)
  pid = holder.get("pid")
  if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
    return None
  return holder or {"pid": None, "host": None}   # being written this instant: held


def wait_until_free(workdir: str | os.PathLike, *, poll_s: float = 1.0) -> bool:
  """Blocks while a live process holds WORKDIR's lock; True if it had to wait."""
  holder = live_holder(workdir)
  if holder is None:
    return False
  log.info("%s is being trained by process %s on host %s: waiting for it to finish (if that "
           "process no longer runs, delete %s).", workdir, holder.get("pid"), holder.get("host"),
           pathlib.Path(workdir) / LOCK_FILE)
  while live_holder(workdir) is not None:
    time.sleep(poll_s)
  return True
