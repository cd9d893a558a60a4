"""The one config system: ml_collections files under configs/, command-line overrides, checks.

This module knows the sections every run shares (data, optim, train) and nothing of tasks: the
composition of a whole config from these and a task's own sections, and its validation, live in
the app layer (`jaxgen.app.base_config`, `jaxgen.app.load_config`). A config file defines
`get_config(arg)` and starts from `app.base_config(task)`, which holds every key jaxgen knows,
locked: a misspelt key or a value of the wrong type fails before any compute.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import pathlib
from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict

from jaxgen.errors import ConfigError


def compose(task: str, task_sections: dict[str, dict]) -> ml_collections.ConfigDict:
  """The shared keys with their defaults plus a task's own sections; locked."""
  c = ml_collections.ConfigDict()
  c.task = task
  c.seed = 0
  c.attention = "auto"            # auto | xla | chunked | cudnn (models.layers.set_attention)
  c.conv = "auto"                 # auto | xla | matmul: conv filter gradients (models.ops.set_conv)
  c.data = dict(
      source="embedded",          # embedded | tfds | folder | npz
      name="fashion_mnist_small",  # embedded or TFDS name
      path="",                    # folder or .npz file for source=folder|npz
      tfds_data_dir="",           # TFDS data dir; empty: TFDS_DATA_DIR or ~/tensorflow_datasets
      image_key="image",
      label_key="label",
      caption_key="",             # TFDS feature holding captions, e.g. "captions/text"
      train_split="train",
      eval_split="test",
      holdout_fraction=0.1,       # folder/npz without a test split: held-out share
      holdout_combinations=(),    # embedded shapes: "colour shape" pairs (e.g. "red circle")
                                  # left out of the training split, images and captions
      image_size=28,
      channels=1,
      batch_size=128,             # global batch, over all devices and processes
      shuffle=True,
  )
  c.optim = dict(
      name="adamw",               # adamw | adam | sgd | lars
      lr=1e-3,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      momentum=0.9,               # sgd and lars
      weight_decay=0.0,
      schedule="cosine",          # cosine | constant
      warmup_steps=100,
      end_lr_factor=0.01,         # cosine decays to lr * end_lr_factor
      grad_clip=1.0,              # global-norm clip; 0 turns it off
      ema_decay=0.999,            # 0 keeps ema_params equal to params
      grad_accum_steps=1,         # > 1: gradients averaged over micro-batches of the batch
  )
  c.train = dict(
      num_steps=5000,
      log_every=50,
      sample_every=1000,          # PNG grids into WORKDIR/samples; 0 turns them off
      ckpt_every=1000,
      keep_checkpoints=3,
      num_samples=64,             # pictures per grid
      fsdp=False,                 # shard params, EMA and optimizer state over devices (FSDP)
  )
  c.lora = dict(
      rank=0,                     # > 0: train low-rank adapters on the run `base`, frozen
      base="",                    # workdir of the trained or imported run to adapt
      alpha=0.0,                  # the update is alpha / rank * A @ B; 0: alpha = rank
      targets="",                 # regular expression over kernel paths; empty: the task's
                                  # attention projections (to_q, to_k, to_v, to_out)
  )
  for name, section in task_sections.items():
    c[name] = section
  c.lock()
  return c


def parse_arg(arg: str | None) -> dict[str, str | bool]:
  """'smoke,size=64' -> {'smoke': True, 'size': '64'}: the big_vision-style config argument."""
  out: dict[str, str | bool] = {}
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    key, eq, value = part.partition("=")
    out[key] = value if eq else True
  return out


def check_arg(arg: str | None, known: Sequence[str]) -> dict[str, str | bool]:
  flags = parse_arg(arg)
  unknown = sorted(set(flags) - set(known))
  if unknown:
    raise ConfigError(f"Unknown config argument(s) {unknown}; this config knows {sorted(known)}.")
  return flags


