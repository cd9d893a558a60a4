"""What a pillar supplies to the one train loop: its config sections, validation, module
building, init, loss and host preprocessing.

A Task builds its flax modules from the config. The loop owns everything else: data, mesh,
optimizer, TrainState, jit, checkpoints, logging and the schedule of pictures. Sampling lives in
`jaxgen.pipelines`, evaluation in `jaxgen.eval`, and the commands that wire them to a run in
`jaxgen.commands`.
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np


class Task:
  name: str = ""

  @staticmethod
  def default_config() -> dict[str, dict]:
    """Config sections this task adds to the base config (at least 'model')."""
    raise NotImplementedError

  @staticmethod
  def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError for values this task cannot use."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer=None):
    self.config = config
    # Tasks with text set self.tokenizer: `tokenizer` if given (a run's saved one), else built
    # from the config (and, for the word tokenizer, the training captions).
    self.tokenizer = tokenizer

  def preprocess(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Host-side work on each batch before it goes to the devices (e.g. tokenising captions).
    Runs on the data loader's thread; must be deterministic."""
    return batch

  def example_batch(self) -> dict[str, np.ndarray]:
    """A one-example batch with the shapes `init` needs, without reading the data set."""
    d = self.config.data
    return self.preprocess({"image": np.zeros((1, d.image_size, d.image_size, d.channels),
                                              np.uint8),
                            "label": np.zeros((1,), np.int32), "index": np.zeros((1,), np.int32),
                            "caption": np.array([""])})

  def init(self, key: jax.Array, batch: dict) -> tuple[Any, Any]:
    """-> (params, model_state) for an example batch (shapes only matter)."""
    raise NotImplementedError

  # A task that starts from pretrained weights sets this to a method
  # `pretrained(params, model_state) -> (params, model_state)`; the loop calls it on the host
  # after initialising a fresh run (never when resuming).
  pretrained = None

  def zeros_for_pretrained(self, params, model_state) -> tuple[Any, Any]:
    """(params, model_state) of `init` with zeros where `pretrained` puts loaded weights. The
    loop's init program applies it, so that XLA drops those arrays' random initialisers instead
    of compiling and running them (configs/ldm.py, whose autoencoder and text tower are loaded:
    the init program's compile on 2 cores, LLVM -O0 as the loop does it, 12.5-13.1 -> 6.9-7.9 s,
    three runs each)."""
    return params, model_state

  # A task that must see its state before training (e.g. to encode and cache its data with a
  # frozen network) sets this to a method `prepare(state) -> None`; the loop calls it after
  # initialising or restoring, before reading batches.
  prepare = None

  # A task that freezes parameters (LiT's locked tower) sets this to a method
  # `frozen(path: str) -> bool`, path being jax.tree_util.keystr of the parameter's key path.
  frozen = None

  def loss_fn(self, params, model_state, batch: dict, key: jax.Array):
    """-> (loss, (metrics, new_model_state)). Pure and jittable."""
    raise NotImplementedError

  def cached_inputs(self, state, source) -> dict[str, np.ndarray] | None:
    """Per-example arrays computed once over the training `source` with the restored or initial
    `state` (e.g. a frozen encoder's latents). The loader joins them to each batch by index, so
    the batch says explicitly what the loss reads."""
    return None

  # The offline metric's data set, when the loss needs its feature network (a perceptual loss):
  # the app layer makes sure the network exists before training starts.
  feature_net_data = None

  def pictures(self, params, model_state, key: jax.Array) -> dict[str, np.ndarray]:
    """Named uint8 pictures [H, W, C] to write during training (grids, strips)."""
    return {}


class CaptionedTask(Task):
  """A task trained on image-caption pairs (dual encoder, captioner): its model section has a
  `text` section (tokenizer and tower) and a `caption_template`, which turns class names into
  captions for labelled data without captions ("a photo of a sneaker")."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer=None):
    super().__init__(config, tokenizer)
    self._train_source = None
    if self.tokenizer is None:
      from jaxgen import text as text_lib
      self.tokenizer = text_lib.from_config(config.model.text, self.train_captions)

  # the tasks whose runs may initialise this one's image encoder (model.image_init)
  image_init_tasks: tuple[str, ...] = ("simclr", "clip")

  def pretrained(self, params, model_state):
    """Copies the image encoder of the run model.image_init (its model.encoder section must
    equal this config's) into the module `image_encoder`."""
    m = self.config.model
    if not m.image_init:
      return params, model_state
    from jaxgen import weights as weights_lib
    enc, enc_state = weights_lib.image_encoder_of(m.image_init, m.encoder, "model.image_init",
                                                  tasks=self.image_init_tasks)
    params = {"params": dict(params["params"], image_encoder=enc)}
    for col, tree in enc_state.items():
      model_state = dict(model_state, **{col: dict(model_state.get(col, {}), image_encoder=tree)})
    return params, model_state

  def zeros_for_pretrained(self, params, model_state):
    if not self.config.model.image_init:
      return params, model_state
    inner = params["params"]
    return {"params": dict(inner, image_encoder=zeros_like(inner["image_encoder"]))}, model_state

  def train_source(self):
    if self._train_source is None:
      from jaxgen.data import load_source
      self._train_source = load_source(self.config.data, self.config.data.train_split)
    return self._train_source

  def train_captions(self) -> np.ndarray:
    from jaxgen.data.captions import captions_of
    src = self.train_source()
    return captions_of(src.get(np.arange(len(src))), src.class_names,
                       self.config.model.caption_template)

  def batch_captions(self, batch) -> list[str]:
    """The batch's captions, or for labelled data without captions its class names put into
    model.caption_template."""
    from jaxgen.data.captions import captions_of
    names = None if "caption" in batch else self.train_source().class_names
    return [str(c) for c in captions_of(batch, names, self.config.model.caption_template)]

  def preprocess(self, batch):
    captions = self.batch_captions(batch)
    tok = self.tokenizer(captions, truncate=True)  # training data: truncate, never stop
    return dict(batch, input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                eos_positions=tok["eos_positions"])


def zeros_like(tree):
  """The pytree with every array replaced by zeros of its shape and dtype."""
  return jax.tree.map(jax.numpy.zeros_like, tree)
