"""CLIP-style dual encoder: image tower + text tower trained with the symmetric InfoNCE loss
(or SigLIP's sigmoid loss) over the global batch, with a learnable temperature.

Captions come from the data (the procedural `shapes` set has exact ones) or, for labelled data
without captions, from the class names ("a photo of a sneaker"). Evaluation: zero-shot
classification with prompt ensembles and image<->text retrieval on held-out pairs. The text
tower's per-token states condition latent diffusion (jaxgen.tasks.ldm).
"""
from __future__ import annotations

import argparse
import functools
import math
import pathlib

import jax.numpy as jnp
import numpy as np

from jaxgen import images as img
from jaxgen.contrastive.losses import clip_loss, siglip_loss
from jaxgen.data import load_all, load_source
from jaxgen.data import shapes as shapes_data
from jaxgen.errors import ConfigError, DataError
from jaxgen.eval.retrieval import recall_at_k, zero_shot_accuracy
from jaxgen.models.text import TextTransformer
from jaxgen.pipelines import clip as pipe
from jaxgen.pipelines.autoencoder import to_unit
from jaxgen.tasks.base import Task
from jaxgen.tasks.encoders import build_image_encoder, image_encoder_section, validate_image_encoder
from jaxgen.text.words import WordTokenizer


def text_section(**overrides) -> dict:
  d = dict(
      tokenizer="words",          # words (built from the training captions) | bpe (CLIP's)
      tokenizer_path="",          # bpe: a folder with vocab.json + merges.txt (SD tokenizer/)
      context_length=16,
      width=64,
      layers=2,
      heads=4,
      mlp_ratio=4.0,
      activation="quick_gelu",
  )
  d.update(overrides)
  return d


def build_tokenizer(t, captions_fn):
  """The task's tokenizer. Word-level vocabularies are rebuilt from the training captions, a
  pure function of the data, so a restored run gets the same ids without a vocabulary file."""
  if t.tokenizer == "words":
    return WordTokenizer.build(captions_fn(), context_length=t.context_length)
  if t.tokenizer == "bpe":
    if not t.tokenizer_path:
      raise ConfigError("model.text.tokenizer=bpe needs model.text.tokenizer_path (a folder "
                        "with vocab.json and merges.txt, e.g. a Stable Diffusion tokenizer/).")
    from jaxgen.convert.clip_text import load_tokenizer
    return load_tokenizer(t.tokenizer_path, context_length=t.context_length)
  raise ConfigError(f"model.text.tokenizer must be 'words' or 'bpe'; got {t.tokenizer!r}.")


def build_text_tower(t, tokenizer, projection_dim: int | None = None) -> TextTransformer:
  """The text transformer of a `model.text` section (dual encoder and latent diffusion)."""
  return TextTransformer(vocab_size=tokenizer.vocab_size, hidden_size=t.width,
                         num_layers=t.layers, num_heads=t.heads,
                         mlp_dim=int(t.mlp_ratio * t.width), max_positions=t.context_length,
                         activation=t.activation, projection_dim=projection_dim,
                         eos_token_id=tokenizer.eos_id)


def captions_of(batch: dict, class_names, template: str) -> np.ndarray:
  if "caption" in batch:
    return batch["caption"]
  if "label" in batch and class_names:
    return np.array([template.format(class_names[int(i)]) for i in batch["label"]])
  raise DataError("The dual encoder needs captions, or labels with class names to make them "
                  "from; this data set has neither.")