def exec_config_file(spec: str) -> ml_collections.ConfigDict:
  """Runs 'path/to/config.py[:arg]' (a config file is Python: it runs with the user's rights)
  and returns its get_config(arg), unvalidated."""
  path_str, _, arg = spec.partition(":")
  path = pathlib.Path(path_str)
  if not path.is_file():
    raise ConfigError(f"Config file not found: {path_str}")
  module_spec = importlib.util.spec_from_file_location(f"jaxgen_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"Config file {path_str} is not valid Python: {e.msg} (line "
                      f"{e.lineno}).") from e
  except ConfigError:
    raise
  except Exception as e:
    # A locked ConfigDict raises AttributeError/KeyError/TypeError for a misspelt key or a
    # wrong type inside the file; an ImportError names a module the file could not import.
    raise ConfigError(f"Error in config file {path_str}: {type(e).__name__}: {e}"
                      f"{_where(e, path)}") from e
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"Config file {path_str} defines no get_config(arg).")
  try:
    return module.get_config(arg or None)
  except ConfigError:
    raise
  except Exception as e:
    raise ConfigError(f"Error in config file {path_str} (arg {arg!r}): {type(e).__name__}: "
                      f"{e}{_where(e, path)}") from e


def _where(e: BaseException, path: pathlib.Path) -> str:
  """' (line N)' of the config file's frame in the traceback, if any."""
  import traceback
  lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
           if pathlib.Path(f.filename).resolve() == path.resolve()]
  return f" (line {lines[-1]})" if lines else ""


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies 'a.b=value' overrides (strings from the command line), typed like the field."""
  for item in overrides:
    key, eq, value = item.partition("=")
    if not eq:
      raise ConfigError(f"Override {item!r} must have the form key=value (e.g. optim.lr=1e-3).")
    set_value(config, key, value)


def _exists(config: ml_collections.ConfigDict, parts: list[str]) -> bool:
  node = config
  for part in parts:
    if not isinstance(node, ml_collections.ConfigDict) or part not in node.keys():
      return False
    node = node[part]
  return True


def _resolve(config: ml_collections.ConfigDict, dotted: str):
  parts = dotted.split(".")
  node = config
  for i, part in enumerate(parts):
    keys = list(node.keys())
    if part not in keys:
      where = ".".join(parts[:i]) or "the top level"
      close = difflib.get_close_matches(part, keys, n=1)
      hint = ""
      if close:
        guess = parts[:i] + close + parts[i + 1:]
        if not _exists(config, guess):
          guess = parts[:i] + close
        hint = f" Did you mean '{'.'.join(guess)}'?"
      raise ConfigError(
          f"Unknown config key '{dotted}'.{hint} Keys in {where}: {', '.join(sorted(keys))}.")
    if i < len(parts) - 1:
      node = node[part]
      if not isinstance(node, ml_collections.ConfigDict):
        raise ConfigError(f"Config key '{'.'.join(parts[:i + 1])}' is a value, not a section.")
  return node, parts[-1]


def _literal_or_text(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _coerce(dotted: str, current: Any, value: Any) -> Any:
  """Converts `value` (a string from the command line, or a JSON value) to the field's type."""
  if isinstance(value, str) and not isinstance(current, str):
    text = value.strip()
    lowered = text.lower()
    if isinstance(current, bool) and lowered in ("true", "false", "1", "0", "yes", "no"):
      return lowered in ("true", "1", "yes")
    bare_list = isinstance(current, (tuple, list)) and text and text[0] not in "(["
    if bare_list:
      text = f"({text},)"
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      if bare_list and all(isinstance(v, str) for v in current):
        # a tuple of strings given bare: "red circle,blue square"
        return tuple(_literal_or_text(item.strip()) for item in text[1:-2].split(","))
      if current is not None:
        raise ConfigError(
            f"Config key '{dotted}' expects {type(current).__name__}, got {text!r}.") from None
      return text
  if current is None or isinstance(current, ml_collections.ConfigDict):
    return value
  if isinstance(current, bool):
    if not isinstance(value, bool):
      raise ConfigError(f"Config key '{dotted}' expects a bool, got {value!r}.")
    return value
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(current, int) and isinstance(value, float) and value.is_integer():
    return int(value)
  if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
    return tuple(value)
  if type(value) is not type(current):
    raise ConfigError(f"Config key '{dotted}' expects {type(current).__name__}, "
                      f"got {value!r} ({type(value).__name__}).")
  return value


