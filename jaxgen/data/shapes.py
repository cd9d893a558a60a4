"""Procedural image-caption pairs: coloured shapes with sizes and spatial relations.

"a small red circle left of a large blue square": exact captions for compositional text-image
work (contrastive dual encoders, text-to-image), generated deterministically from a seed in
seconds, so nothing is downloaded or shipped. Each example also carries its attributes, so
zero-shot classification and prompt-following can be scored exactly.
"""
from __future__ import annotations

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {"red": (235, 45, 45), "green": (45, 200, 70), "blue": (55, 95, 245),
           "yellow": (240, 220, 50), "magenta": (220, 60, 220), "cyan": (50, 220, 230)}
COLOUR_NAMES = tuple(COLOURS)
SIZES = {"small": 0.13, "large": 0.23}  # radius as a fraction of the canvas
SIZE_NAMES = tuple(SIZES)
RELATIONS = ("left of", "right of", "above", "below")
SUPERSAMPLE = 4


def _mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
  if shape == "circle":
    return dx * dx + dy * dy <= r * r
  if shape == "square":
    return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
  if shape == "diamond":
    return np.abs(dx) + np.abs(dy) <= 1.15 * r
  # upward triangle with its centroid at the centre
  h = 1.5 * r
  top, base = -2 * h / 3, h / 3
  inside_y = (dy >= top) & (dy <= base)
  half_width = (dy - top) / (base - top) * (h / np.sqrt(3)) * 1.15
  return inside_y & (np.abs(dx) <= half_width)


def _box(coords: np.ndarray, centre: float, r: float) -> slice:
  """The sub-pixel indices whose coordinate lies within 1.2 r of `centre` (a slice)."""
  lo, hi = np.searchsorted(coords, (centre - 1.2 * r, centre + 1.2 * r))
  return slice(int(lo), int(hi))


def _phrase(obj: dict) -> str:
  return f"a {obj['size']} {obj['colour']} {obj['shape']}"


def _sample_object(rng) -> dict:
  return dict(shape=SHAPES[rng.integers(len(SHAPES))],
              colour=COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))],
              size=SIZE_NAMES[rng.integers(len(SIZE_NAMES))])


def _place(rng, radius: float, lo: tuple[float, float], hi: tuple[float, float]):
  """A centre inside the box [lo, hi] (fractions of the canvas) keeping the shape on canvas."""
  x = rng.uniform(max(lo[0], radius), min(hi[0], 1 - radius))
  y = rng.uniform(max(lo[1], radius), min(hi[1], 1 - radius))
  return x, y


def make_scene(rng, size: int, two_objects: bool):
  """One image (uint8 [size, size, 3]), its caption and attributes."""
  s = size * SUPERSAMPLE
  coords = (np.arange(s) + 0.5) / s
  yy, xx = np.meshgrid(coords, coords, indexing="ij")
  canvas = np.zeros((s, s, 3), np.float32)
  a = _sample_object(rng)
  objects = [a]
  if two_objects:
    b = _sample_object(rng)
    while b == a:
      b = _sample_object(rng)
    objects.append(b)
    relation = RELATIONS[rng.integers(len(RELATIONS))]
  radii = [SIZES[o["size"]] for o in objects]
  while True:  # rejection sampling; two large shapes fit side by side in a few tries
    if not two_objects:
      centres = [_place(rng, radii[0], (0, 0), (1, 1))]
    else:
      # the first object lies in the half the relation names, the second in the other half
      first, second = {"left of": (((0, 0), (0.5, 1)), ((0.5, 0), (1, 1))),
                       "right of": (((0.5, 0), (1, 1)), ((0, 0), (0.5, 1))),
                       "above": (((0, 0), (1, 0.5)), ((0, 0.5), (1, 1))),
                       "below": (((0, 0.5), (1, 1)), ((0, 0), (1, 0.5)))}[relation]
      centres = [_place(rng, radii[0], *first), _place(rng, radii[1], *second)]
      (x0, y0), (x1, y1) = centres
      if np.hypot(x1 - x0, y1 - y0) < 1.15 * (radii[0] + radii[1]):  # no overlap
        continue
      # the relation must hold clearly along its axis, not only by the half-planes
      along = (x1 - x0) if relation in ("left of", "right of") else (y1 - y0)
      if abs(along) < 0.5 * (radii[0] + radii[1]):
        continue
    break
  for obj, (cx, cy), r in zip(objects, centres, radii):
    # Every shape lies within 1.15 r of its centre: test only the sub-pixels of that box.
    rows = _box(coords, cy, r)
    cols = _box(coords, cx, r)
    m = _mask(obj["shape"], xx[rows, cols] - cx, yy[rows, cols] - cy, r)
    canvas[rows, cols][m] = np.asarray(COLOURS[obj["colour"]], np.float32)
  # Box filter over the sub-pixels: sums of a few integers, exact in float32 in any order.
  image = canvas.reshape(size, SUPERSAMPLE, s, 3).sum(1)
  image = image.reshape(size, size, SUPERSAMPLE, 3).sum(2) / SUPERSAMPLE**2
  caption = _phrase(a) if not two_objects else f"{_phrase(a)} {relation} {_phrase(objects[1])}"
  attrs = dict(shape=a["shape"], colour=a["colour"], size=a["size"],
               relation=relation if two_objects else "",
               shape2=objects[1]["shape"] if two_objects else "",
               colour2=objects[1]["colour"] if two_objects else "",
               size2=objects[1]["size"] if two_objects else "")
  return np.round(image).astype(np.uint8), caption, attrs


