"""LoRA fine-tuning of any run through the one loop: a wrapper around the run's own task.

The trainable parameters are the adapters alone (jaxgen.lora: A, B per targeted kernel), so the
optimizer state and the EMA cover only them; the base run's parameters and state ride frozen in
model_state {"base": params, "state": model_state}. The loss, the batches and the pictures are
the base task's, on the merged parameters. A fresh run loads the base's weights
(`config.lora.base`, through jaxgen.weights); restoring a LoRA run (jaxgen.app.restore_run)
gives the merged parameters, so sampling and evaluation need nothing new.
"""
from __future__ import annotations

import logging

import jax

from jaxgen import lora
from jaxgen import weights as weights_lib
from jaxgen.errors import ConfigError
from jaxgen.tasks.base import Task, zeros_like

log = logging.getLogger(__name__)

DEFAULT_TARGETS = r"(to_q|to_k|to_v|to_out)/kernel$"


class LoraTask(Task):
  """Adapters on `base` (a built task of the base run's architecture)."""

  def __init__(self, base: Task):
    super().__init__(base.config, base.tokenizer)
    self.base = base
    lo = base.config.lora
    self.rank = int(lo.rank)
    self.alpha = float(lo.alpha or lo.rank)
    self.pattern = lo.targets or DEFAULT_TARGETS
    self.name = base.name
    self.feature_net_data = base.feature_net_data
    self.model = getattr(base, "model", None)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def merged(self, adapters, model_state):
    """(base params with the adapters merged, the base's own model_state)."""
    return lora.merge(model_state["base"], adapters, [self.scale]), model_state["state"]

  # -- what the loop calls -------------------------------------------------------------------
  def preprocess(self, batch):
    return self.base.preprocess(batch)

  def example_batch(self):
    return self.base.example_batch()

  def init(self, key, batch):
    k_base, k_lora = jax.random.split(key)
    params, state = self.base.init(k_base, batch)
    paths = lora.targets(params, self.pattern)
    if not paths:
      raise ConfigError(f"lora.targets={self.pattern!r} matches no kernel of the {self.name} "
                        f"model")
    return lora.init(k_lora, params, paths, self.rank), {"base": params, "state": state}

  def zeros_for_pretrained(self, adapters, model_state):
    """The whole base is loaded (for SD 1.5, 860M values not drawn)."""
    return adapters, zeros_like(model_state)

  def pretrained(self, adapters, model_state):
    """The base run's weights (EMA parameters and model state) under the adapters."""
    w = weights_lib.load_weights(self.config.lora.base, expect_task=self.base.name,
                                 what="lora.base")
    shapes = lambda t: jax.tree.map(lambda a: tuple(a.shape), t)
    for what, saved, built in (("parameters", w.params, model_state["base"]),
                               ("model state", w.model_state, model_state["state"])):
      if shapes(saved) != shapes(built):
        raise ConfigError(f"lora.base: the run's {what} differ from this config's model; "
                          f"build the LoRA config from the base run's config "
                          f"(jaxgen.app.lora_config)")
    n = lora.num_params(adapters)
    total = sum(a.size for a in jax.tree.leaves(w.params))
    log.info("LoRA rank %d on %d kernels of %s: %d trainable parameters (%.3f%% of %d).",
             self.rank, len(adapters), self.config.lora.base, n, 100 * n / total, total)
    return adapters, {"base": w.params, "state": w.model_state}

  def loss_fn(self, adapters, model_state, batch, key):
    params, state = self.merged(adapters, model_state)
    loss, (metrics, new_state) = self.base.loss_fn(params, state, batch, key)
    return loss, (metrics, dict(model_state, state=new_state))

  def cached_inputs(self, state, source):
    if self.base.cached_inputs is None:
      return None
    view = _MergedState(*self.merged(state.params, state.model_state))
    return self.base.cached_inputs(view, source)

  def pictures(self, adapters, model_state, key):
    return self.base.pictures(*self.merged(adapters, model_state), key)

  def __getattr__(self, name):  # the base task's helpers (prompts, schedule, ...) pass through
    if name == "base":
      raise AttributeError(name)
    return getattr(self.base, name)


class _MergedState:
  """The fields of a TrainState the base task's cached_inputs reads, with merged weights."""

  def __init__(self, params, model_state):
    self.params = self.ema_params = params
    self.model_state = model_state
