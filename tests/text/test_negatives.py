"""Hard-negative twins read back by the shapes grammar and drawn by the generator."""
import pytest

from jaxgen.data import shapes
from jaxgen.text.negatives import KINDS, twin, twins

INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def test_twins_state_what_their_kind_says():
  _, captions, attrs = shapes.make_scenes(400, seed=5)
  seen = dict.fromkeys(KINDS, 0)
  for c in captions:
    a = shapes.parse_caption(str(c))
    for kind in KINDS:
      t = twin(str(c), kind)
      if not a["relation"]:
        assert t is None
        continue
      if kind == "relation":
        want = dict(a, relation=INVERSE[a["relation"]])
      else:
        if a[kind] == a[kind + "2"]:
          assert t is None
          continue
        want = dict(a, **{kind: a[kind + "2"], kind + "2": a[kind]})
      assert shapes.parse_caption(t) == want
      seen[kind] += 1
  assert all(n > 50 for n in seen.values())


def test_free_form_captions_and_errors():
  assert twin("A dog to the left of a red car", "relation") == "A dog to the right of a red car"
  assert twin("a white cat on a black sofa", "colour") == "a black cat on a white sofa"
  assert twin("a red ball", "colour") is None
  assert twins(["a small red circle"], ("size", "relation")) == [[None, None]]
  with pytest.raises(ValueError, match="unknown hard-negative kind"):
    twin("a red ball", "texture")
