"""The pixel judge against the generator's own truth: real scenes, their mirror images, twins of
their captions, blank and recoloured pictures."""
import numpy as np
import pytest

from jaxgen.data import shapes
from jaxgen.eval.pixel_judge import SCORES, find_objects, judge, pixel_judge
from jaxgen.text.negatives import twin


@pytest.fixture(scope="module")
def scenes():
  return shapes.make_scenes(300, seed=2024)


@pytest.mark.parametrize("size", [32, 64])
def test_real_scenes_score_everything(size):
  images, captions, _ = shapes.make_scenes(150, seed=size, size=size)
  out = pixel_judge(images, captions)
  for k in SCORES:
    assert out[k] == 1.0, (k, out)
  assert 0 < out["num_two_object"] < out["num"] == 150


def test_reads_each_objects_attributes(scenes):
  images, _, attrs = scenes
  for i in range(40):
    found = find_objects(images[i])
    suffixes = ("", "2") if attrs["relation"][i] else ("",)
    for s in suffixes:
      regions = found[attrs["colour" + s][i]]
      assert any(r["shape"] == attrs["shape" + s][i] and r["size"] == attrs["size" + s][i]
                 for r in regions)
    named = {attrs["colour" + s][i] for s in suffixes}
    assert all(not found[c] for c in shapes.COLOUR_NAMES if c not in named)


def test_mirror_images_flip_left_and_right_only(scenes):
  images, captions, attrs = scenes
  two = attrs["relation"] != ""
  horizontal = np.isin(attrs["relation"], ["left of", "right of"])
  mirrored = images[:, :, ::-1]
  rows = [judge(x, c) for x, c in zip(mirrored, captions)]
  relation = np.array([r["relation"] for r in rows], dtype=object)
  assert not any(relation[horizontal])
  assert all(relation[two & ~horizontal])
  assert all(r["colour"] and r["shape"] for r in rows)  # shapes are left-right symmetric


def test_twins_of_captions_are_judged_wrong_where_they_differ(scenes):
  images, captions, _ = scenes
  pairs = [(x, t) for x, c in zip(images, captions) if (t := twin(str(c), "relation"))]
  out = pixel_judge(np.stack([p[0] for p in pairs]), [p[1] for p in pairs])
  assert out["relation"] == 0.0 and out["binding"] == 1.0 and out["both_present"] == 1.0
  # attributes bound the other way: an attribute is now wrong, or (objects of one colour, read
  # in the order that fits) the relation is
  for kind in ("colour", "shape", "size"):
    rows = [judge(x, t) for x, c in zip(images, captions) if (t := twin(str(c), kind))]
    assert len(rows) > 30
    assert not any(r["binding"] and r["relation"] for r in rows), kind


def test_blank_recoloured_and_float_pictures(scenes):
  images, captions, attrs = scenes
  blank = pixel_judge(np.zeros_like(images[:20]), captions[:20])
  assert all(blank[k] == 0.0 for k in SCORES)
  # one object: repaint it in another colour
  i = int(np.flatnonzero(attrs["relation"] == "")[0])
  old = np.array(shapes.COLOURS[attrs["colour"][i]], np.float32)
  new_name = next(c for c in shapes.COLOUR_NAMES if c != attrs["colour"][i])
  x = images[i].astype(np.float32)
  cover = (x @ old / (old @ old))[..., None]
  repainted = cover * np.array(shapes.COLOURS[new_name], np.float32)
  assert judge(repainted, captions[i])["colour"] is False
  assert judge(repainted, str(captions[i]).replace(attrs["colour"][i], new_name))["shape"]
  # [0, 1] floats read as [0, 255] pictures
  np.testing.assert_equal(pixel_judge(images[:20] / 255.0, captions[:20])["binding"], 1.0)


def test_bad_input_is_named(scenes):
  images, captions, _ = scenes
  with pytest.raises(ValueError, match="RGB"):
    pixel_judge(images[..., 0], captions)
  with pytest.raises(ValueError, match="cannot read"):
    judge(images[0], "a photo of a cat")
  with pytest.raises(ValueError, match="captions"):
    pixel_judge(images[:3], captions[:2])
