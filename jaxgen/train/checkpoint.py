"""Checkpoints: orbax CheckpointManager in WORKDIR/checkpoints. The only module that imports orbax.

Each step directory holds the TrainState ('state') and a JSON 'meta' item: the config, the data
iterator position and the jaxgen version. orbax writes into a temporary directory and renames it
when complete, so a process killed mid-save leaves the previous steps intact (orbax removes such
unfinished `N.orbax-checkpoint-tmp-*` folders when the manager next starts; older steps beyond
`keep` are removed as orbax's max_to_keep says). As part of each save's commit, a thread off the
training thread waits for orbax's asynchronous finalisation and writes a SHA-256 of every file
(orbax has none: a flipped bit in an array file restores silently). Restoring verifies the
checksums and the saved config before touching arrays. A step without checksums (its writer died
between orbax's commit and the checksum) is suspect: it is restored and accepted only if every
array is finite, else refused with the command that accepts it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxgen import __version__
from jaxgen.config import flatten
from jaxgen.errors import CheckpointError, WriteError
from jaxgen.files import atomic_write_text, check_free_space, describe
from jaxgen.train.mesh import placement

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
  atomic_write_text(step_dir / CHECKSUMS, json.dumps(files, indent=0))  # whole or absent


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


def config_differences(saved: dict, current: dict, defaults: dict | None = None) -> list[str]:
  """The model keys whose values differ between a saved config and the current one. With
  `defaults` (the task's base config), a key that the saved config lacks (it was written before
  jaxgen had that key) reads as its default, so older runs stay loadable."""
  a, b = _model_view(saved), _model_view(current)
  if defaults:
    a = {**{k: v for k, v in _model_view(defaults).items() if k not in a}, **a}
  return [f"{k}: checkpoint has {a.get(k, '<missing>')!r}, config has {b.get(k, '<missing>')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def all_finite(tree) -> list[str]:
  """Key paths of the floating-point arrays of `tree` that hold NaN or Inf."""
  import numpy as np
  bad = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.asarray(leaf)
    if a.dtype.kind in "fc" and not np.isfinite(a).all():
      bad.append(jax.tree_util.keystr(path))
  return bad


class Checkpointer:
  def __init__(self, directory: str | pathlib.Path, *, keep: int = 3):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    # 'state' is a whole TrainState (training checkpoints); 'weights' holds only the parameters
    # and model state (inference checkpoints, e.g. imported Stable Diffusion weights).
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=("state", "meta", "weights"))
    self._sealer: threading.Thread | None = None  # checksums the last save once it commits
    self._seal_error: BaseException | None = None
    # step -> how it was verified: "checksums" (sealed or checked), "finite" (no checksums: its
    # arrays were restored and found finite), absent: not verified
    self.verified: dict[int, str] = {}

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state, meta: dict) -> None:
    self._save(step, "state", state, meta)

  def save_weights(self, step: int, weights: dict, meta: dict) -> None:
    """An inference checkpoint: {'params': ..., 'model_state': ...}, no optimizer state."""
    self._save(step, "weights", weights, meta)

  def _save(self, step: int, item: str, tree, meta: dict) -> None:
    meta = dict(meta, jaxgen_version=__version__, step=int(step))
    self.wait()  # the previous save is committed (and sealed) before orbax starts the next one
    # A save that would fill the disk fails here, before it starts, not inside orbax's writer
    # threads (which abort the process).
    nbytes = sum(getattr(a, "nbytes", 0) for a in jax.tree.leaves(tree))
    check_free_space(self.directory, int(nbytes * 1.05) + 2 ** 20, f"save step {step}")
    try:
      self._mngr.save(step, args=ocp.args.Composite(**{item: ocp.args.StandardSave(tree)},
                                                    meta=ocp.args.JsonSave(meta)), force=True)
    except OSError as e:
      raise WriteError(f"Could not save step {step} in {self.directory}: {describe(e)} ({e}). "
                       "The earlier checkpoints are intact.") from e
    self._start_sealer(int(step))

  def _start_sealer(self, step: int) -> None:
    """Off the training thread: wait for orbax's asynchronous commit, then write the step's
    checksums (only then is the step sealed)."""
    def seal():
      try:
        self._mngr.wait_until_finished()
        if jax.process_index() == 0 and (self._step_dir(step) / "_CHECKPOINT_METADATA").exists():
          write_checksums(self._step_dir(step))
          self.verified[step] = "checksums"
      except BaseException as e:  # reported on the training thread at the next wait()
        self._seal_error = e
    self._sealer = threading.Thread(target=seal, name=f"jaxgen-seal-{step}", daemon=True)
    self._sealer.start()

  def has_weights_only(self, step: int) -> bool:
    d = self._step_dir(step)
    return (d / "weights").is_dir() and not (d / "state").is_dir()

  def wait(self) -> None:
    """Waits until the last save is committed and sealed; a failure there is a WriteError."""
    if self._sealer is not None:
      self._sealer.join()
      self._sealer = None
    self._mngr.wait_until_finished()
    if self._seal_error is not None:
      e, self._seal_error = self._seal_error, None
      cause = describe(e) if isinstance(e, OSError) else f"{type(e).__name__}: {_first_line(e)}"
      raise WriteError(f"Saving a checkpoint in {self.directory} failed: {cause}. The earlier "
                       "checkpoints are intact.") from e

  def close(self) -> None:
    try:
      self.wait()
    finally:
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
    sealed = verify_checksums(self._step_dir(step))
    meta = self.read_meta(step)
    item = "weights" if self.has_weights_only(step) else "state"
    tree = restore_weights(self._step_dir(step), item)
    if not sealed:
      self.accept_unsealed(step, tree)
    return tree, meta

  def accept_unsealed(self, step: int, tree) -> None:
    """A step without checksums: accepted (and sealed now, where the folder is writable) only
    if every restored array is finite; else a CheckpointError with the command that accepts it."""
    bad = all_finite(tree)
    d = self._step_dir(step)
    if bad:
      raise CheckpointError(
          f"Checkpoint {d} has no checksums (its writer stopped right after saving) and holds "
          f"NaN or Inf in {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}: it is damaged. "
          f"Nothing was deleted. Move that directory aside to resume from the previous step "
          f"({self._previous(step)}), or accept it as it is with: jaxgen verify --workdir "
          f"{self.directory.parent} --step {step} --accept")
    log.warning("Checkpoint %s had no checksums (its writer stopped right after saving); its "
                "arrays were restored and are all finite, so it is accepted.", d)
    self.verified[step] = "finite"
    if jax.process_index() == 0:
      try:
        write_checksums(d)
      except OSError:
        pass  # a read-only workdir: it stays unsealed, and is checked like this again

  def restore(self, step: int, abstract_state, config_dict: dict, item: str = "state",
              defaults: dict | None = None) -> tuple[Any, dict]:
    """Restores `step` into the structure and shardings of `abstract_state` after checking that
    the checkpoint was written by the same model config (`config_differences` with `defaults`).
    item: 'state' or 'weights'."""
    sealed = verify_checksums(self._step_dir(step))
    meta = self.read_meta(step)
    diffs = config_differences(meta.get("config", {}), config_dict, defaults)
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
    if sealed:
      self.verified[step] = "checksums"
    else:
      self.accept_unsealed(step, restored)
    return restored, meta


def restore_weights(step_dir: pathlib.Path, item: str) -> dict:
  """{'params', 'model_state'} of a checkpoint's TrainState ('state': its EMA parameters) or of
  an inference checkpoint ('weights'), without a target tree: shapes and structure come from the
  checkpoint's own metadata, and the optimizer state is never read. Arrays are replicated over
  the mesh set by jax.set_mesh, else on one device."""
  path = step_dir / item
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(path)
    tree = dict(getattr(tree, "tree", tree))
    names = ("ema_params", "model_state") if item == "state" else ("params", "model_state")
    sub = {k: tree[k] for k in names if k in tree}
    where = placement()
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=where), sub)
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


def verify_steps(directory: str | pathlib.Path, steps=None, *, accept: bool = False) -> dict:
  """step -> what was found: 'ok' (checksums match), 'no checksums' (restored and all arrays
  finite: suspect but sound; with accept, sealed now), 'no checksums, non-finite: ...', or the
  corruption message. With accept, a step without checksums is sealed as it is."""
  ckpt = Checkpointer(directory, keep=10 ** 6)
  out = {}
  try:
    for step in (ckpt.all_steps() if steps is None else steps):
      d = ckpt._step_dir(step)
      if not d.is_dir():
        out[step] = "missing"
        continue
      try:
        if verify_checksums(d):
          out[step] = "ok"
          continue
      except CheckpointError as e:
        out[step] = str(e)
        continue
      item = "weights" if ckpt.has_weights_only(step) else "state"
      bad = all_finite(restore_weights(d, item))
      out[step] = "no checksums" + (f", non-finite: {', '.join(bad[:4])}" if bad else "")
      if accept:
        write_checksums(d)
        out[step] += "; accepted (checksums written)"
  finally:
    ckpt.close()
  return out