def set_value(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  node, leaf = _resolve(config, dotted)
  current = node[leaf]
  if isinstance(current, ml_collections.ConfigDict):
    if not isinstance(value, dict):
      raise ConfigError(f"Config key '{dotted}' is a section; set its keys one by one.")
    for k, v in value.items():
      set_value(config, f"{dotted}.{k}", v)
    return
  coerced = _coerce(dotted, current, value)
  with node.unlocked():
    node[leaf] = coerced


def validate_shared(config: ml_collections.ConfigDict) -> None:
  """Checks the value ranges and combinations of the shared sections (data, optim, train)."""
  d, t, o = config.data, config.train, config.optim
  from jaxgen.models.layers import IMPLEMENTATIONS
  if config.attention not in IMPLEMENTATIONS:
    raise ConfigError(f"attention must be one of {', '.join(IMPLEMENTATIONS)}; got "
                      f"{config.attention!r}.")
  from jaxgen.models.ops import CONV_IMPLEMENTATIONS
  if config.conv not in CONV_IMPLEMENTATIONS:
    raise ConfigError(f"conv must be one of {', '.join(CONV_IMPLEMENTATIONS)}; got "
                      f"{config.conv!r}.")
  if d.source not in ("embedded", "tfds", "folder", "npz"):
    raise ConfigError(f"data.source must be embedded, tfds, folder or npz; got {d.source!r}.")
  if d.source in ("folder", "npz") and not d.path:
    raise ConfigError(f"data.source={d.source} needs data.path.")
  if d.channels not in (1, 3):
    raise ConfigError(f"data.channels must be 1 or 3; got {d.channels}.")
  for key in ("image_size", "batch_size"):
    if d[key] <= 0:
      raise ConfigError(f"data.{key} must be positive; got {d[key]}.")
  if not 0.0 < d.holdout_fraction < 1.0:
    raise ConfigError(f"data.holdout_fraction must be in (0, 1); got {d.holdout_fraction}.")
  if d.holdout_combinations and not (d.source == "embedded" and d.name == "shapes"):
    raise ConfigError("data.holdout_combinations applies to the embedded shapes data "
                      "(data.source=embedded, data.name=shapes).")
  for key in ("num_steps", "log_every", "ckpt_every", "keep_checkpoints"):
    if t[key] <= 0:
      raise ConfigError(f"train.{key} must be positive; got {t[key]}.")
  if o.name not in ("adamw", "adam", "sgd", "lars"):
    raise ConfigError(f"optim.name must be adamw, adam, sgd or lars; got {o.name!r}.")
  if o.schedule not in ("cosine", "constant"):
    raise ConfigError(f"optim.schedule must be cosine or constant; got {o.schedule!r}.")
  if not 0.0 <= o.ema_decay < 1.0:
    raise ConfigError(f"optim.ema_decay must be in [0, 1); got {o.ema_decay}.")
  if o.grad_accum_steps < 1 or d.batch_size % o.grad_accum_steps:
    raise ConfigError(f"optim.grad_accum_steps={o.grad_accum_steps} must be >= 1 and divide "
                      f"data.batch_size={d.batch_size}.")
  if o.lr <= 0:
    raise ConfigError(f"optim.lr must be positive; got {o.lr}.")
  lo = config.lora
  if lo.rank < 0 or lo.alpha < 0:
    raise ConfigError(f"lora.rank and lora.alpha must be >= 0; got {lo.rank}, {lo.alpha}.")
  if lo.rank and not lo.base:
    raise ConfigError("lora.rank > 0 needs lora.base, the workdir of the run to adapt.")
  if lo.targets:
    import re
    try:
      re.compile(lo.targets)
    except re.error as e:
      raise ConfigError(f"lora.targets is not a regular expression: {e}") from None


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def fill(config: ml_collections.ConfigDict, d: dict) -> ml_collections.ConfigDict:
  """Sets every key of a saved config (JSON from a workdir or checkpoint) on `config`, checked
  like an override; the 'task' key must match."""
  if d.get("task") != config.task:
    raise ConfigError(f"Saved config is of task {d.get('task')!r}, not {config.task!r}.")
  for section, value in d.items():
    if section != "task":
      set_value(config, section, value)
  return config


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


placeholder = config_dict.placeholder