def make_scenes(n: int, seed: int, size: int = 32, two_object_fraction: float = 0.5):
  """n scenes: images uint8 [n, size, size, 3], captions (str array), attributes (str arrays)."""
  rng = np.random.default_rng(seed)
  images, captions, attrs = [], [], []
  for _ in range(n):
    im, cap, at = make_scene(rng, size, bool(rng.uniform() < two_object_fraction))
    images.append(im)
    captions.append(cap)
    attrs.append(at)
  columns = {k: np.array([a[k] for a in attrs]) for k in attrs[0]}
  return np.stack(images), np.array(captions), columns


def attribute_prompts() -> dict[str, tuple[list[list[str]], tuple[str, ...]]]:
  """attribute -> (prompts per class, class names) for zero-shot reading of the first object's
  shape and colour: each class's prompts span the other attributes (a prompt ensemble)."""
  return {
      "shape": ([[f"a {z} {c} {k}" for z in SIZE_NAMES for c in COLOUR_NAMES] for k in SHAPES],
                SHAPES),
      "colour": ([[f"a {z} {c} {k}" for z in SIZE_NAMES for k in SHAPES] for c in COLOUR_NAMES],
                 COLOUR_NAMES),
  }


ATTRIBUTES = ("shape", "colour", "size", "relation", "shape2", "colour2", "size2")


def parse_combinations(combinations) -> tuple[tuple[str, str], ...]:
  """("red circle", ...) -> (("red", "circle"), ...); an unknown colour or shape is a DataError
  naming the valid ones."""
  from jaxgen.errors import ConfigError
  out = []
  for text in combinations:
    words = str(text).split()
    if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES:
      raise ConfigError(f"data.holdout_combinations: {text!r} is not 'colour shape' with a colour "
                      f"of {', '.join(COLOUR_NAMES)} and a shape of {', '.join(SHAPES)}.")
    out.append((words[0], words[1]))
  return tuple(out)


def has_combination(attrs: dict, combinations) -> np.ndarray:
  """bool [N]: whether each scene (attribute columns of make_scenes) holds an object of one of
  the (colour, shape) combinations."""
  n = len(attrs["shape"])
  hit = np.zeros(n, bool)
  for colour, shape in parse_combinations(combinations):
    hit |= (attrs["colour"] == colour) & (attrs["shape"] == shape)
    hit |= (attrs["colour2"] == colour) & (attrs["shape2"] == shape)
  return hit


def parse_caption(text: str) -> dict[str, str]:
  """The attributes a caption states, read back as `make_scene` writes them: the first object's
  shape, colour and size, the relation, and the second object's ('' for what is absent or not
  a known word). A caption in other words parses as far as its words are this set's."""
  words = text.lower().split()
  out = dict.fromkeys(ATTRIBUTES, "")
  parts = [words, []]
  for i in range(len(words)):
    for rel in RELATIONS:
      r = rel.split()
      if words[i:i + len(r)] == r:
        out["relation"] = rel
        parts = [words[:i], words[i + len(r):]]
        break
    if out["relation"]:
      break
  for part, suffix in zip(parts, ("", "2")):
    for attr, vocab in (("shape", SHAPES), ("colour", COLOUR_NAMES), ("size", SIZE_NAMES)):
      out[attr + suffix] = next((w for w in part if w in vocab), "")
  return out


_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def canonical(attrs: dict[str, str]) -> dict[str, str]:
  """The attributes of a two-object scene stated with the relation 'left of' or 'above': "a red
  circle right of a blue square" is the scene of "a blue square left of a red circle", so both
  read the same. One-object scenes are returned as they are."""
  if attrs.get("relation") not in ("right of", "below"):
    return dict(attrs)
  return dict(shape=attrs["shape2"], colour=attrs["colour2"], size=attrs["size2"],
              relation=_INVERSE[attrs["relation"]], shape2=attrs["shape"],
              colour2=attrs["colour"], size2=attrs["size"])


def equivalent_captions(caption: str) -> list[str]:
  """The caption and, for a two-object scene, the same scene told from the other object ("a X
  left of a Y" and "a Y right of a X"): the references a caption of this set is scored against."""
  a = parse_caption(caption)
  if not a["relation"]:
    return [caption]
  first, second = (f"a {a[f'size{s}']} {a[f'colour{s}']} {a[f'shape{s}']}" for s in ("", "2"))
  return [caption, f"{second} {_INVERSE[a['relation']]} {first}"]
