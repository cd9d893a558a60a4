"""A judge that reads pixels: does a picture of the captioned shapes show what its caption says?

For each object a caption names ("a large red circle left of a small blue square"), the judge
finds the connected regions of the named colour (every pixel takes the nearest colour of the
data's palette, black background included), takes the region that fits the named object best,
and reads from it the shape and the size (the template of the four shapes x two sizes, drawn as
`data.shapes` draws them at the region's centroid, that overlaps it most) and the centroid. From
these: colour (a region of each named colour exists), shape, size, the relation (the order of
the two centroids along the named axis), both objects present, and binding (every object has
its colour, shape and size at once). Unlike a contrastive judge it cannot read a caption as a bag
of words: "left of" is a sign of a centroid difference.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from jaxgen.data import shapes

_PALETTE = np.array([shapes.COLOURS[c] for c in shapes.COLOUR_NAMES], np.float32)
# A region smaller than this share of the canvas is noise, not an object (the smallest object,
# a small triangle, covers 2.5% of it).
MIN_AREA = 0.01
SCORES = ("colour", "shape", "size", "relation", "both_present", "binding")


def colour_cover(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per pixel, its colour (index in shapes.COLOUR_NAMES) and how much of the pixel it covers
  (0..1). A pixel is read as a mixture a * colour over the black background, as the generator's
  anti-aliased edges are: the palette colour whose best mixture is nearest. `image`: [H, W, 3]
  uint8 or floats in [0, 255]."""
  x = np.asarray(image, np.float32)
  if x.ndim != 3 or x.shape[-1] != 3:
    raise ValueError(f"the pixel judge reads RGB images [H, W, 3]; got shape {x.shape}.")
  cover = np.clip(x @ _PALETTE.T / (_PALETTE ** 2).sum(-1), 0.0, 1.0)  # [H, W, K]
  residual = ((x[:, :, None, :] - cover[..., None] * _PALETTE) ** 2).sum(-1)
  best = residual.argmin(-1)
  return best, np.take_along_axis(cover, best[..., None], -1)[..., 0]


def _fit(region: np.ndarray, centroid) -> dict[tuple[str, str], float]:
  """Soft IoU (sum of minima over sum of maxima of the covers) of the region's cover [H, W] with
  every shape x size template drawn at its centroid ((y, x) in pixels) as the generator draws it
  (supersampled)."""
  size = region.shape[0]
  s = size * shapes.SUPERSAMPLE
  c = (np.arange(s) + 0.5) / s
  yy, xx = np.meshgrid(c - centroid[0] / size, c - centroid[1] / size, indexing="ij")
  out = {}
  for shape in shapes.SHAPES:
    for name, r in shapes.SIZES.items():
      t = shapes._mask(shape, xx, yy, r).reshape(size, shapes.SUPERSAMPLE, size,
                                                 shapes.SUPERSAMPLE).mean((1, 3))
      out[shape, name] = float(np.minimum(t, region).sum() / max(np.maximum(t, region).sum(),
                                                                  1e-6))
  return out


def find_objects(image: np.ndarray) -> dict[str, list[dict]]:
  """colour name -> its regions, largest first: each {"area" (share of the canvas), "centroid"
  ((y, x) in canvas units), "fit" ({(shape, size): IoU}), "shape", "size" (the best fit)}. A
  region is a connected set of pixels that the colour covers at least half of, with the partly
  covered pixels around it."""
  colour, cover = colour_cover(image)
  h, w = colour.shape
  if h != w:
    raise ValueError(f"the pixel judge reads square images; got {h}x{w}.")
  found = {}
  for index, name in enumerate(shapes.COLOUR_NAMES):
    mine = np.where(colour == index, cover, 0.0)
    comps, n = ndimage.label(mine >= 0.5, structure=np.ones((3, 3)))
    regions = []
    for k in range(1, n + 1):
      core = comps == k
      region = np.where(ndimage.binary_dilation(core) & (comps == 0) | core, mine, 0.0)
      area = region.sum() / (h * w)
      if area < MIN_AREA:
        continue
      ys, xs = np.mgrid[:h, :w] + 0.5
      centroid = ((ys * region).sum() / region.sum(), (xs * region).sum() / region.sum())
      fit = _fit(region, centroid)
      shape, size = max(fit, key=fit.get)
      regions.append(dict(area=float(area), centroid=(centroid[0] / h, centroid[1] / w),
                          fit=fit, shape=shape, size=size))
    found[name] = sorted(regions, key=lambda r: -r["area"])
  return found


