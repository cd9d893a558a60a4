"""The app layer: the task registry, whole configs (the shared sections plus a task's own),
building a task, training a config, restoring a run and importing weights as a run.

The CLI, the config files and the importers' command use this module. It is the only module that
knows the tasks by name: nothing below `jaxgen.tasks` imports it or the tasks.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import pathlib
from typing import Any, Sequence

import ml_collections

from jaxgen import config as config_lib
from jaxgen import weights as weights_lib
from jaxgen.config import check_arg, parse_arg  # noqa: F401  (config files use them from here)
from jaxgen.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

TASKS = {
    "captioner": "jaxgen.tasks.captioner:CaptionerTask",
    "classifier": "jaxgen.tasks.classifier:ClassifierTask",
    "clip": "jaxgen.tasks.clip:CLIPTask",
    "ddpm": "jaxgen.tasks.diffusion:DiffusionTask",
    "dit": "jaxgen.tasks.dit:DiTTask",
    "ldm": "jaxgen.tasks.ldm:LatentDiffusionTask",
    "prior": "jaxgen.tasks.prior:PriorTask",
    "simclr": "jaxgen.tasks.simclr:SimCLRTask",
    "vae": "jaxgen.tasks.vae:AutoencoderTask",
}


def task_class(name: str):
  if name not in TASKS:
    raise ConfigError(f"Unknown task {name!r}; jaxgen has {', '.join(sorted(TASKS))}.")
  module, _, cls = TASKS[name].partition(":")
  return getattr(importlib.import_module(module), cls)


def task_names() -> list[str]:
  return sorted(TASKS)


# -- configs -------------------------------------------------------------------------------------
def base_config(task: str) -> ml_collections.ConfigDict:
  """Every key jaxgen knows for `task` with its default (shared sections + the task's), locked."""
  return config_lib.compose(task, task_class(task).default_config())


def validate(config: ml_collections.ConfigDict) -> None:
  """The shared checks, then the task's own."""
  config_lib.validate_shared(config)
  if config.data.holdout_combinations:
    from jaxgen.data.shapes import parse_combinations
    parse_combinations(config.data.holdout_combinations)
  task_class(config.task).validate(config)


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads 'path/to/config.py[:arg]' (Python that runs) and applies 'a.b=value' overrides; checks
  everything before any compute."""
  config = config_lib.exec_config_file(spec)
  if not isinstance(config, ml_collections.ConfigDict) or "task" not in config:
    raise ConfigError(f"Config file {spec.partition(':')[0]}: get_config must return the "
                      f"ConfigDict of jaxgen.app.base_config(task); got {type(config).__name__}.")
  config_lib.apply_overrides(config, overrides)
  validate(config)
  return config


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
  """Rebuilds a config saved as JSON (in a workdir or checkpoint), checked like an override."""
  if not isinstance(d, dict) or "task" not in d:
    raise ConfigError("Saved config has no 'task' key.")
  config = config_lib.fill(base_config(d["task"]), d)
  validate(config)
  return config


# -- tasks, training and runs --------------------------------------------------------------------
def build_task(config: ml_collections.ConfigDict, tokenizer=None):
  """The task of `config`; `tokenizer` (e.g. a run's saved one) spares rebuilding it. With
  lora.rank > 0 the task trains low-rank adapters on the run lora.base (jaxgen.tasks.lora)."""
  from jaxgen.models.layers import set_attention
  from jaxgen.models.ops import set_conv
  set_attention(config.attention)  # both read when the task's functions are traced
  set_conv(config.conv)
  if config.lora.rank and tokenizer is None:  # a fresh LoRA run reads its base run's tokenizer
    tokenizer = weights_lib.load_tokenizer(config.lora.base, config, missing_ok=True)
  task = task_class(config.task)(config, tokenizer=tokenizer)
  if config.lora.rank:
    from jaxgen.tasks.lora import LoraTask
    return LoraTask(task)
  return task


def lora_config(base: str | pathlib.Path, *, rank: int = 4, alpha: float = 0.0,
                targets: str = "") -> ml_collections.ConfigDict:
  """The config of the run `base` (a workdir, trained or imported) set up to train LoRA
  adapters on it: the lora section filled, EMA off. Set the data, steps and learning rate."""
  base = pathlib.Path(base)
  if not (base / "config.json").is_file():
    raise ConfigError(f"lora.base: {base} is not a jaxgen run (no config.json); train or import "
                      f"it first")
  config = config_from_dict(weights_lib.read_config(base))
  config.lora.base = str(base)
  config.lora.rank, config.lora.alpha, config.lora.targets = rank, float(alpha), targets
  text = config.model.get("text") if "model" in config else None
  if text is not None and text.get("tokenizer") == "bpe" and text.tokenizer_path:
    # a path relative to the base run (an imported run's "tokenizer") is copied from there
    path = pathlib.Path(text.tokenizer_path)
    if not path.is_absolute() and (base / path).exists():
      text.tokenizer_path = str((base / path).resolve())
  config.optim.ema_decay = 0.0
  validate(config)
  return config


def train(config_or_task, workdir: str | pathlib.Path, **kwargs):
  """Trains a config (or a built task) in `workdir`, resuming from its latest checkpoint; the
  keyword arguments go to `jaxgen.train.train`. A resumed run keeps the tokenizer it saved."""
  from jaxgen.train import loop
  task = config_or_task
  if isinstance(config_or_task, ml_collections.ConfigDict):
    task = build_task(config_or_task,
                      weights_lib.load_tokenizer(workdir, config_or_task, missing_ok=True))
  if task.feature_net_data is not None:  # a perceptual loss on the metric's feature network
    load_feature_net(task.feature_net_data, progress=kwargs.get("progress", True))
  state = loop.train(task, workdir, **kwargs)
  if _is_lora(task) and task.base.name == "ldm" and jax_process_index() == 0:
    export_lora(task, state.ema_params, state.model_state, pathlib.Path(workdir) / LORA_FILE)
  return state


LORA_FILE = "lora.safetensors"


def jax_process_index() -> int:
  import jax
  return jax.process_index()


def export_lora(task, adapters, model_state, path) -> pathlib.Path:
  """A LoRA run's adapters as diffusers' LoRA file (Stable Diffusion layout names), which
  diffusers' load_lora_weights and `jaxgen generate --lora` read."""
  import jax

  from jaxgen.convert.lora import write_peft_lora
  out = write_peft_lora(path, jax.device_get(adapters), jax.device_get(model_state["base"]),
                        alpha=task.alpha)
  log.info("Wrote the LoRA adapters to %s.", out)
  return out


@dataclasses.dataclass
class Run:
  """A trained (or imported) run loaded from its workdir. `params` are the EMA parameters, what
  sampling and evaluation use; `state` is the whole TrainState (None for an inference-only
  checkpoint or when loaded with `with_state=False`)."""
  workdir: pathlib.Path
  config: ml_collections.ConfigDict
  task: Any
  state: Any
  step: int
  params: Any = None
  model_state: Any = None


def restore_run(workdir: str | pathlib.Path, step: int | None = None, mesh=None, *,
                with_state: bool = True) -> Run:
  """The task of WORKDIR's config with the latest (or given) checkpoint. with_state=True
  restores the whole TrainState (optimizer included) with the task's shardings; False reads only
  the weights (`jaxgen.weights.load_weights`)."""
  w = weights_lib.load_weights(workdir, step)
  config = config_from_dict(w.config)
  task = build_task(config, w.tokenizer)
  if not with_state or w.inference_only:
    return Run(w.workdir, config, task, None, w.step, *_weights_of(task, w.params,
                                                                 w.model_state))
  from jaxgen.train import loop
  state = loop.restore_state(task, w.workdir, w.step, mesh)
  return Run(w.workdir, config, task, state, w.step,
             *_weights_of(task, state.ema_params, state.model_state))


def _weights_of(task, params, model_state):
  """What sampling and evaluation use: a LoRA run's adapters merged into its base."""
  if _is_lora(task):
    return task.merged(params, model_state)
  return params, model_state


def _is_lora(task) -> bool:
  from jaxgen.tasks.lora import LoraTask
  return isinstance(task, LoraTask)


# -- importers -----------------------------------------------------------------------------------
def import_stable_diffusion(path, workdir, *, dtype: str = "float32",
                            variant: str | None = None, config_dir=None, tokenizer=None,
                            v_prediction: bool = False,
                            image_size: int | None = None) -> pathlib.Path:
  """Converts a diffusers Stable Diffusion folder, or a single .safetensors file in the original
  LDM layout, into the ldm run `workdir` (absent or empty): config.json, tokenizer/ and an
  inference checkpoint, which restore_run and `jaxgen generate` read like a trained run (also
  after the workdir is moved). A single file takes config_dir (a diffusers folder's configs,
  tokenizer and scheduler) or tokenizer, v_prediction and image_size (the rest is inferred
  from its tensors); see jaxgen.convert.single_file.

  The converter (jaxgen.convert.stable_diffusion) fills the ldm config's sections from the
  converted modules; this checks that the ldm task builds exactly those modules and parameter
  shapes before anything is written. Unsupported settings raise ConfigError naming the key."""
  import tempfile

  import jax

  from jaxgen.convert import stable_diffusion as sd
  workdir = pathlib.Path(workdir)
  if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
    raise CheckpointError(f"{workdir} exists and is not empty; nothing was overwritten. Choose a "
                          f"new --workdir.")
  with tempfile.TemporaryDirectory(prefix="jaxgen-import-") as scratch:
    tok_scratch = pathlib.Path(scratch) / "tokenizer"
    if pathlib.Path(path).is_dir():
      if config_dir or tokenizer or v_prediction or image_size:
        raise ConfigError("--config, --tokenizer, --v-prediction and --image-size apply to "
                          "single-file checkpoints; a diffusers folder carries its own")
      c = sd.convert(path, dtype=dtype, variant=variant, scratch=tok_scratch)
    else:
      c = sd.convert_single_file(path, config_dir=config_dir, tokenizer=tokenizer,
                                 v_prediction=v_prediction, image_size=image_size, dtype=dtype,
                                 scratch=tok_scratch)
    config = compose_config("ldm", c.sections)
    task = build_task(config, c.tokenizer)
    sd.check_task_modules(task, c.unet, c.text, c.vae, c.text_2)
    want_params, want_state = jax.eval_shape(lambda k: task.init(k, task.example_batch()),
                                             jax.random.PRNGKey(0))
    sd.check_same_shapes("params", want_params, c.params)
    sd.check_same_shapes("model_state", want_state, c.model_state)
    weights_lib.save_weights(workdir, config, c.params, c.model_state,
                             tokenizer_from=str(c.tokenizer_dir))
  log.info("Imported %s as an ldm run in %s.", path, workdir)
  return workdir


def compose_config(task: str, sections: dict) -> ml_collections.ConfigDict:
  """base_config(task) with `sections` ({section: {key: value}}) set, validated."""
  config = base_config(task)
  for section, values in sections.items():
    config_lib.set_value(config, section, values)
  validate(config)
  return config


def load_feature_net(data_cfg, workdir=None, *, train_if_missing: bool = True,
                     progress: bool = True, steps: int = 600):
  """The offline metric's feature network: the classifier in `workdir`, else the cached one for
  this data set and size, trained first through the one loop (about a minute on 2 CPU cores)."""
  from jaxgen.errors import WorkdirBusyError
  from jaxgen.eval import quality
  from jaxgen.train.lock import wait_until_free
  if workdir is None:
    workdir = quality.feature_net_dir(data_cfg)
    # Processes that evaluate on the same data share one net: one trains it (under the loop's
    # workdir lock), the others wait for it and load it, instead of failing on the lock.
    while not _has_checkpoint(workdir):
      if wait_until_free(workdir):
        continue   # another process was training it: look again (it may have stopped early)
      if not train_if_missing:
        raise CheckpointError(f"No feature network in {workdir}.")
      num_classes = quality.num_classes_of(data_cfg)
      log.info("Training the metric's feature network in %s (once per data set and size).",
               workdir)
      c = base_config("classifier")
      quality.fill_classifier_config(c, data_cfg, num_classes, steps)
      validate(c)
      try:
        train(c, workdir, progress=progress)
      except WorkdirBusyError:
        continue   # another process started training it first: wait for it
  return quality.FeatureNet.from_weights(weights_lib.load_weights(workdir))


def _has_checkpoint(workdir: pathlib.Path) -> bool:
  """A finished checkpoint step in WORKDIR/checkpoints (orbax's temporary folders and an empty
  folder left by a killed run do not count)."""
  folder = workdir / "checkpoints"
  return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())
