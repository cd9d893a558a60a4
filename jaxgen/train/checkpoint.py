"""Checkpoints: orbax CheckpointManager in WORKDIR/checkpoints. The only module that imports orbax.

Each step directory holds the TrainState ('state') and a JSON 'meta' item: the config, the data
iterator position and the jaxgen version. orbax writes into a temporary directory and renames it
when complete, so a process killed mid-save leaves the previous steps intact. Restoring checks
the saved config against the current one before touching arrays, and never deletes anything.
"""
from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxgen import __version__
from jaxgen.config import flatten
from jaxgen.errors import CheckpointError

log = logging.getLogger(__name__)

# Sections of the config that decide the shapes and meaning of the parameters: a checkpoint
# written under other values cannot be resumed or used by this config.
MODEL_SECTIONS = ("task", "model", "data.image_size", "data.channels")


def _model_view(config_dict: dict) -> dict[str, Any]:
  flat = flatten(config_dict)
  return {k: v for k, v in flat.items()
          if any(k == s or k.startswith(s + ".") for s in MODEL_SECTIONS)}


def config_differences(saved: dict, current: dict) -> list[str]:
  a, b = _model_view(saved), _model_view(current)
  return [f"{k}: checkpoint has {a.get(k, '<missing>')!r}, config has {b.get(k, '<missing>')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class Checkpointer:
  def __init__(self, directory: str | pathlib.Path, *, keep: int = 3):
    self.directory = pathlib.Path(directory).absolute()
    # cleanup_tmp_directories stays False: a half-written step is left for the user to inspect.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state, meta: dict) -> None:
    meta = dict(meta, jaxgen_version=__version__, step=int(step))
    self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()

  def _step_dir(self, step: int) -> pathlib.Path:
    return self.directory / str(step)

  def read_meta(self, step: int) -> dict:
    try:
      return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:
      raise CheckpointError(
          f"Checkpoint {self._step_dir(step)} is corrupt or unreadable (its metadata could not be "
          f"read: {type(e).__name__}: {_first_line(e)}). Nothing was deleted. Move that directory "
          f"aside to resume from the previous step ({self._previous(step)}).") from e

  def _previous(self, step: int) -> str:
    earlier = [s for s in self.all_steps() if s < step]
    return f"step {max(earlier)}" if earlier else "no earlier checkpoint: training restarts"

  def restore(self, step: int, abstract_state, config_dict: dict) -> tuple[Any, dict]:
    """Restores `step` into the structure and shardings of `abstract_state` after checking that
    the checkpoint was written by the same model config."""
    meta = self.read_meta(step)
    diffs = config_differences(meta.get("config", {}), config_dict)
    if diffs:
      raise CheckpointError(
          f"Checkpoint {self._step_dir(step)} was written by another model config:\n  "
          + "\n  ".join(diffs) + "\nUse another --workdir for this config, or the saved config "
          "(WORKDIR/config.json). Nothing was deleted.")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    try:
      restored = self._mngr.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
    except Exception as e:
      raise CheckpointError(
          f"Checkpoint {self._step_dir(step)} is corrupt or does not match the model "
          f"({type(e).__name__}: {_first_line(e)}). Nothing was deleted. Move that directory "
          f"aside to resume from the previous step ({self._previous(step)}).") from e
    return restored, meta


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else ""
