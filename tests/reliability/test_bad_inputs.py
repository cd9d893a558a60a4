"""Bad input a user may give: each is a clear jaxgen error naming the input and what to do, or a
warning where the run can go on; never a traceback, never a silently wrong result."""
import logging

import numpy as np
import pytest
from PIL import Image

from helpers import config
from jaxgen import app
from jaxgen.cli import main
from jaxgen.data.sources import load_folder, load_npz
from jaxgen.errors import DataError, TokenError


def _cli(capsys, *argv):
  with pytest.raises(SystemExit) as e:
    main(list(argv))
  out = capsys.readouterr()
  return e.value.code, out.out, out.err


@pytest.mark.parametrize("body, message", [
    ("def get_config(arg=None)\n  return 1\n", r"is not valid Python: .* \(line 1\)"),
    ("import no_such_module_here\n", "ModuleNotFoundError: No module named 'no_such_module_here'"),
    ("def get_config(arg=None):\n  return {'task': 'vae'}\n",
     "get_config must return the ConfigDict of jaxgen.app.base_config"),
    ("def get_config(arg=None):\n  return 1 / 0\n",
     r"ZeroDivisionError: division by zero \(line 2\)"),
])
def test_broken_config_files(tmp_path, capsys, body, message):
  path = tmp_path / "cfg.py"
  path.write_text(body)
  code, _, err = _cli(capsys, "train", "--config", str(path), "--workdir", str(tmp_path / "w"))
  assert code == 2 and "Traceback" not in err
  assert __import__("re").search(message, err), err
  assert not (tmp_path / "w").exists()


def test_a_folder_with_one_image(tmp_path):
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "one.png")
  with pytest.raises(DataError, match="1 image.*none is left for the 'train' split"):
    load_folder(str(tmp_path), "train", 8, 1, 0.1)


@pytest.mark.parametrize("labels, message", [
    (np.arange(5), "'labels' has 5 rows but 'images' has 10"),
    (np.array(["cat"] * 10), "labels must be integers .*map class names to indices first"),
])
def test_npz_labels_of_the_wrong_length_or_kind(tmp_path, labels, message):
  path = tmp_path / "d.npz"
  np.savez(path, images=np.zeros((10, 8, 8), np.uint8), labels=labels)
  with pytest.raises(DataError, match=message):
    load_npz(str(path), "train", 8, 1, 0.2)


def test_float_images_with_nan_are_refused(tmp_path):
  images = np.full((10, 8, 8), 0.5, np.float32)
  images[3, 2, 2] = np.nan
  path = tmp_path / "d.npz"
  np.savez(path, images=images)
  with pytest.raises(DataError, match="1 pixel values are NaN or infinite"):
    load_npz(str(path), "train", 8, 1, 0.2)


def test_16_bit_png_is_scaled_not_saturated(tmp_path):
  grey = np.array([[0, 16384, 32768, 65535]] * 4, np.uint16)
  for i in range(4):
    Image.fromarray(grey).save(tmp_path / f"{i}.png")
  images = load_folder(str(tmp_path), "train", 4, 1, 0.25).images
  np.testing.assert_array_equal(images[0, 0, :, 0], [0, 64, 128, 255])


@pytest.mark.parametrize("option", ["--num", "--pairs", "--steps"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_counts_below_one_are_errors_not_defaults(tmp_path, capsys, option, value):
  (tmp_path / "config.json").write_text(app.base_config("vae").to_json())
  code, _, err = _cli(capsys, "sample", "--workdir", str(tmp_path), option, value)
  assert code == 2 and f"argument {option}: must be at least 1, got {value}" in err


def test_eval_limit_zero(tmp_path, capsys):
  (tmp_path / "config.json").write_text(app.base_config("vae").to_json())
  code, _, err = _cli(capsys, "eval", "--workdir", str(tmp_path), "--limit", "0")
  assert code == 2 and "argument --limit: must be at least 1, got 0" in err


def test_unknown_prompt_words_are_listed_once(caplog):
  from jaxgen.text.words import WordTokenizer
  tok = WordTokenizer.build(["a red circle", "a blue square"])
  with caplog.at_level(logging.WARNING):
    tok(["a purple circle", "a purple zebra"])
    tok(["a purple zebra"])
  warnings = [r.getMessage() for r in caplog.records if "not in the vocabulary" in r.getMessage()]
  assert warnings == ["2 word(s) are not in the vocabulary of 5 words and become <unk>: "
                      "'purple', 'zebra'"]


def test_over_long_prompt_names_the_cli_flag():
  from jaxgen.text.words import WordTokenizer
  tok = WordTokenizer.build(["a red circle"], context_length=4)
  with pytest.raises(TokenError, match="--truncate \\(jaxgen generate\\)"):
    tok(["a red circle a red circle"])


def test_a_corrupt_held_out_image_stops_the_run_before_any_step(tmp_path):
  for split in ("train", "test"):
    for c in ("a", "b"):
      (tmp_path / "data" / split / c).mkdir(parents=True)
      for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(
            tmp_path / "data" / split / c / f"{i}.png")
  bad = tmp_path / "data" / "test" / "b" / "2.png"
  bad.write_bytes(b"not a png")
  c = config("vae", "data.source=folder", f"data.path={tmp_path / 'data'}", "data.batch_size=4",
             "data.image_size=8", "model.ch_mult=1,2", "train.num_steps=4")
  with pytest.raises(DataError, match=f"Could not read image {bad}"):
    app.train(c, tmp_path / "run", progress=False)
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_generate_help_offers_truncate(capsys):
  code, out, _ = _cli(capsys, "generate", "--help")
  assert code == 0 and "--truncate" in out and "--pairs" not in out
