"""The one image layer: conversions between uint8, [0, 1] and [-1, 1], shape checks, the padded
batch mapper, and pictures (grids and strips as uint8 arrays, written as PNG).

Conventions: images are NHWC; "unit" images are float in [0, 1]; "signed" images are float in
[-1, 1], what the networks see. Every function that takes images takes uint8 or unit floats.
"""
from __future__ import annotations

import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxgen.errors import ShapeError
from jaxgen.train.mesh import put_batch


def to_unit(images) -> jax.Array:
  """uint8 or [0, 1] float images -> float32 in [0, 1]. Jittable."""
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def to_signed(images) -> jax.Array:
  """uint8 or [0, 1] float images -> float32 in [-1, 1], the networks' input. Jittable."""
  return 2.0 * to_unit(images) - 1.0


def from_signed(x) -> jax.Array:
  """[-1, 1] model outputs -> images in [0, 1], clipped. Jittable."""
  return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)


def check_images(images, expected: tuple[int, ...], what: str = "images",
                 model: str = "this model makes") -> None:
  """ShapeError naming the expected [batch, H, W, C] unless `images` has it."""
  if np.ndim(images) != 4 or tuple(np.shape(images)[1:]) != tuple(expected):
    dims = ", ".join(map(str, expected))
    raise ShapeError(f"{what}: expected shape [batch, {dims}] (NHWC), got "
                     f"{list(np.shape(images))}; {model} images [batch, {dims}].")


def map_batches(fn: Callable, arrays: dict[str, np.ndarray] | np.ndarray, batch_size: int,
                key: jax.Array | None = None):
  """Runs a jitted per-batch function over a whole data set with one compile: the last batch is
  padded to the full size (by wrapping around) and the padding dropped from the results.

  With a dict, fn(batch, key) -> dict of per-example arrays and the result is a dict of numpy
  arrays; with one array, fn(batch) -> per-example array [b, ...] and the result is an array.
  """
  single = not isinstance(arrays, dict)
  data = {"x": arrays} if single else arrays
  n = len(next(iter(data.values())))
  outs: dict[str, list] = {}
  for i, lo in enumerate(range(0, n, batch_size)):
    idx = np.arange(lo, lo + batch_size) % n
    # under a mesh (jax.set_mesh), each batch is split over its devices
    batch = {k: put_batch(np.asarray(v)[idx]) for k, v in data.items()}
    if single:
      res = {"x": fn(batch["x"])}
    else:
      res = fn(batch, None if key is None else jax.random.fold_in(key, i))
    res = jax.device_get(res)
    keep = min(batch_size, n - lo)
    for name, v in res.items():
      outs.setdefault(name, []).append(np.asarray(v)[:keep])
  out = {k: np.concatenate(v) for k, v in outs.items()}
  return out["x"] if single else out