class CLIPTask(Task):
  name = "clip"

  @staticmethod
  def default_config():
    return {"model": dict(
        encoder=image_encoder_section(norm="group"),
        text=text_section(),
        embed_dim=64,
        loss="clip",              # clip | siglip
        lock_image=False,         # LiT: keep the image tower fixed (with image_init)
        lock_text=False,
        image_init="",            # a simclr workdir to initialise the image tower from
        caption_template="a photo of a {}",
    )}

  @staticmethod
  def validate(config):
    m = config.model
    validate_image_encoder(m.encoder, config.data.image_size)
    if m.loss not in ("clip", "siglip"):
      raise ConfigError(f"model.loss must be 'clip' or 'siglip'; got {m.loss!r}.")
    if m.text.width % m.text.heads:
      raise ConfigError(f"model.text.width={m.text.width} must be divisible by "
                        f"model.text.heads={m.text.heads}.")
    if "{}" not in m.caption_template:
      raise ConfigError("model.caption_template needs a '{}' for the class name.")

  def __init__(self, config):
    super().__init__(config)
    m, d = config.model, config.data
    self._train_source = None
    self.tokenizer = build_tokenizer(m.text, self._train_captions)
    text = build_text_tower(m.text, self.tokenizer, projection_dim=m.embed_dim)
    self.module = pipe.DualEncoderModule(build_image_encoder(m.encoder), text, m.embed_dim,
                                         loss=m.loss, lock_image=m.lock_image,
                                         lock_text=m.lock_text)
    self.model = pipe.DualEncoder(self.module, (d.image_size, d.image_size, d.channels),
                                  self.tokenizer)

  def _source(self, split):
    d = self.config.data
    if split == d.train_split:
      if self._train_source is None:
        self._train_source = load_source(d, split)
      return self._train_source
    return load_source(d, split)

  def _train_captions(self):
    src = self._source(self.config.data.train_split)
    batch = src.get(np.arange(len(src)))
    return captions_of(batch, src.class_names, self.config.model.caption_template)

  # -- training ----------------------------------------------------------------------------
  def preprocess(self, batch):
    src = self._source(self.config.data.train_split)
    captions = captions_of(batch, src.class_names, self.config.model.caption_template)
    tok = self.tokenizer(list(captions), truncate=True)  # training data: truncate, never stop
    return dict(batch, input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])

  def init(self, key, batch):
    x = 2.0 * to_unit(batch["image"]) - 1.0
    variables = self.module.init(key, x, jnp.asarray(batch["input_ids"]),
                                 jnp.asarray(batch["attention_mask"]))
    params = {"params": variables["params"]}
    return params, {k: v for k, v in variables.items() if k != "params"}

  def pretrained(self, params, state):
    """Copies a SimCLR run's encoder into the image tower (same encoder config required)."""
    if not self.config.model.image_init:
      return params, state
    from jaxgen.train import restore_run
    src = restore_run(self.config.model.image_init)
    if src.config.task != "simclr":
      raise ConfigError(f"model.image_init must be a simclr workdir; "
                        f"{self.config.model.image_init} holds a {src.config.task} run.")
    if src.config.model.encoder.to_dict() != self.config.model.encoder.to_dict():
      raise ConfigError("model.image_init: the SimCLR run's model.encoder differs from this "
                        "config's model.encoder; they must be equal.")
    enc = src.params["params"]["encoder"]
    params = {"params": dict(params["params"], image_encoder=enc)}
    for col, tree in src.model_state.items():
      state = dict(state, **{col: dict(state.get(col, {}), image_encoder=tree["encoder"])})
    return params, state

  def frozen(self, path: str) -> bool:
    m = self.config.model
    return ((m.lock_image and "'image_encoder'" in path)
            or (m.lock_text and "'text_encoder'" in path))

  def loss_fn(self, params, model_state, batch, key):
    x = 2.0 * to_unit(batch["image"]) - 1.0
    (img_emb, txt_emb), updates = self.module.apply(
        {**params, **model_state}, x, batch["input_ids"], batch["attention_mask"], train=True,
        mutable=list(model_state.keys()))
    p = params["params"]
    if self.config.model.loss == "clip":
      loss, metrics = clip_loss(img_emb, txt_emb, p["logit_scale"])
    else:
      loss, metrics = siglip_loss(img_emb, txt_emb, p["logit_scale"], p["bias"])
    return loss, (metrics, {**model_state, **updates})

  # -- evaluation --------------------------------------------------------------------------
  def zero_shot_tasks(self) -> dict[str, tuple[list[list[str]], str]]:
    """name -> (prompts per class, attribute column or 'label'). For the shapes data: the first
    object's shape and colour, each class's prompts spanning the other attributes (a prompt
    ensemble); for class data: the class names in a few templates."""
    d = self.config.data
    if d.source == "embedded" and d.name == "shapes":
      s = shapes_data
      shape_prompts = [[f"a {z} {c} {k}" for z in s.SIZE_NAMES for c in s.COLOUR_NAMES]
                       for k in s.SHAPES]
      colour_prompts = [[f"a {z} {c} {k}" for z in s.SIZE_NAMES for k in s.SHAPES]
                        for c in s.COLOUR_NAMES]
      return {"shape": (shape_prompts, "label"),
              "colour": (colour_prompts, "colour")}
    names = self._source(d.train_split).class_names
    if not names:
      return {}
    templates = [self.config.model.caption_template, "a {}", "a picture of a {}"]
    return {"class": ([[t.format(n) for t in templates] for n in names], "label")}

  def _labels(self, data, column):
    if column == "label":
      return data["label"]
    values = list(shapes_data.COLOUR_NAMES)
    return np.array([values.index(v) for v in data[column]])

  @staticmethod
  def add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=None, help="held-out pairs to use")

  def evaluate(self, params, model_state, key, *, limit=None, **unused):
    d = self.config.data
    data = load_all(self._source(d.eval_split), limit=limit)
    images = pipe.embed_images(self.model, params, model_state, data["image"])
    out = {"num_images": len(images)}
    for name, (prompts, column) in self.zero_shot_tasks().items():
      classes = pipe.zero_shot_classifier(self.model, params, prompts)
      acc = zero_shot_accuracy(images, classes, self._labels(data, column))
      out[f"zero_shot_{name}"] = float(acc)
      out[f"zero_shot_{name}_chance"] = 1.0 / len(prompts)
    src = self._source(d.eval_split)
    captions = captions_of(data, src.class_names, self.config.model.caption_template)
    if "caption" in data:  # retrieval needs captions that tell the images apart
      # Several images share a caption ("a small red circle"): the gallery holds each distinct
      # caption once, and a hit is any item with the query's caption.
      unique, caption_id = np.unique(captions, return_inverse=True)
      texts = pipe.embed_texts(self.model, params, list(unique))
      ids = np.arange(len(unique))
      for name, q, g, qid, gid in (("i2t", images, texts, caption_id, ids),
                                   ("t2i", texts, images, ids, caption_id)):
        for k, v in recall_at_k(q, g, (1, 5), query_ids=qid, gallery_ids=gid).items():
          out[f"{name}_recall@{k}"] = float(v)
      counts = np.bincount(caption_id)
      out["i2t_chance@1"] = 1.0 / len(unique)
      out["t2i_chance@1"] = float(np.mean(counts / len(captions)))
    out["temperature"] = float(math.exp(-min(float(params["params"]["logit_scale"]),
                                             math.log(100.0))))
    return out

  # -- jaxgen sample: zero-shot predictions on held-out images -----------------------------
  @staticmethod
  def add_sample_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num", type=int, default=8, help="held-out images to caption")

  def sample(self, params, model_state, args, outdir: pathlib.Path):
    """Retrieves the best training caption for held-out images; writes the images as a strip
    and prints image -> caption lines."""
    d = self.config.data
    data = load_all(self._source(d.eval_split), limit=args.num)
    gallery = sorted(set(self._train_captions().tolist()))
    texts = pipe.embed_texts(self.model, params, gallery)
    images = pipe.embed_images(self.model, params, model_state, data["image"])
    best = np.argmax(images @ texts.T, axis=1)
    for i, b in enumerate(best):
      truth = data["caption"][i] if "caption" in data else ""
      print(f"image {i}: {gallery[b]!r}" + (f"   (true: {str(truth)!r})" if truth else ""))
    path = pathlib.Path(args.out_file) if args.out_file else outdir / "retrieval_images.png"
    return [img.save_png(img.grid(data["image"], ncols=args.num,
                                  scale=img.display_scale(d.image_size)), path)]


@functools.lru_cache(maxsize=8)
def load_dual_encoder(workdir: str):
  """(DualEncoder, params, model_state) of a trained clip workdir, for scoring other runs."""
  from jaxgen.train import restore_run
  run = restore_run(workdir)
  if run.config.task != "clip":
    raise ConfigError(f"{workdir} holds a {run.config.task} run, not a clip run.")
  return run.task.model, run.params, run.model_state
