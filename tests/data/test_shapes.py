import re

import numpy as np
import pytest

from helpers import config
from jaxgen.data import load_source, shapes


def test_scenes_are_deterministic_and_captions_follow_the_grammar():
  a = shapes.make_scenes(40, seed=3, size=32)
  b = shapes.make_scenes(40, seed=3, size=32)
  np.testing.assert_array_equal(a[0], b[0])
  assert list(a[1]) == list(b[1])
  obj = rf"a ({'|'.join(shapes.SIZE_NAMES)}) ({'|'.join(shapes.COLOUR_NAMES)}) " \
        rf"({'|'.join(shapes.SHAPES)})"
  pattern = re.compile(rf"^{obj}( ({'|'.join(shapes.RELATIONS)}) {obj})?$")
  for caption, shape, colour in zip(a[1], a[2]["shape"], a[2]["colour"]):
    assert pattern.match(caption), caption
    assert caption.startswith(f"a {'small' if 'small' in caption.split()[1] else 'large'} "
                              f"{colour} {shape}")


@pytest.mark.parametrize("size", [8, 32, 48])
def test_drawing_inside_the_bounding_box_equals_drawing_the_whole_canvas(size, monkeypatch):
  """Each shape is tested only on the sub-pixels near its centre; testing every sub-pixel of the
  canvas (the box made the whole canvas) must give the same bytes."""
  fast = shapes.make_scenes(200, seed=5, size=size)[0]
  monkeypatch.setattr(shapes, "_box", lambda coords, centre, r: slice(None))
  whole = shapes.make_scenes(200, seed=5, size=size)[0]
  np.testing.assert_array_equal(fast, whole)


def test_the_picture_shows_what_the_caption_says():
  images, captions, attrs = shapes.make_scenes(300, seed=5, size=32)
  checked = 0
  for image, rel, c1, c2 in zip(images, attrs["relation"], attrs["colour"], attrs["colour2"]):
    if not rel or c1 == c2:
      continue
    centres = []
    for colour in (c1, c2):
      rgb = np.asarray(shapes.COLOURS[colour], np.float32)
      near = np.linalg.norm(image.astype(np.float32) - rgb, axis=-1) < 30
      ys, xs = np.nonzero(near)
      assert len(xs) > 5, (colour, rel)
      centres.append((xs.mean(), ys.mean()))
    (x1, y1), (x2, y2) = centres
    holds = {"left of": x1 < x2, "right of": x1 > x2, "above": y1 < y2, "below": y1 > y2}[rel]
    assert holds, (rel, centres)
    checked += 1
  assert checked > 100
  # sizes are visible: large shapes cover more pixels than small ones of the same kind
  area = (images.max(-1) > 60).sum((1, 2))
  one = attrs["relation"] == ""
  small = area[one & (attrs["size"] == "small")].mean()
  large = area[one & (attrs["size"] == "large")].mean()
  assert large > 2 * small


def test_shapes_as_the_embedded_source():
  c = config("vae", "data.name=shapes", "data.channels=3", "data.image_size=32",
             "model.ch_mult=1,2")
  src = load_source(c.data, "test")
  batch = src.get(np.arange(8))
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["caption"].shape == (8,) and src.class_names == shapes.SHAPES
  assert [shapes.SHAPES[i] for i in batch["label"]] == list(batch["shape"])


def test_parse_caption_reads_back_every_scene():
  _, captions, attrs = shapes.make_scenes(300, 5)
  for i, caption in enumerate(captions):
    assert shapes.parse_caption(caption) == {k: str(attrs[k][i]) for k in shapes.ATTRIBUTES}
  assert shapes.parse_caption("A Large blue SQUARE above something") == dict(
      shape="square", colour="blue", size="large", relation="above", shape2="", colour2="",
      size2="")
  assert shapes.parse_caption("") == dict.fromkeys(shapes.ATTRIBUTES, "")


def test_either_telling_of_a_two_object_scene_reads_the_same():
  told = "a small red circle right of a large blue square"
  assert shapes.equivalent_captions(told) == [told, "a large blue square left of a small red "
                                                    "circle"]
  a, b = (shapes.canonical(shapes.parse_caption(c)) for c in shapes.equivalent_captions(told))
  assert a == b and a["relation"] == "left of" and a["shape"] == "square"
  assert shapes.equivalent_captions("a small red circle") == ["a small red circle"]
  _, captions, _ = shapes.make_scenes(100, 3)
  for c in captions:  # telling it from the other object and back gives the caption again
    other = shapes.equivalent_captions(c)[-1]
    assert shapes.equivalent_captions(other)[-1] == c


def test_held_out_combinations_leave_the_training_split_only():
  """data.holdout_combinations: no training image or caption holds a red circle or a blue
  square; the test split keeps them (their scenes are the zero-shot composition test)."""
  from jaxgen.data import load_all
  from jaxgen.data.shapes import has_combination
  from jaxgen.errors import ConfigError
  c = config("clip", "data.holdout_combinations=red circle,blue square")
  train = load_all(load_source(c.data, "train"))
  test = load_all(load_source(c.data, "test"))
  full = load_all(load_source(config("clip").data, "train"))
  combos = ("red circle", "blue square")
  assert not has_combination(train, combos).any()
  assert not any("red circle" in t or "blue square" in t for t in train["caption"])
  hits = has_combination(full, combos)
  assert 0 < hits.sum() and len(train["caption"]) == len(full["caption"]) - hits.sum()
  # every other scene is kept, in order
  assert list(train["caption"]) == list(full["caption"][~hits])
  assert has_combination(test, combos).sum() > 50
  # a caption names each object's colour and shape: the mask agrees with the text
  text_hits = np.array([any(f"{c} {s}" in t for c, s in (("red", "circle"), ("blue", "square")))
                        for t in full["caption"]])
  np.testing.assert_array_equal(hits, text_hits)
  with pytest.raises(ConfigError, match="colour shape"):
    config("clip", "data.holdout_combinations=purple circle")
  with pytest.raises(ConfigError, match="embedded shapes"):
    config("ddpm", "data.holdout_combinations=red circle")


def test_text_to_image_evaluation_prompts_split_held_out_and_seen():
  from jaxgen.commands import prompt_data
  from jaxgen.data.shapes import has_combination
  c = config("clip", "data.holdout_combinations=red circle,blue square")
  data, prompts = prompt_data(c.data, 10)
  assert prompts == [str(t) for t in data["caption"]]
  assert has_combination(data, c.data.holdout_combinations).sum() == 5
  plain, first = prompt_data(config("clip").data, 10)   # without: the first ten
  assert first == [str(t) for t in load_source(config("clip").data, "test").get(
      np.arange(10))["caption"]]
