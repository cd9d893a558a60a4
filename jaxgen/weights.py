"""Weights without the loop: (config, params, model state, tokenizer) of a workdir, read without
building a task or a trainer and without reading any data set; and the writing of an
inference-only run (how imported weights become a run).

A run's tokenizer lives inside its workdir (WORKDIR/tokenizer/: `words.json` for the word
tokenizer, CLIP's vocab.json + merges.txt for BPE), so a run loads the same after `mv` or a copy
to another machine. Pretrained towers, judges, feature networks and pipelines load through here.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import shutil
from typing import Any

import ml_collections

from jaxgen import config as config_lib
from jaxgen.errors import CheckpointError, ConfigError
from jaxgen.files import atomic_write_text, make_dir
from jaxgen.text.store import TOKENIZER_DIR, load_tokenizer, save_tokenizer
from jaxgen.train.checkpoint import Checkpointer, config_differences
from jaxgen.train.workdir import read_config

__all__ = ["TOKENIZER_DIR", "Weights", "image_encoder_of", "load_tokenizer", "load_weights",
           "read_config", "save_tokenizer", "save_weights"]

log = logging.getLogger(__name__)



@dataclasses.dataclass
class Weights:
  """What inference needs of a run. `params` are the EMA parameters of a trained run (or the
  imported ones); `config` is the saved config as a dict; `tokenizer` is None for runs without
  text."""
  workdir: pathlib.Path
  config: dict
  step: int
  params: Any
  model_state: Any
  tokenizer: Any = None
  inference_only: bool = False

  @property
  def task(self) -> str:
    return self.config["task"]

  def section(self, name: str) -> ml_collections.ConfigDict:
    """A saved config section as a (read-only) ConfigDict, e.g. w.section('model')."""
    return ml_collections.ConfigDict(self.config[name])


def load_weights(workdir: str | pathlib.Path, step: int | None = None, *,
                 expect_task: str | None = None, what: str = "") -> Weights:
  """The latest (or given) checkpoint's weights of WORKDIR, checksums verified. expect_task
  raises a ConfigError naming `what` (e.g. 'ldm.autoencoder') when the run is of another task."""
  workdir = pathlib.Path(workdir)
  where = f"{what}: " if what else ""
  config = read_config(workdir)
  if expect_task is not None and config["task"] != expect_task:
    raise ConfigError(f"{where}{workdir} holds a {config['task']} run, not a {expect_task} run.")
  ckpt = Checkpointer(workdir / "checkpoints", keep=10 ** 6)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"{workdir / 'checkpoints'} holds no checkpoint yet.")
    if step not in ckpt.all_steps():
      raise CheckpointError(f"No checkpoint for step {step}; there are {ckpt.all_steps()}.")
    inference_only = ckpt.has_weights_only(step)
    tree, meta = ckpt.restore_weights(step)
  finally:
    ckpt.close()
  saved = meta.get("config", {})
  diffs = config_differences(saved, config) if saved else []
  if diffs:
    raise CheckpointError(f"Checkpoint {workdir / 'checkpoints' / str(step)} was written by "
                          f"another model config than {workdir / 'config.json'}:\n  "
                          + "\n  ".join(diffs) + "\nNothing was deleted.")
  return Weights(workdir, config, step, tree["params"], tree["model_state"],
                 load_tokenizer(workdir, config, missing_ok=True), inference_only)


# The module name of the image encoder in each task that trains one.
IMAGE_ENCODERS = {"simclr": "encoder", "clip": "image_encoder", "captioner": "image_encoder"}


def image_encoder_of(workdir: str | pathlib.Path, encoder_config, what: str,
                     tasks: tuple[str, ...] = ("simclr", "clip")) -> tuple[Any, dict]:
  """(params, {collection: tree}) of the image encoder of a run of one of `tasks` (to initialise
  another model's encoder: LiT, a captioner), after checking that its `model.encoder` section
  equals `encoder_config` (a ConfigDict or dict)."""
  import json
  config = read_config(workdir)
  if config["task"] not in tasks:
    raise ConfigError(f"{what}: {workdir} holds a {config['task']} run; expected one of "
                      f"{', '.join(tasks)}.")
  mine = json.loads(json.dumps(encoder_config.to_dict() if hasattr(encoder_config, "to_dict")
                               else encoder_config))  # tuples as JSON lists
  if config["model"]["encoder"] != mine:
    raise ConfigError(f"{what}: the {config['task']} run's model.encoder differs from this "
                      f"config's model.encoder; they must be equal.")
  w = load_weights(workdir, what=what)
  name = IMAGE_ENCODERS[w.task]
  state = {col: tree[name] for col, tree in w.model_state.items() if name in tree}
  return w.params["params"][name], state


# -- inference-only runs -------------------------------------------------------------------------
def save_weights(workdir: str | pathlib.Path, config: ml_collections.ConfigDict, params,
                 model_state, step: int = 0, *, tokenizer_from: str | None = None
                 ) -> pathlib.Path:
  """Writes an inference-only run (config.json, tokenizer/ and a 'weights' checkpoint) that
  load_weights, restore_run and `jaxgen sample/generate/eval` read like a trained one. WORKDIR
  must be absent or empty; on failure it is left as it was."""
  workdir = pathlib.Path(workdir)
  if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
    raise CheckpointError(f"{workdir} exists and is not empty; nothing was overwritten. Choose a "
                          "new --workdir.")
  created = not workdir.exists()
  make_dir(workdir)
  try:
    if tokenizer_from is not None:
      save_tokenizer(workdir, config, None, tokenizer_from)
      with config.unlocked():
        # The run reads WORKDIR/tokenizer; the config names it relative to the workdir.
        config.model.text.tokenizer_path = TOKENIZER_DIR
    atomic_write_text(workdir / "config.json", config_lib.to_json(config))
    ckpt = Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints)
    try:
      ckpt.save_weights(step, {"params": params, "model_state": model_state},
                        {"config": config.to_dict(), "source": "imported"})
    finally:
      ckpt.close()
  except BaseException:
    if created:
      shutil.rmtree(workdir, ignore_errors=True)
    else:
      for child in workdir.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    raise
  return workdir

