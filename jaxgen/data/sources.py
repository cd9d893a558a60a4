"""Random-access image sources: the embedded set, TFDS (array_record, no TensorFlow), folders, .npz.

Every source yields uint8 images [N, H, W, C] already at the config's size and channel count, and
int32 labels when it has them. Batching, shuffling and sharding live in `jaxgen.data.pipeline`.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
from typing import Protocol, Sequence

import importlib_resources
import numpy as np
from PIL import Image

from jaxgen.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                         "sneaker", "bag", "ankle boot")

# name -> (file inside jaxgen/data/embedded or None if generated, class names, credit line)
EMBEDDED = {
    "fashion_mnist_small": (
        "fashion_mnist_small.npz", FASHION_MNIST_CLASSES,
        "Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, Zalando SE, MIT licence): a class-balanced "
        "subset of 6,000 train and 1,000 test images, from Debian's dataset-fashion-mnist."),
    "shapes": (
        None, None,
        "Procedural coloured shapes with captions (jaxgen.data.shapes): 5,000 train and 1,000 "
        "test scenes, generated from fixed seeds; the label is the first object's shape."),
}
SHAPES_SPLITS = {"train": (5000, 0), "test": (1000, 1)}  # split -> (count, seed)


class Source(Protocol):
  """What the pipeline needs from a data set: its length and batched random access."""
  class_names: tuple[str, ...] | None

  def __len__(self) -> int: ...

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...


def fit_image(image: np.ndarray, size: int, channels: int, what: str) -> np.ndarray:
  """Center-crops to a square and resizes to `size`; checks the channel count. uint8 HWC out."""
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3:
    raise DataError(f"{what}: expected an image [H, W] or [H, W, C], got shape {image.shape}.")
  if image.shape[-1] != channels:
    raise DataError(f"{what}: images have {image.shape[-1]} channel(s) but data.channels="
                    f"{channels}. Set data.channels={image.shape[-1]} or convert the images.")
  if image.dtype != np.uint8:
    raise DataError(f"{what}: images must be uint8, got {image.dtype}.")
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  crop = image[top:top + s, left:left + s]
  pil = Image.fromarray(crop[..., 0] if channels == 1 else crop)
  out = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC))
  return out.reshape(size, size, channels)


def fit_images(images: np.ndarray, size: int, channels: int, what: str) -> np.ndarray:
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise DataError(f"{what}: expected images [N, H, W] or [N, H, W, C], got {images.shape}.")
  if images.dtype != np.uint8:
    if np.issubdtype(images.dtype, np.floating):
      bad = int(np.size(images) - np.count_nonzero(np.isfinite(images)))
      if bad:
        raise DataError(f"{what}: {bad} pixel values are NaN or infinite; float images must be "
                        "finite and lie in [0, 1].")
      lo, hi = float(images.min()), float(images.max())
      if lo < 0.0 or hi > 1.0:
        raise DataError(f"{what}: float images must lie in [0, 1]; found [{lo:.3g}, {hi:.3g}].")
      images = np.round(images * 255.0).astype(np.uint8)
    else:
      raise DataError(f"{what}: images must be uint8 or float in [0, 1], got {images.dtype}.")
  if images.shape[1:] == (size, size, channels):
    return images
  return np.stack([fit_image(im, size, channels, what) for im in images])


@dataclasses.dataclass
class ArraySource:
  """An in-memory data set. Extra fields (captions, ids) ride along and are indexed the same."""
  images: np.ndarray                       # uint8 [N, H, W, C]
  labels: np.ndarray | None = None         # int32 [N]
  class_names: tuple[str, ...] | None = None
  extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    n = len(self.images)
    for name, arr in [("labels", self.labels), *self.extra.items()]:
      if arr is not None and len(arr) != n:
        raise DataError(f"Data set field '{name}' has {len(arr)} rows but there are {n} images.")

  def __len__(self) -> int:
    return len(self.images)

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    out = {"image": self.images[indices]}
    if self.labels is not None:
      out["label"] = self.labels[indices]
    for k, v in self.extra.items():
      out[k] = v[indices]
    return out


def _holdout(n: int, fraction: float, split: str) -> np.ndarray:
  # Fixed seed, independent of the run's seed, so every run evaluates on the same images.
  perm = np.random.default_rng(12345).permutation(n)
  n_test = max(1, int(round(fraction * n)))
  return np.sort(perm[:n_test] if split == "test" else perm[n_test:])


def _check_split(split: str, available: Sequence[str], what: str):
  if split not in available:
    raise DataError(f"{what} has no split '{split}'; it has {', '.join(available)}.")


@functools.lru_cache(maxsize=8)
def _shapes(split: str, size: int, holdout: tuple[str, ...] = ()) -> ArraySource:
  """The procedural shapes; with `holdout` ("colour shape" pairs) the training split leaves out
  every scene holding one of them (image and caption). The test split keeps them all."""
  from jaxgen.data import shapes
  n, seed = SHAPES_SPLITS[split]
  images, captions, attrs = shapes.make_scenes(n, seed, size)
  if holdout:
    hit = shapes.has_combination(attrs, holdout)
    if split == "train":
      keep = ~hit
      images, captions = images[keep], captions[keep]
      attrs = {k: v[keep] for k, v in attrs.items()}
  labels = np.array([shapes.SHAPES.index(s) for s in attrs["shape"]], np.int32)
  return ArraySource(images, labels, shapes.SHAPES, dict(caption=captions, **attrs))


def load_embedded(name: str, split: str, size: int, channels: int,
                  holdout: Sequence[str] = ()) -> ArraySource:
  if name not in EMBEDDED:
    raise DataError(f"Unknown embedded data set '{name}'; jaxgen ships {', '.join(EMBEDDED)}.")
  file, classes, _ = EMBEDDED[name]
  _check_split(split, ("train", "test"), f"Embedded data set '{name}'")
  if file is None:
    if channels != 3:
      raise DataError(f"Embedded data set '{name}' is RGB: set data.channels=3.")
    return _shapes(split, size, tuple(holdout))
  with importlib_resources.files("jaxgen.data").joinpath("embedded", file).open("rb") as f:
    with np.load(f) as npz:
      images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
  images = fit_images(images, size, channels, f"embedded:{name}")
  return ArraySource(images, labels.astype(np.int32), classes)


def load_npz(path: str, split: str, size: int, channels: int, holdout: float) -> ArraySource:
  p = pathlib.Path(path)
  if not p.is_file():
    raise DataError(f"npz file not found: {path}")
  try:
    npz = np.load(p, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise DataError(f"Could not read {path} as .npz: {e}") from e
  try:
    with npz:
      keys = set(npz.files)
      if f"{split}_images" in keys:
        images = npz[f"{split}_images"]
        labels = npz[f"{split}_labels"] if f"{split}_labels" in keys else None
        captions = npz[f"{split}_captions"] if f"{split}_captions" in keys else None
      elif "images" in keys:
        n = len(npz["images"])
        for name in ("labels", "captions"):
          if name in keys and len(npz[name]) != n:
            raise DataError(f"{path}: '{name}' has {len(npz[name])} rows but 'images' has {n}; "
                            "give one per image.")
        idx = _holdout(n, holdout, split)
        if not len(idx):
          raise DataError(f"{path}: {n} images leave none for the '{split}' split "
                          f"(data.holdout_fraction={holdout}); give more images.")
        images = npz["images"][idx]
        labels = npz["labels"][idx] if "labels" in keys else None
        captions = npz["captions"][idx] if "captions" in keys else None
      else:
        raise DataError(f"{path} needs an 'images' array (optionally 'labels', 'captions', "
                        f"'class_names'), or '{split}_images'; it has {sorted(keys)}.")
      class_names = npz["class_names"] if "class_names" in keys else None
  except DataError:
    raise
  except ValueError as e:  # object arrays: np.load refuses to unpickle them (allow_pickle=False)
    raise DataError(f"Could not read {path}: {e}. jaxgen reads plain numeric and string arrays "
                    "only, never pickled objects.") from e
  images = fit_images(images, size, channels, path)
  if labels is not None:
    labels = _check_labels(labels, len(images), path)
  if class_names is not None:  # names for zero-shot prompts: one string per label value
    if class_names.dtype.kind not in "US" or class_names.ndim != 1:
      raise DataError(f"{path}: 'class_names' must be a 1-D array of strings, got "
                      f"{class_names.dtype} {class_names.shape}.")
    if labels is None or labels.max(initial=0) >= len(class_names):
      raise DataError(f"{path}: 'class_names' has {len(class_names)} names; it needs labels "
                      "and a name for every label value.")
    class_names = tuple(str(n) for n in class_names)
  extra = {}
  if captions is not None:
    if captions.dtype.kind not in "US":
      raise DataError(f"{path}: captions must be an array of strings, got {captions.dtype}.")
    extra["caption"] = captions.astype(str)
  return ArraySource(images, labels, class_names, extra=extra)


def _check_labels(labels, n: int, what: str) -> np.ndarray:
  """int32 [n] labels, or a DataError saying what is wrong with them."""
  labels = np.asarray(labels)
  if labels.dtype.kind not in "iub":
    raise DataError(f"{what}: labels must be integers (class indices), got {labels.dtype}"
                    + (": map class names to indices first" if labels.dtype.kind in "USO"
                       else "") + ".")
  labels = labels.reshape(-1)
  if len(labels) != n:
    raise DataError(f"{what}: {len(labels)} labels for {n} images; give one per image.")
  if len(labels) and labels.min() < 0:
    raise DataError(f"{what}: labels must be >= 0; found {int(labels.min())}.")
  return labels.astype(np.int32)


def _read_image(f: pathlib.Path, mode: str) -> np.ndarray:
  """An image file as uint8 in `mode` (L or RGB). 16-bit greyscale is scaled to 8 bits rather
  than clipped (PIL's convert would saturate it to white)."""
  with Image.open(f) as im:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
      wide = np.asarray(im, dtype=np.float64)
      top = 65535.0 if im.mode.startswith("I;16") or wide.max() > 255 else 255.0
      grey = np.round(np.clip(wide, 0, top) / top * 255.0).astype(np.uint8)
      im = Image.fromarray(grey, "L")
    return np.asarray(im.convert(mode))


def load_folder(path: str, split: str, size: int, channels: int, holdout: float) -> ArraySource:
  """Images under `path`. Sub-folders are classes; `path/train` and `path/test` are splits; a
  text file beside an image with the same stem (cat.png, cat.txt) is its caption."""
  root = pathlib.Path(path)
  if not root.is_dir():
    raise DataError(f"Image folder not found: {path}")
  use_holdout = not (root / split).is_dir()
  if not use_holdout:
    root = root / split
  class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
  files, labels = [], []
  if class_dirs:
    for c, d in enumerate(class_dirs):
      found = sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
      files += found
      labels += [c] * len(found)
  else:
    files = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
  if not files:
    raise DataError(f"No images ({', '.join(IMAGE_SUFFIXES)}) found under {root}.")
  if use_holdout:
    idx = _holdout(len(files), holdout, split)
    if not len(idx):
      raise DataError(f"{root} has {len(files)} image(s): none is left for the '{split}' split "
                      f"(data.holdout_fraction={holdout}). Give more images, or train/ and "
                      "test/ sub-folders.")
    files = [files[i] for i in idx]
    labels = [labels[i] for i in idx] if labels else []
  mode = "L" if channels == 1 else "RGB"
  images = []
  for f in files:
    try:
      images.append(fit_image(_read_image(f, mode), size, channels, str(f)))
    except (OSError, ValueError) as e:
      raise DataError(f"Could not read image {f}: {e}") from e
  names = tuple(d.name for d in class_dirs) if class_dirs else None
  extra = {}
  caption_files = [f.with_suffix(".txt") for f in files]
  have = [c.is_file() for c in caption_files]
  if any(have):
    if not all(have):
      missing = [str(f) for f, h in zip(files, have) if not h][:3]
      raise DataError(f"Some images under {root} have a caption file and some do not "
                      f"(e.g. {', '.join(missing)} have none): give every image one, or none.")
    extra["caption"] = np.array([" ".join(c.read_text(encoding="utf-8").split())
                                 for c in caption_files])
  return ArraySource(np.stack(images), np.asarray(labels, np.int32) if labels else None, names,
                     extra)


class TfdsSource:
  """A prepared TFDS data set read through array_record random access (no TensorFlow)."""

  def __init__(self, name: str, split: str, size: int, channels: int, data_dir: str = "",
               image_key: str = "image", label_key: str = "label", caption_key: str = ""):
    import tensorflow_datasets as tfds
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types; all mean "not readable as prepared"
      where = data_dir or "~/tensorflow_datasets"
      raise DataError(
          f"TFDS data set '{name}' (split '{split}') is not prepared in {where} in the "
          f"array_record format, and jaxgen never downloads during training. Prepare it once on a "
          f"machine with internet (and TensorFlow): python -c \"import tensorflow_datasets as "
          f"tfds; tfds.builder('{name}', data_dir='{where}', file_format='array_record')"
          f".download_and_prepare()\", then copy the folder here or set data.tfds_data_dir. "
          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    self.name, self.size, self.channels = name, size, channels
    self.image_key, self.label_key = image_key, label_key
    first = self._ds[0]
    if image_key not in first:
      raise DataError(f"TFDS '{name}' has no feature '{image_key}'; it has {sorted(first)}. "
                      "Set data.image_key.")
    self.has_label = label_key in first
    self.caption_key = caption_key
    if caption_key:
      self._caption(first)  # fails now, with the keys it has, if the path is wrong
    self.class_names = None
    try:
      feature = self._ds.dataset_info.features[label_key]
      self.class_names = tuple(feature.names)
    except (AttributeError, KeyError, TypeError):
      pass

  def __len__(self) -> int:
    return len(self._ds)

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    examples = [self._ds[int(i)] for i in indices]
    images = np.stack([fit_image(np.asarray(ex[self.image_key]), self.size, self.channels,
                                 f"tfds:{self.name}") for ex in examples])
    out = {"image": images}
    if self.has_label:
      out["label"] = np.asarray([ex[self.label_key] for ex in examples], np.int32)
    if self.caption_key:
      out["caption"] = np.array([self._caption(ex) for ex in examples])
    return out

  def _caption(self, example) -> str:
    """The feature at caption_key ('a/b' for nested features); of several, the first."""
    value = example
    for part in self.caption_key.split("/"):
      if not isinstance(value, dict) or part not in value:
        have = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise DataError(f"TFDS '{self.name}' has no caption feature '{self.caption_key}' "
                        f"(at '{part}' found {have}). Set data.caption_key.")
      value = value[part]
    value = np.asarray(value)
    if value.ndim:
      value = value.reshape(-1)[0]
    value = value.item()
    return " ".join((value.decode("utf-8") if isinstance(value, bytes) else str(value)).split())


def load_source(data_cfg, split: str) -> Source:
  """The config's data set and split as a random-access source."""
  d = data_cfg
  if d.source == "embedded":
    return load_embedded(d.name, split, d.image_size, d.channels,
                         tuple(d.get("holdout_combinations", ())))
  if d.source == "npz":
    return load_npz(d.path, split, d.image_size, d.channels, d.holdout_fraction)
  if d.source == "folder":
    return load_folder(d.path, split, d.image_size, d.channels, d.holdout_fraction)
  if d.source == "tfds":
    return TfdsSource(d.name, split, d.image_size, d.channels, d.tfds_data_dir, d.image_key,
                      d.label_key, d.caption_key)
  raise DataError(f"Unknown data.source {d.source!r}.")


def load_all(source: Source, limit: int | None = None) -> dict[str, np.ndarray]:
  """The first `limit` examples (all by default) as arrays: for evaluation on held-out data."""
  n = len(source) if limit is None else min(limit, len(source))
  return source.get(np.arange(n))


def heldout_images(data_cfg, limit: int | None = None) -> np.ndarray:
  """The first `limit` images (uint8) of the config's held-out split."""
  return load_all(load_source(data_cfg, data_cfg.eval_split), limit=limit)["image"]
