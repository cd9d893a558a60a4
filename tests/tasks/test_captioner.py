"""The captioner through the real loop (smoke sizes): train, caption from the command line,
eval with baselines and retrieval; a locked encoder from a clip run; the loss against a
reference."""
import json

import jax
import numpy as np
import optax
import pytest
from PIL import Image

from helpers import check_zeros_for_pretrained, config, params_of
from jaxgen.app import build_task, train
from jaxgen.cli import main
from jaxgen.data import shapes
from jaxgen.errors import ConfigError
from jaxgen.tasks.captioner import caption_loss

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("clip")
  train(config("clip"), wd, progress=False)
  return wd


def test_caption_loss_matches_optax():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 6, 9)).astype(np.float32)
  ids = rng.integers(0, 9, (3, 6))
  mask = np.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
  for smoothing in (0.0, 0.1):
    labels = optax.smooth_labels(jax.nn.one_hot(ids[:, 1:], 9), smoothing) if smoothing else \
        jax.nn.one_hot(ids[:, 1:], 9)
    # optax spreads the smoothing mass over all classes, as the loss does
    per_token = optax.softmax_cross_entropy(logits[:, :-1], labels)
    expected = float((per_token * mask[:, 1:]).sum() / mask[:, 1:].sum())
    loss, acc = caption_loss(logits, ids, mask, smoothing)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  hits = (logits[:, :-1].argmax(-1) == ids[:, 1:]) * mask[:, 1:]
  np.testing.assert_allclose(float(acc), hits.sum() / mask[:, 1:].sum(), rtol=1e-6)


def test_captioner_trains_captions_and_evaluates(clip_run, tmp_path, capsys):
  wd = tmp_path / "cap"
  train(config("captioner", arg="smoke,coca"), wd, progress=False)
  images, captions, _ = shapes.make_scenes(2, 7, 48)
  paths = []
  for i, im in enumerate(images):
    paths += ["--image", str(tmp_path / f"p{i}.png")]
    Image.fromarray(im).save(paths[-1])
  main(["caption", "--workdir", str(wd), *paths, "--beam", "2"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert [ln.partition(":")[0] for ln in lines] == paths[1::2]
  main(["caption", "--workdir", str(wd), *paths[:2], "--temperature", "1.0", "--top-k", "3",
        "--samples", "2"])
  assert len(capsys.readouterr().out.strip().splitlines()) == 2
  main(["caption", "--retrieval", str(clip_run), *paths])
  for line in capsys.readouterr().out.strip().splitlines():  # a caption of the bank, verbatim
    assert shapes.parse_caption(line.partition(": ")[2])["shape"] in shapes.SHAPES
  with pytest.raises(SystemExit):
    main(["caption", "--workdir", str(wd), *paths, "--beam", "2", "--temperature", "1"])
  assert "exclude each other" in capsys.readouterr().err

  main(["eval", "--workdir", str(wd), "--limit", "24", "--baselines", "--retrieval",
        str(clip_run)])
  m = json.loads(capsys.readouterr().out)
  for part in (m, m["most_frequent_caption"], m["random_encoder"], m["retrieval"]):
    assert 0 <= part["bleu4"] <= 100 and part["cider_d"] >= 0
    assert set(part["attributes"]) == {"shape", "colour", "size", "relation", "shape2",
                                       "colour2", "size2", "objects"}
  assert m["num_images"] == 24 and m["retrieval"]["bank_size"] > 1000
  main(["sample", "--workdir", str(wd), "--num", "3", "--beam", "2"])
  assert capsys.readouterr().out.count("image ") == 3


def test_locked_encoder_from_a_clip_run_stays_fixed(clip_run, tmp_path):
  state = train(config("captioner", arg=f"smoke,init={clip_run}"), tmp_path / "lit",
                progress=False)
  from jaxgen.weights import load_weights
  clip = load_weights(clip_run).params["params"]["image_encoder"]
  mine = params_of(state.params)["params"]["image_encoder"]
  jax.tree.map(np.testing.assert_array_equal, mine, params_of(clip))
  check_zeros_for_pretrained(build_task(config("captioner", arg=f"smoke,init={clip_run}")))
  with pytest.raises(ConfigError, match="model.encoder differs"):
    train(config("captioner", f"model.image_init={clip_run}", "model.encoder.width=8"),
          tmp_path / "bad", progress=False)


@pytest.mark.parametrize("override,message", [
    ("model.contrastive_dim=8", "needs model.text.unimodal_layers > 0"),
    ("model.text.unimodal_layers=2", r"must lie in \[0, model.text.layers=2\)"),
    ("model.label_smoothing=1.0", "label_smoothing must lie"),
])
def test_config_checks(override, message):
  with pytest.raises(ConfigError, match=message):
    config("captioner", override)


def test_captioner_with_clips_bpe_tokenizer(tmp_path):
  """The byte-level BPE tokenizer (a tiny merges list that spells the shapes' words) trains,
  is stored in the run and decodes captions back to text."""
  from jaxgen.pipelines import captioning as cp
  from jaxgen.text.bpe import clip_vocab
  words = {w for c in shapes.make_scenes(50, 0)[1] for w in c.split()}
  merges = []
  for w in sorted(words):
    pieces = list(w[:-1]) + [w[-1] + "</w>"]
    while len(pieces) > 1:
      pair = (pieces[0], pieces[1])
      if pair not in merges:
        merges.append(pair)
      pieces = [pieces[0] + pieces[1]] + pieces[2:]
  folder = tmp_path / "bpe"
  folder.mkdir()
  (folder / "vocab.json").write_text(json.dumps(clip_vocab(merges)))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  wd = tmp_path / "cap"
  train(config("captioner", "model.text.tokenizer=bpe", f"model.text.tokenizer_path={folder}",
               "model.text.context_length=32"), wd, progress=False)
  model, params, state = cp.load_captioner(str(wd))
  caption = "a small red circle left of a large cyan diamond"
  assert model.tokenizer(caption)["lengths"][0] < len(caption)  # the merges apply
  texts = cp.caption(model, params, state, shapes.make_scenes(2, 1)[0], beam=2)
  assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
  ids = model.tokenizer(["a large blue square"])["input_ids"]
  assert model.ids_to_text(ids) == ["a large blue square"]
