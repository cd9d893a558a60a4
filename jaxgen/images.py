"""Pictures: image grids and strips as uint8 arrays, written as PNG."""
from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image


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


def display_scale(size: int) -> int:
  """Nearest-neighbour upscaling so that small images are visible (at least ~64 px)."""
  return max(1, 64 // size)


def save_png(picture: np.ndarray, path: str | pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  picture = to_uint8(picture)
  if picture.ndim == 3 and picture.shape[-1] == 1:
    picture = picture[..., 0]
  Image.fromarray(picture).save(path)
  return path
