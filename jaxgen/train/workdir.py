"""A workdir's config: WORKDIR/config.json, or the copy each checkpoint holds."""
from __future__ import annotations

import json
import logging
import pathlib

from jaxgen.errors import CheckpointError
from jaxgen.train.checkpoint import Checkpointer

log = logging.getLogger(__name__)


def read_config(workdir: str | pathlib.Path) -> dict:
  """WORKDIR/config.json as a dict. If it is damaged (cut by a full disk, say) and the workdir
  has checkpoints, the config stored in the latest one is used instead, with a warning."""
  workdir = pathlib.Path(workdir)
  if not str(workdir).strip():
    raise CheckpointError("--workdir is empty: name a jaxgen workdir.")
  path = workdir / "config.json"
  if not path.is_file():
    raise CheckpointError(f"{workdir} has no config.json: is it a jaxgen workdir?")
  try:
    d = json.loads(path.read_text())
    problem = None if isinstance(d, dict) and "task" in d else "is not a jaxgen config"
  except (UnicodeDecodeError, ValueError) as e:
    problem = f"is not valid JSON ({e})"
  if problem is None:
    return d
  saved = _checkpoint_config(workdir)
  if saved is None:
    raise CheckpointError(f"{path} {problem}, and {workdir} has no checkpoint holding a config. "
                          "Nothing was deleted.")
  log.warning("%s %s; using the config stored in its latest checkpoint. Delete config.json "
              "to silence this: the next train rewrites it.", path, problem)
  return saved


def _checkpoint_config(workdir: pathlib.Path) -> dict | None:
  if not (workdir / "checkpoints").is_dir():
    return None
  ckpt = Checkpointer(workdir / "checkpoints", keep=10 ** 6)
  try:
    step = ckpt.latest_step()
    saved = ckpt.read_meta(step).get("config") if step is not None else None
  finally:
    ckpt.close()
  return saved if isinstance(saved, dict) and "task" in saved else None
