"""SimCLR and the CLIP-style dual encoder through the real loop, sample and eval (smoke sizes)."""
import json

import jax
import numpy as np
import pytest
from PIL import Image

from helpers import config, params_of
from jaxgen.app import restore_run, train
from jaxgen.cli import main
from jaxgen.errors import TokenError
from jaxgen.pipelines import clip as clip_pipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def simclr_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("simclr")
  train(config("simclr"), wd, progress=False)
  return wd


def test_simclr_views_and_probes(simclr_run, capsys, tmp_path):
  main(["sample", "--workdir", str(simclr_run), "--num", "5", "--out",
        str(tmp_path / "views.png")])
  assert capsys.readouterr().out.split() == [str(tmp_path / "views.png")]
  with Image.open(tmp_path / "views.png") as im:
    assert im.size[0] > im.size[1]  # 5 columns, 3 rows (image, view 1, view 2)
  main(["eval", "--workdir", str(simclr_run), "--limit", "300", "--baselines"])
  m = json.loads(capsys.readouterr().out)
  for probes in (m, m["raw_pixels"], m["random_encoder"]):
    assert 0.0 <= probes["linear_probe"] <= 1.0 and 0.0 <= probes["knn"] <= 1.0
  # Raw pixels of Fashion-MNIST are far above chance for a linear probe: a sanity anchor.
  assert m["raw_pixels"]["linear_probe"] > 0.6


def test_clip_trains_evaluates_and_embeds(tmp_path, capsys):
  wd = tmp_path / "clip"
  train(config("clip"), wd, progress=False)
  main(["eval", "--workdir", str(wd), "--limit", "200"])
  m = json.loads(capsys.readouterr().out)
  assert {"zero_shot_shape", "zero_shot_colour", "i2t_recall@1", "t2i_recall@5"} <= set(m)
  assert m["zero_shot_shape_chance"] == 0.25
  run = restore_run(wd)
  model, params = run.task.model, run.state.ema_params
  emb = clip_pipe.embed_texts(model, params, ["a small red circle", ""])  # "" is allowed
  assert emb.shape == (2, 8)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  with pytest.raises(TokenError, match="context length is 16"):
    clip_pipe.embed_texts(model, params, ["a small red circle " * 6])
  tok = model.tokenize(["a large blue square"])
  states = clip_pipe.text_states(model, params, tok["input_ids"], tok["attention_mask"])
  assert states.shape == (1, 16, 8)  # per-token states for conditioning


def test_siglip_loss_trains(tmp_path):
  state = train(config("clip", arg="smoke,siglip"), tmp_path / "siglip", progress=False)
  assert "bias" in state.params["params"]


def test_lit_keeps_the_pretrained_image_tower_fixed(simclr_run, tmp_path):
  c = config("clip", arg=f"smoke,lit={simclr_run}")
  c.model.encoder.update(config("simclr").model.encoder.to_dict())
  state = train(c, tmp_path / "lit", progress=False)
  simclr = restore_run(simclr_run).state
  locked = params_of(state.params["params"]["image_encoder"])
  source = params_of(simclr.ema_params["params"]["encoder"])
  for a, b in zip(jax.tree.leaves(locked), jax.tree.leaves(source)):
    np.testing.assert_array_equal(a, b)
  assert int(state.step) == 4
