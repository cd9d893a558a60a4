"""Weights without the loop: a run's config, EMA parameters, model state and tokenizer load from
its workdir without building a task or reading a data set, also after the workdir moved."""
import jax
import numpy as np
import pytest

from helpers import config, params_of
from jaxgen import app, weights
from jaxgen.errors import CheckpointError, ConfigError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("clip") / "run"
  app.train(config("clip"), wd, progress=False)
  return wd


def _forbid(monkeypatch, *targets):
  def refuse(*args, **kwargs):
    raise AssertionError("load_weights must not build a task or read data")
  for module, name in targets:
    monkeypatch.setattr(module, name, refuse)


def test_weights_load_without_task_or_data_and_survive_a_move(clip_run, tmp_path, monkeypatch):
  from jaxgen.data import sources
  from jaxgen.pipelines import clip as clip_pipe
  full = app.restore_run(clip_run)
  assert (clip_run / "tokenizer" / "merges.txt").is_file()  # the learned BPE travels with the run
  moved = tmp_path / "elsewhere" / "clip"
  moved.parent.mkdir()
  clip_run.rename(moved)
  try:
    with monkeypatch.context() as m:
      _forbid(m, (sources, "load_source"), (app, "task_class"), (app, "build_task"))
      w = weights.load_weights(moved)
      assert w.task == "clip" and w.step == full.step and not w.inference_only
      for a, b in zip(jax.tree.leaves(params_of(w.params)),
                      jax.tree.leaves(params_of(full.state.ema_params))):
        np.testing.assert_array_equal(a, b)
      captions = ["a small red circle", "a large blue square left of a small green circle"]
      np.testing.assert_array_equal(w.tokenizer(captions)["input_ids"],
                                    full.task.tokenizer(captions)["input_ids"])
      model, params, state = clip_pipe.from_weights(w)
      images = np.zeros((2, *model.image_shape), np.uint8)
      np.testing.assert_allclose(clip_pipe.embed_images(model, params, state, images),
                                 clip_pipe.embed_images(full.task.model, full.params,
                                                        full.model_state, images), atol=1e-6)
    # The moved run restores whole (task, TrainState) too, with the same tokenizer ids.
    again = app.restore_run(moved)
    np.testing.assert_array_equal(again.task.tokenizer(captions)["input_ids"],
                                  full.task.tokenizer(captions)["input_ids"])
  finally:
    moved.rename(clip_run)


def test_load_weights_names_the_wrong_task_and_missing_runs(clip_run, tmp_path):
  with pytest.raises(ConfigError, match="ldm.autoencoder: .* holds a clip run, not a vae run"):
    weights.load_weights(clip_run, expect_task="vae", what="ldm.autoencoder")
  with pytest.raises(CheckpointError, match="has no config.json"):
    weights.load_weights(tmp_path / "nothing")
