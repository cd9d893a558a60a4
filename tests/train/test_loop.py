"""The real train loop on the smoke config: outputs, resume, NaN, bad checkpoints."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import config, files_under, params_of
from jaxgen import runtime
from jaxgen.app import restore_run, train
from jaxgen.errors import CheckpointError, NonFiniteLossError
from jaxgen.tasks.vae import AutoencoderTask

pytestmark = pytest.mark.slow


def _assert_trees_equal(a, b):
  """Every array leaf (params, EMA, optimizer state, step, RNG) equal, bit for bit."""
  a = jax.tree_util.tree_flatten_with_path(params_of(a))[0]
  b = jax.tree_util.tree_flatten_with_path(params_of(b))[0]
  assert [jax.tree_util.keystr(p) for p, _ in a] == [jax.tree_util.keystr(p) for p, _ in b]
  for (path, x), (_, y) in zip(a, b):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_run_writes_outputs_and_resumes_bit_for_bit(tmp_path, monkeypatch):
  inits = []  # the train state's init, a program compiled to run once (runtime.run_once)
  run_once = runtime.run_once
  monkeypatch.setattr(runtime, "run_once", lambda *a, **k: inits.append(1) or run_once(*a, **k))
  c = config("vae", "train.num_steps=6", "train.ckpt_every=2", "train.sample_every=3",
             "train.keep_checkpoints=2")
  full = train(c, tmp_path / "full", progress=False)
  train(c, tmp_path / "resumed", progress=False, until_step=4)
  assert len(inits) == 2
  resumed = train(c, tmp_path / "resumed", progress=False)  # the same command, run again
  assert len(inits) == 2  # restored: no init
  assert int(resumed.step) == 6
  _assert_trees_equal(full, resumed)  # params, EMA, optimizer state, RNG: bit for bit

  wd = tmp_path / "full"
  rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [2, 4, 6]
  assert {"loss", "nll", "kl", "images_per_s", "lr", "grad_norm"} <= set(rows[0])
  assert list((wd / "tb").glob("events.out.tfevents.*"))
  names = sorted(p.name for p in (wd / "samples").glob("*.png"))
  assert names == ["prior_samples_step0000003.png", "prior_samples_step0000006.png",
                   "reconstructions_step0000003.png", "reconstructions_step0000006.png"]
  assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["4", "6"]  # keep 2
  assert json.loads((wd / "config.json").read_text())["model"]["latent_dim"] == 4
  run = restore_run(wd)
  assert run.step == 6
  _assert_trees_equal(run.state, full)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  c = config("vae", "train.num_steps=6", "train.ckpt_every=2", "train.log_every=1")
  wd = tmp_path / "run"
  train(c, wd, progress=False, until_step=2)
  before = files_under(wd / "checkpoints")
  original = AutoencoderTask.loss_fn

  def nan_loss(self, params, model_state, batch, key):
    loss, aux = original(self, params, model_state, batch, key)
    return loss * jnp.nan, aux

  monkeypatch.setattr(AutoencoderTask, "loss_fn", nan_loss)
  with pytest.raises(NonFiniteLossError) as e:
    train(c, wd, progress=False)
  assert "at step 3" in str(e.value) and "last good checkpoint (step 2)" in str(e.value)
  assert files_under(wd / "checkpoints") == before
  monkeypatch.setattr(AutoencoderTask, "loss_fn", original)
  run = restore_run(wd)
  assert run.step == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params_of(run.state.params)))


def _flip_a_bit(step_dir):
  victim = max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
  data = bytearray(victim.read_bytes())
  data[len(data) // 2] ^= 0x01
  victim.write_bytes(bytes(data))


def test_corrupt_checkpoint_is_a_clear_error_and_nothing_is_deleted(tmp_path):
  c = config("vae")
  wd = tmp_path / "run"
  train(c, wd, progress=False)
  _flip_a_bit(wd / "checkpoints" / "4")
  before = files_under(wd)
  for attempt in (lambda: train(c, wd, progress=False), lambda: restore_run(wd)):
    with pytest.raises(CheckpointError) as e:
      attempt()
    assert f"Checkpoint {wd / 'checkpoints' / '4'} is corrupt" in str(e.value)
    assert "does not match its checksum" in str(e.value)
    assert files_under(wd) == before


def test_checkpoint_of_another_model_config_is_refused(tmp_path):
  wd = tmp_path / "run"
  train(config("vae"), wd, progress=False)
  before = files_under(wd)
  other = config("vae", "model.latent_dim=5", "optim.lr=1e-4")
  with pytest.raises(CheckpointError) as e:
    train(other, wd, progress=False)
  assert "model.latent_dim: checkpoint has 4, config has 5" in str(e.value)
  assert "optim.lr" not in str(e.value)  # optimizer settings may change between runs
  assert files_under(wd) == before


def test_a_key_older_runs_lack_reads_as_its_default():
  from jaxgen.app import base_config
  from jaxgen.train.checkpoint import config_differences
  current = base_config("clip").to_dict()
  saved = json.loads(json.dumps(current))
  del saved["model"]["hard_negatives"]  # written before jaxgen had the key
  defaults = base_config("clip").to_dict()
  assert config_differences(saved, current, defaults) == []
  assert config_differences(saved, current) == [
      "model.hard_negatives: checkpoint has '<missing>', config has []"]
  current["model"]["hard_negatives"] = ("relation",)
  assert config_differences(saved, current, defaults) == [
      "model.hard_negatives: checkpoint has [], config has ['relation']"]


def test_tfds_data_through_the_real_loop(tmp_path):
  import tensorflow_datasets as tfds
  c = config("vae", "data.source=tfds", "data.name=mnist", "train.num_steps=2",
             "train.sample_every=0")
  with tfds.testing.mock_data(num_examples=16):
    state = train(c, tmp_path / "run", progress=False)
  assert int(state.step) == 2


def test_the_loop_compiles_its_train_step_once(tmp_path, monkeypatch):
  """Logging, pictures and checkpoints between steps must not retrace the step."""
  from jaxgen.train import loop
  made = []
  real = loop.make_train_step

  def spy(*args, **kwargs):
    made.append(real(*args, **kwargs))
    return made[-1]

  monkeypatch.setattr(loop, "make_train_step", spy)
  train(config("vae", "train.num_steps=6", "train.log_every=1", "train.ckpt_every=2",
               "train.sample_every=3"), tmp_path / "run", progress=False)
  assert len(made) == 1 and made[0]._cache_size() == 1
