import time

import numpy as np
import pytest
from PIL import Image

from helpers import config
from jaxgen.data import EMBEDDED, load_source
from jaxgen.data.sources import TfdsSource
from jaxgen.errors import DataError


def test_embedded_set_is_real_balanced_and_credited():
  c = config("vae")
  train, test = load_source(c.data, "train"), load_source(c.data, "test")
  assert len(train) == 6000 and len(test) == 1000
  batch = train.get(np.arange(len(train)))
  assert batch["image"].dtype == np.uint8 and batch["image"].shape == (6000, 28, 28, 1)
  assert np.bincount(batch["label"]).tolist() == [600] * 10
  assert train.class_names[7] == "sneaker"
  # Real photographs of clothes: dark background, a bright object in the middle.
  mean = batch["image"].mean(0)[..., 0]
  assert mean[14, 14] > 3 * mean[0, 0]
  assert "MIT" in EMBEDDED["fashion_mnist_small"][2]


def test_resize_on_load():
  c = config("vae", "data.image_size=16")
  assert load_source(c.data, "test").get(np.arange(3))["image"].shape == (3, 16, 16, 1)


def _npz(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


def test_npz_source_with_holdout_split(tmp_path):
  images = np.random.default_rng(0).integers(0, 255, (50, 28, 28), dtype=np.uint8)
  labels = np.arange(50) % 5
  path = _npz(tmp_path / "d.npz", images=images, labels=labels)
  c = config("vae", "data.source=npz", f"data.path={path}", "data.holdout_fraction=0.2")
  train, test = load_source(c.data, "train"), load_source(c.data, "test")
  assert (len(train), len(test)) == (40, 10)
  a = train.get(np.arange(40))["image"].reshape(40, -1)
  b = test.get(np.arange(10))["image"].reshape(10, -1)
  assert not (set(map(bytes, a)) & set(map(bytes, b)))  # disjoint
  # float images in [0, 1] are accepted and quantised
  path = _npz(tmp_path / "f.npz", images=images / 255.0)
  c = config("vae", "data.source=npz", f"data.path={path}")
  assert load_source(c.data, "train").get(np.arange(2))["image"].dtype == np.uint8


@pytest.mark.parametrize("arrays, message", [
    (dict(images=np.zeros((4, 28, 28, 3), np.uint8)), "3 channel(s) but data.channels=1"),
    (dict(images=np.full((4, 28, 28), 2.0)), "float images must lie in [0, 1]"),
    (dict(pictures=np.zeros((4, 28, 28), np.uint8)), "needs an 'images' array"),
    (dict(images=np.zeros((4, 28), np.uint8)), "expected images [N, H, W]"),
])
def test_npz_bad_input(tmp_path, arrays, message):
  path = _npz(tmp_path / "bad.npz", **arrays)
  c = config("vae", "data.source=npz", f"data.path={path}")
  with pytest.raises(DataError) as e:
    load_source(c.data, "train")
  assert message in str(e.value)


def test_npz_class_names_name_the_labels(tmp_path):
  images = np.zeros((6, 28, 28), np.uint8)
  path = _npz(tmp_path / "n.npz", train_images=images, train_labels=np.arange(6) % 3,
              class_names=np.array(["boot", "bag", "coat"]))
  c = config("vae", "data.source=npz", f"data.path={path}")
  assert load_source(c.data, "train").class_names == ("boot", "bag", "coat")
  for bad, message in ((dict(class_names=np.array(["boot", "bag"])), "a name for every label"),
                       (dict(class_names=np.arange(3)), "1-D array of strings")):
    path = _npz(tmp_path / "bad.npz", train_images=images, train_labels=np.arange(6) % 3, **bad)
    with pytest.raises(DataError, match=message):
      load_source(config("vae", "data.source=npz", f"data.path={path}").data, "train")


def test_folder_source_with_classes(tmp_path):
  rng = np.random.default_rng(0)
  for cls in ("cats", "dogs"):
    (tmp_path / cls).mkdir()
    for i in range(5):
      Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(
          tmp_path / cls / f"{i}.png")
  c = config("vae", "data.source=folder", f"data.path={tmp_path}", "data.channels=3",
             "data.holdout_fraction=0.2")
  train = load_source(c.data, "train")
  batch = train.get(np.arange(len(train)))
  assert batch["image"].shape == (8, 28, 28, 3)
  assert train.class_names == ("cats", "dogs") and sorted(set(batch["label"])) == [0, 1]
  with pytest.raises(DataError, match="No images"):
    config_empty = config("vae", "data.source=folder", f"data.path={tmp_path / 'cats' / 'x'}")
    (tmp_path / "cats" / "x").mkdir()
    load_source(config_empty.data, "train")


@pytest.mark.parametrize("name, channels, has_label", [
    ("mnist", 1, True), ("cifar10", 3, True), ("celeb_a", 3, False)])
def test_tfds_sources_through_mock_data(name, channels, has_label):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=6):
    src = TfdsSource(name, "train", size=16, channels=channels)
    batch = src.get(np.array([0, 3, 5]))
  assert batch["image"].shape == (3, 16, 16, channels) and batch["image"].dtype == np.uint8
  assert ("label" in batch) == has_label