def _named_objects(caption: str) -> tuple[list[dict], str]:
  a = shapes.parse_caption(caption)
  objects = [dict(shape=a["shape"], colour=a["colour"], size=a["size"])]
  if a["relation"]:
    objects.append(dict(shape=a["shape2"], colour=a["colour2"], size=a["size2"]))
  for o in objects:
    if not o["colour"] or not o["shape"] or not o["size"]:
      raise ValueError(f"the pixel judge reads captions of the shapes data ('a large red circle "
                       f"left of a small blue square'); cannot read {caption!r}.")
  return objects, a["relation"]


def _assign(objects: list[dict], found: dict) -> list[dict | None]:
  """The region each named object is read from: the best-fitting region of its colour; two
  objects of one colour share its two largest regions in the order that fits them best."""
  out: list[dict | None] = [None] * len(objects)
  by_colour: dict[str, list[int]] = {}
  for i, o in enumerate(objects):
    by_colour.setdefault(o["colour"], []).append(i)
  for colour, idx in by_colour.items():
    regions = found.get(colour, [])
    if not regions:
      continue
    if len(idx) == 1:
      o = objects[idx[0]]
      out[idx[0]] = max(regions, key=lambda r: (r["fit"][o["shape"], o["size"]], r["area"]))
      continue
    score = lambda o, r: r["fit"][o["shape"], o["size"]]
    a, b = idx
    regions = regions[:2]
    if len(regions) == 1:
      r = regions[0]
      out[a if score(objects[a], r) >= score(objects[b], r) else b] = r
    elif (score(objects[a], regions[0]) + score(objects[b], regions[1])
          >= score(objects[a], regions[1]) + score(objects[b], regions[0])):
      out[a], out[b] = regions[0], regions[1]
    else:
      out[a], out[b] = regions[1], regions[0]
  return out


def _relation_holds(relation: str, first: dict, second: dict) -> bool:
  (y0, x0), (y1, x1) = first["centroid"], second["centroid"]
  return {"left of": x0 < x1, "right of": x0 > x1, "above": y0 < y1, "below": y0 > y1}[relation]


def judge(image: np.ndarray, caption: str) -> dict[str, bool | None]:
  """Which of SCORES hold for one picture and its caption; relation and both_present are None
  for a one-object caption."""
  objects, relation = _named_objects(caption)
  regions = _assign(objects, find_objects(image))
  present = [r is not None for r in regions]
  shape_ok = [r is not None and r["shape"] == o["shape"] for o, r in zip(objects, regions)]
  size_ok = [r is not None and r["size"] == o["size"] for o, r in zip(objects, regions)]
  out = dict(colour=all(present), shape=all(shape_ok), size=all(size_ok),
             binding=all(s and z for s, z in zip(shape_ok, size_ok)),
             relation=None, both_present=None)
  if relation:
    out["both_present"] = all(present)
    out["relation"] = all(present) and _relation_holds(relation, *regions)
  return out


def pixel_judge(images: np.ndarray, captions) -> dict[str, float]:
  """The share of pictures for which each of SCORES holds (relation and both_present over the
  two-object captions only), and the numbers of pictures behind them."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"the pixel judge reads RGB images [N, H, W, 3]; got shape {images.shape}.")
  if np.issubdtype(images.dtype, np.floating) and images.max() <= 1.0 + 1e-6:
    images = images * 255.0  # images in [0, 1]
  captions = [str(c) for c in captions]
  if len(captions) != len(images):
    raise ValueError(f"{len(images)} images but {len(captions)} captions.")
  rows = [judge(x, c) for x, c in zip(images, captions)]
  out = {}
  for k in SCORES:
    vals = [r[k] for r in rows if r[k] is not None]
    out[k] = float(np.mean(vals)) if vals else float("nan")
  out["num"] = len(rows)
  out["num_two_object"] = sum(r["relation"] is not None for r in rows)
  return out
