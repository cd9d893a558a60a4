"""Checkpoints: orbax CheckpointManager in WORKDIR/checkpoints. The only module that imports orbax.

Each step directory holds the TrainState ('state') and a JSON 'meta' item: the config, the data
iterator position and the jaxgen version. orbax writes into a temporary directory and renames it
when complete, so a process killed mid-save leaves the previous steps intact. Once a save is
complete, jaxgen adds a checksum of every file (orbax has none: a flipped bit in an array file
restores silently). Restoring verifies the checksums and the saved config before touching
arrays, and never deletes anything.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
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
CHECKSUMS = "jaxgen_checksums.json"


def _file_digest(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with path.open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def write_checksums(step_dir: pathlib.Path) -> None:
  files = {str(p.relative_to(step_dir)): [p.stat().st_size, _file_digest(p)]
           for p in sorted(step_dir.rglob("*")) if p.is_file() and p.name != CHECKSUMS}
  tmp = step_dir / (CHECKSUMS + ".tmp")
  tmp.write_text(json.dumps(files, indent=0))
  os.replace(tmp, step_dir / CHECKSUMS)  # atomic: a checksum file is whole or absent


def verify_checksums(step_dir: pathlib.Path) -> bool:
  """Raises CheckpointError naming the first damaged file; False if there is no checksum file
  (a checkpoint from a process that died between orbax's commit and the checksum)."""
  path = step_dir / CHECKSUMS
  if not path.exists():
    return False
  try:
    files = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is unreadable ({e}). Nothing was deleted.") from e
  for rel, (size, digest) in files.items():
    p = step_dir / rel
    problem = ("is missing" if not p.is_file() else
               f"has {p.stat().st_size} bytes, expected {size}" if p.stat().st_size != size else
               "does not match its checksum" if _file_digest(p) != digest else None)
    if problem:
      raise CheckpointError(
          f"Checkpoint {step_dir} is corrupt: {rel} {problem}. Nothing was deleted. Move that "
          "directory aside to resume from the previous step.")
  return True


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
    # 'state' is a whole TrainState (training checkpoints); 'weights' holds only the parameters
    # and model state (inference checkpoints, e.g. imported Stable Diffusion weights).
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=("state", "meta", "weights"))
    self._unsealed: list[int] = []  # saved by this process, checksums not yet written

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state, meta: dict) -> None:
    meta = dict(meta, jaxgen_version=__version__, step=int(step))
    self._seal()  # the previous async save is complete before orbax starts the next one
    self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  meta=ocp.args.JsonSave(meta)), force=True)
    self._unsealed.append(int(step))

  def save_weights(self, step: int, weights: dict, meta: dict) -> None:
    """An inference checkpoint: {'params': ..., 'model_state': ...}, no optimizer state."""
    meta = dict(meta, jaxgen_version=__version__, step=int(step))
    self._seal()
    self._mngr.save(step, args=ocp.args.Composite(weights=ocp.args.StandardSave(weights),
                                                  meta=ocp.args.JsonSave(meta)), force=True)
    self._unsealed.append(int(step))

  def has_weights_only(self, step: int) -> bool:
    d = self._step_dir(step)
    return (d / "weights").is_dir() and not (d / "state").is_dir()

  def _seal(self) -> None:
    """Waits for pending saves, then checksums the steps this process saved."""
    self._mngr.wait_until_finished()
    if jax.process_index() == 0:
      existing = set(self.all_steps())
      for step in self._unsealed:
        if step in existing:
          write_checksums(self._step_dir(step))
    self._unsealed = []

  def wait(self) -> None:
    self._seal()

  def close(self) -> None:
    self._seal()
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

  def restore_weights(self, step: int) -> tuple[dict, dict]:
    """({'params', 'model_state'}, meta) of `step`, checksums verified, without a target tree
    (see restore_weights); for inference and for loading pretrained towers."""
    if not verify_checksums(self._step_dir(step)):
      log.warning("Checkpoint %s has no checksums (its writer stopped right after saving); "
                  "restoring it unverified.", self._step_dir(step))
    meta = self.read_meta(step)
    item = "weights" if self.has_weights_only(step) else "state"
    return restore_weights(self._step_dir(step), item), meta

  def restore(self, step: int, abstract_state, config_dict: dict, item: str = "state"
              ) -> tuple[Any, dict]:
    """Restores `step` into the structure and shardings of `abstract_state` after checking that
    the checkpoint was written by the same model config. item: 'state' or 'weights'."""
    if not verify_checksums(self._step_dir(step)):
      log.warning("Checkpoint %s has no checksums (its writer stopped right after saving); "
                  "restoring it unverified.", self._step_dir(step))
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
          step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))[item]
    except Exception as e:
      raise CheckpointError(
          f"Checkpoint {self._step_dir(step)} is corrupt or does not match the model "
          f"({type(e).__name__}: {_first_line(e)}). Nothing was deleted. Move that directory "
          f"aside to resume from the previous step ({self._previous(step)}).") from e
    return restored, meta


def restore_weights(step_dir: pathlib.Path, item: str) -> dict:
  """{'params', 'model_state'} of a checkpoint's TrainState ('state': its EMA parameters) or of
  an inference checkpoint ('weights'), without a target tree: shapes and structure come from the
  checkpoint's own metadata, and the optimizer state is never read. Arrays land on one device."""
  path = step_dir / item
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(path)
    tree = dict(getattr(tree, "tree", tree))
    names = ("ema_params", "model_state") if item == "state" else ("params", "model_state")
    sub = {k: tree[k] for k in names if k in tree}
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), sub)
    out = ocp.Checkpointer(handler).restore(path, args=ocp.args.PyTreeRestore(
        item=sub, restore_args=restore_args, partial_restore=True))
  except Exception as e:
    raise CheckpointError(
        f"Checkpoint {step_dir} is corrupt or unreadable ({type(e).__name__}: "
        f"{_first_line(e)}). Nothing was deleted.") from e
  return {"params": out.get(names[0]), "model_state": out.get("model_state") or {}}


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else ""