def test_tfds_not_prepared_is_a_fast_clear_error(tmp_path):
  t = time.time()
  with pytest.raises(DataError) as e:
    TfdsSource("mnist", "train", size=28, channels=1, data_dir=str(tmp_path))
  assert time.time() - t < 30
  assert "not prepared" in str(e.value) and "download_and_prepare" in str(e.value)
  assert str(tmp_path) in str(e.value)


def test_captions_from_npz_and_from_caption_files_beside_images(tmp_path):
  images = np.random.default_rng(0).integers(0, 255, (6, 28, 28), dtype=np.uint8)
  captions = np.array([f"a picture number {i}" for i in range(6)])
  path = _npz(tmp_path / "pairs.npz", train_images=images, train_captions=captions)
  c = config("vae", "data.source=npz", f"data.path={path}")
  assert list(load_source(c.data, "train").get(np.arange(2))["caption"]) == list(captions[:2])
  folder = tmp_path / "folder"
  folder.mkdir()
  for i in range(4):
    Image.fromarray(images[i]).save(folder / f"{i}.png")
    (folder / f"{i}.txt").write_text(f"  shoe\n number {i} ")
  c = config("vae", "data.source=folder", f"data.path={folder}", "data.holdout_fraction=0.25")
  assert load_source(c.data, "test").get(np.arange(1))["caption"][0].startswith("shoe number")
  (folder / "0.txt").unlink()
  with pytest.raises(DataError, match="Some images under .* have a caption file"):
    load_source(c.data, "train")


def test_tfds_captions_from_a_prepared_array_record_data_set(tmp_path):
  """A captioned TFDS builder prepared offline in the array_record format and read back
  through jaxgen's TFDS source without TensorFlow."""
  import io

  import tensorflow_datasets as tfds

  def png(i):
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()

  class JaxgenTinyCaptions(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(8, 8, 3)),
          "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
          "label": tfds.features.ClassLabel(names=["dark", "light"])}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(0, 6), "test": self._generate_examples(6, 8)}

    def _generate_examples(self, lo, hi):
      for i in range(lo, hi):
        yield i, {"image": png(i), "captions": {"text": [f"square number {i}", "other"]},
                  "label": int(i >= 4)}

  builder = JaxgenTinyCaptions(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  src = TfdsSource("jaxgen_tiny_captions", "train", size=8, channels=3, data_dir=str(tmp_path),
                   caption_key="captions/text")
  batch = src.get(np.arange(len(src)))
  assert sorted(batch["caption"]) == [f"square number {i}" for i in range(6)]
  assert src.class_names == ("dark", "light")
  with pytest.raises(DataError, match="no caption feature 'captions/txt'"):
    TfdsSource("jaxgen_tiny_captions", "train", size=8, channels=3, data_dir=str(tmp_path),
               caption_key="captions/txt")
