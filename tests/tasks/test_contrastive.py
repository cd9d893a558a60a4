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
  assert {"zero_shot_shape", "zero_shot_colour", "i2t_recall@1", "t2i_recall@5",
          "twin_relation_preference", "twin_colour_text_cosine"} <= set(m)
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


def test_siglip_loss_trains_with_hard_negatives_and_a_learned_bpe(tmp_path):
  """SigLIP with NegCLIP twins, and a byte-level BPE learned from the captions (no vocabulary
  given): saved in the workdir, the restored run tokenizes as the trained one did."""
  wd = tmp_path / "siglip"
  state = train(config("clip", "model.text.tokenizer=bpe", "model.text.context_length=24",
                       arg="smoke,siglip,negatives=relation+colour"), wd, progress=False)
  assert "bias" in state.params["params"]
  assert (wd / "tokenizer" / "merges.txt").exists()
  run = restore_run(wd)
  tok = run.task.tokenizer
  ids = tok(["a large red circle left of a small blue square", "a purple hexagon"])
  assert tok.unk_id not in ids["input_ids"][1][1:ids["lengths"][1] - 1]  # (unk = end token)
  assert tok.decode(ids["input_ids"][0][:ids["lengths"][0]]) == (
      "a large red circle left of a small blue square")


def test_negclip_batches_carry_the_twins_and_the_loss_uses_them():
  """The task's loss with model.hard_negatives equals clip_loss over the embeddings of the
  captions and of the twins written by jaxgen.text.negatives."""
  from jaxgen.app import build_task
  from jaxgen.contrastive.losses import clip_loss
  from jaxgen.data import shapes
  from jaxgen.text.negatives import twins
  task = build_task(config("clip", arg="smoke,negatives=relation+size"))
  images, captions, _ = shapes.make_scenes(8, seed=3)
  batch = task.preprocess({"image": images, "caption": captions})
  rows = twins(captions, ("relation", "size"))
  np.testing.assert_array_equal(batch["twin_valid"], [[t is not None for t in r] for r in rows])
  assert batch["twin_ids"].shape == (8, 2, 16)
  i, k = np.argwhere(batch["twin_valid"])[0]
  np.testing.assert_array_equal(batch["twin_ids"][i, k],
                                task.tokenizer([rows[i][k]])["input_ids"][0])
  arrays = {k: v for k, v in batch.items() if np.asarray(v).dtype.kind not in "USO"}
  # jitted: one program each instead of flax's eager ops (hundreds of small compiles)
  params, state = jax.jit(task.init)(jax.random.PRNGKey(0), arrays)
  loss, _ = jax.jit(task.loss_fn)(params, state, arrays, jax.random.PRNGKey(1))
  m = task.module
  v = {**params, **state}
  img = jax.jit(lambda v, x: m.apply(v, x, method=m.embed_image))(
      v, images.astype(np.float32) / 127.5 - 1)
  text = jax.jit(lambda v, ids, mask: m.apply(v, ids, mask, method=m.embed_text))
  txt = text(v, batch["input_ids"], batch["attention_mask"])
  neg = text(v, batch["twin_ids"].reshape(16, -1), batch["twin_mask"].reshape(16, -1))
  scale = params["params"]["logit_scale"]
  want, _ = clip_loss(img, txt, scale, neg, batch["twin_valid"].reshape(-1))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert float(loss) > float(clip_loss(img, txt, scale)[0])


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