def to_uint8(images) -> np.ndarray:
  """Float images in [0, 1] (or uint8) -> uint8."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def grid(images, ncols: int | None = None, pad: int = 2, scale: int = 1,
         pad_value: int = 255) -> np.ndarray:
  """[N, H, W, C] -> one uint8 picture [rows*(H+pad)+pad, cols*(W+pad)+pad, C]."""
  images = to_uint8(images)
  if images.ndim == 3:
    images = images[..., None]
  n, h, w, c = images.shape
  ncols = ncols or int(np.ceil(np.sqrt(n)))
  nrows = int(np.ceil(n / ncols))
  out = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value, np.uint8)
  for i in range(n):
    r, col = divmod(i, ncols)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    out[y:y + h, x:x + w] = images[i]
  if scale > 1:
    out = out.repeat(scale, axis=0).repeat(scale, axis=1)
  return out


def rows(*image_rows, pad: int = 2, scale: int = 1) -> np.ndarray:
  """Several rows of equal length (each [N, H, W, C]) stacked as one strip picture."""
  stacked = np.concatenate([to_uint8(r) for r in image_rows], axis=0)
  return grid(stacked, ncols=len(image_rows[0]), pad=pad, scale=scale)


def labelled_grid(images, labels, pad: int = 2, scale: int = 1,
                  min_column_px: int = 128) -> np.ndarray:
  """A grid with one column per label, the label written under its column: images [N, H, W, C]
  in column-major order (the first N / len(labels) images are column 0); the scale is raised
  until a column is at least `min_column_px` wide, and labels wrap to the column's width."""
  import textwrap

  from PIL import ImageDraw, ImageFont
  images = to_uint8(images)
  ncols = len(labels)
  if ncols == 0 or len(images) % ncols:
    raise ShapeError(f"{len(images)} images do not fill {ncols} labelled columns.")
  nrows = len(images) // ncols
  by_row = images.reshape(ncols, nrows, *images.shape[1:]).swapaxes(0, 1)
  by_row = by_row.reshape(images.shape)
  w = images.shape[2]
  scale = max(scale, -(-min_column_px // (w + pad)))
  picture = grid(by_row, ncols=ncols, pad=pad, scale=scale)
  font = ImageFont.load_default()
  left, top, right, bottom = font.getbbox("abcdefghij")
  char_w, line_h = max(1, (right - left) // 10), (bottom - top) + 3
  col_w = (w + pad) * scale
  lines = [textwrap.wrap(str(t), max(1, (col_w - 4) // char_w)) or [""] for t in labels]
  strip_h = max(len(x) for x in lines) * line_h + 4
  canvas = Image.new("RGB", (picture.shape[1], picture.shape[0] + strip_h), "white")
  canvas.paste(Image.fromarray(picture if picture.shape[-1] == 3 else
                               np.repeat(picture, 3, axis=-1)), (0, 0))
  draw = ImageDraw.Draw(canvas)
  for col, text_lines in enumerate(lines):
    for k, line in enumerate(text_lines):
      draw.text((pad * scale + col * col_w, picture.shape[0] + 2 + k * line_h), line,
                fill=(0, 0, 0), font=font)
  return np.asarray(canvas)


def display_scale(size: int) -> int:
  """Nearest-neighbour upscaling so that small images are visible (at least ~64 px)."""
  return max(1, 64 // size)


def save_png(picture: np.ndarray, path: str | pathlib.Path) -> pathlib.Path:
  """Writes a uint8 (or [0, 1]) picture as PNG, atomically; a write failure is a WriteError
  naming the path."""
  import io

  from jaxgen.files import atomic_write_bytes, make_dir
  path = pathlib.Path(path)
  make_dir(path.parent, "picture folder")
  picture = to_uint8(picture)
  if picture.ndim == 3 and picture.shape[-1] == 1:
    picture = picture[..., 0]
  buf = io.BytesIO()
  Image.fromarray(picture).save(buf, format="PNG")
  return atomic_write_bytes(path, buf.getvalue())


def read_picture(path: str | pathlib.Path, channels: int, size: int | None = None
                 ) -> tuple[np.ndarray, bool]:
  """A PNG/JPEG/... file as uint8 [H, W, channels] (converted to grey or RGB). With `size`, a
  picture of another size is resized so that its shorter side is `size` (bicubic) and centre-
  cropped to size x size, as CLIP's preprocessing does; returns (picture, whether resized). An
  unreadable file is a DataError naming it."""
  from jaxgen.errors import DataError
  try:
    with Image.open(path) as im:
      im = im.convert("L" if channels == 1 else "RGB")
      resized = size is not None and im.size != (size, size)
      if resized:
        scale = size / min(im.size)
        w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
        im = im.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
      x = np.asarray(im)
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: cannot read the picture ({e})") from e
  return x.reshape(*x.shape[:2], channels), resized


def estimate_noise_sigma(images) -> np.ndarray:
  """Standard deviation of additive white Gaussian noise in each image [B, H, W, C] (values in
  [0, 1] or uint8, reported on the [0, 1] scale): Donoho and Johnstone's (1994) robust estimate,
  the median absolute value of the finest diagonal Haar wavelet coefficients / 0.6745, averaged
  over channels. Clean, smooth content contributes little to those coefficients; strong edges
  and texture bias it upwards (as with scikit-image's estimate_sigma, which computes the same
  with PyWavelets)."""
  x = np.asarray(to_unit(images), np.float64)
  if x.ndim != 4:
    raise ShapeError(f"images: expected [batch, height, width, channels], got {list(x.shape)}")
  h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
  if h < 2 or w < 2:
    raise ShapeError(f"images of {x.shape[1]}x{x.shape[2]} are too small to estimate noise in")
  x = x[:, :h, :w]
  # orthonormal Haar: the diagonal detail of each 2x2 block, (a - b - c + d) / 2, carries the
  # noise with its own standard deviation
  hh = (x[:, 0::2, 0::2] - x[:, 0::2, 1::2] - x[:, 1::2, 0::2] + x[:, 1::2, 1::2]) / 2
  mad = np.median(np.abs(hh).reshape(hh.shape[0], -1, hh.shape[-1]), axis=1)
  return (mad / 0.6745).mean(axis=-1)
