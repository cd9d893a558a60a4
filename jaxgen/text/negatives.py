"""Hard-negative twins of captions (NegCLIP, Yuksekgonul et al. 2023): the same words, told
otherwise. A contrastive text tower that scores "a red circle left of a blue square" and its
twin "a red circle right of a blue square" alike reads captions as bags of words; training with
the twins as extra negatives, and measuring how often an image prefers its caption over its
twin, both rest on these rewrites.

Kinds:
  relation  every spatial word turned into its opposite ("left of" -> "right of", "above" ->
            "below"): the mirrored scene, same words otherwise
  colour    the first two different colour words exchanged: the colours bound to the other
            objects ("a red circle left of a blue square" -> "a blue circle left of a red square")
  shape     the same with the first two different shape words
  size      the same with the first two different size words
A twin equal to its caption (one object, or two objects sharing the attribute) is no twin:
`twin` returns None.
"""
from __future__ import annotations

from jaxgen.data import shapes

KINDS = ("relation", "colour", "shape", "size")
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above",
             "over": "under", "under": "over", "top": "bottom", "bottom": "top"}
_VOCAB = {
    "colour": set(shapes.COLOUR_NAMES) | {"white", "black", "grey", "gray", "orange", "purple",
                                          "pink", "brown"},
    "shape": set(shapes.SHAPES) | {"rectangle", "star", "ellipse", "cube", "sphere", "cylinder"},
    "size": set(shapes.SIZE_NAMES) | {"big", "tiny", "huge"},
}


def twin(caption: str, kind: str) -> str | None:
  """The caption's hard-negative twin of this kind (module docstring), or None."""
  if kind not in KINDS:
    raise ValueError(f"unknown hard-negative kind {kind!r}; expected one of {', '.join(KINDS)}.")
  words = caption.split()
  lower = [w.lower() for w in words]
  if kind == "relation":
    out = [_OPPOSITE.get(w, w) if w in _OPPOSITE else words[i] for i, w in enumerate(lower)]
  else:
    where = [i for i, w in enumerate(lower) if w in _VOCAB[kind]]
    first = where[0] if where else None
    second = next((i for i in where if lower[i] != lower[first]), None) if where else None
    if second is None:
      return None
    out = list(words)
    out[first], out[second] = words[second], words[first]
  text = " ".join(out)
  return None if text.lower() == caption.lower() else text


def twins(captions, kinds) -> list[list[str | None]]:
  """[N captions][len(kinds)] twins (None where a caption has none of that kind)."""
  return [[twin(str(c), k) for k in kinds] for c in captions]
