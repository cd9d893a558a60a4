"""Pillars as tasks for the one train loop: name -> Task class (imported on first use)."""
from __future__ import annotations

import importlib

from jaxgen.errors import ConfigError

_TASKS = {
    "classifier": "jaxgen.tasks.classifier:ClassifierTask",
    "clip": "jaxgen.tasks.clip:CLIPTask",
    "ddpm": "jaxgen.tasks.diffusion:DiffusionTask",
    "ldm": "jaxgen.tasks.ldm:LatentDiffusionTask",
    "simclr": "jaxgen.tasks.simclr:SimCLRTask",
    "vae": "jaxgen.tasks.vae:AutoencoderTask",
}


def get(name: str):
  if name not in _TASKS:
    raise ConfigError(f"Unknown task {name!r}; jaxgen has {', '.join(sorted(_TASKS))}.")
  module, _, cls = _TASKS[name].partition(":")
  return getattr(importlib.import_module(module), cls)


def build(config):
  return get(config.task)(config)


def names() -> list[str]:
  return sorted(_TASKS)
