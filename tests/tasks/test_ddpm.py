"""The DDPM task through the real loop, `jaxgen sample` and `jaxgen eval`, on smoke configs."""
import json

import numpy as np
import pytest
from PIL import Image

from helpers import config
from jaxgen import app
from jaxgen.app import train
from jaxgen.cli import main
from jaxgen.eval import quality

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def feature_net_dir(tmp_path_factory):
  """A smoke-trained classifier on the same data and size as the smoke DDPM (8x8)."""
  wd = tmp_path_factory.mktemp("classifier")
  train(config("classifier", "data.image_size=8"), wd, progress=False)
  return wd


def test_class_conditional_ddpm_trains_samples_and_evaluates(tmp_path, capsys, feature_net_dir):
  wd = tmp_path / "run"
  train(config("ddpm_class", "data.image_size=8"), wd, progress=False)
  with Image.open(wd / "samples" / "samples_step0000004.png") as im:
    assert im.size[0] > im.size[1]  # 10 columns (one per class), 1 row
  main(["sample", "--workdir", str(wd), "--label", "7", "--guidance", "2.5", "--num", "6",
        "--steps", "3", "--out", str(tmp_path / "sevens.png"), "--trajectory"])
  printed = capsys.readouterr().out.split()
  assert printed == [str(tmp_path / "sevens.png"), str(tmp_path / "sevens_trajectory.png")]
  noisy = tmp_path / "noisy.png"  # a user's picture of another size than the model's
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (11, 13), np.uint8)).save(noisy)
  main(["denoise", "--workdir", str(wd), "--image", str(noisy), "--sigma", "0.2", "--steps",
        "3", "--out", str(tmp_path / "clean.png")])
  assert capsys.readouterr().out.strip() == str(tmp_path / "clean.png")
  with Image.open(tmp_path / "clean.png") as im:
    assert im.size == (13, 11) and im.mode == "L"
  main(["denoise", "--workdir", str(wd), "--image", str(noisy), "--steps", "3"])
  assert capsys.readouterr().out.strip() == str(tmp_path / "noisy_denoised.png")
  main(["eval", "--workdir", str(wd), "--num", "20", "--steps", "2", "--batch", "10",
        "--feature-net", str(feature_net_dir), "--baselines"])
  m = json.loads(capsys.readouterr().out)
  assert {"frechet_distance", "precision", "recall", "class_accuracy"} <= set(m)
  assert m["num_samples"] == 20 and m["steps"] == 2 and m["sampler"] == "ddim"
  b = m["baselines"]
  # Real images the feature network never saw (the held-out halves), beside the training
  # images it was trained on, each labelled by what it is.
  assert b["heldout_vs_heldout"]["frechet_distance"] < b["uniform_noise"]["frechet_distance"]
  assert b["train_vs_heldout"]["frechet_distance"] < b["uniform_noise"]["frechet_distance"]


def test_unconditional_ddpm_refuses_labels(tmp_path, capsys):
  wd = tmp_path / "run"
  train(config("ddpm", "data.image_size=8", "train.sample_every=0"), wd, progress=False)
  with pytest.raises(SystemExit) as e:
    main(["sample", "--workdir", str(wd), "--label", "3", "--num", "2", "--steps", "2"])
  assert e.value.code == 2
  assert "unconditional" in capsys.readouterr().err
  main(["sample", "--workdir", str(wd), "--num", "4", "--sampler", "dpmpp_2m", "--steps", "3"])
  assert capsys.readouterr().out.strip().endswith("samples_dpmpp_2m.png")


def test_feature_net_is_trained_once_and_cached(tmp_path, monkeypatch, caplog):
  """The first caller trains the net into the cache; one that asks while it trains waits for it
  (the loop's workdir lock would refuse a second training) and loads the same net; later ones
  load it without training."""
  import threading
  import time

  from jaxgen.train.lock import LOCK_FILE
  monkeypatch.setenv("JAXGEN_CACHE", str(tmp_path / "cache"))
  data = config("ddpm", "data.image_size=8").data
  directory = quality.feature_net_dir(data)
  assert str(directory).startswith(str(tmp_path / "cache"))
  nets, errors = {}, []

  def load(name):
    try:
      nets[name] = app.load_feature_net(data, progress=False, steps=3)
    except Exception as e:  # reported by the assertion below
      errors.append(e)

  first = threading.Thread(target=load, args=("first",))
  with caplog.at_level("INFO", logger="jaxgen"):
    first.start()
    while not (directory / LOCK_FILE).exists() and first.is_alive():
      time.sleep(0.01)
    assert first.is_alive(), errors
    load("second")   # while the first trains
    first.join()
  assert not errors, errors
  messages = [r.getMessage() for r in caplog.records]
  assert sum("Training the metric's feature network" in m for m in messages) == 1, messages
  assert any("waiting for it to finish" in m for m in messages), messages
  feats, logits = nets["second"](np.zeros((3, 8, 8, 1), np.uint8))
  assert feats.shape[0] == logits.shape[0] == 3 and logits.shape[1] == 10
  np.testing.assert_array_equal(logits, nets["first"](np.zeros((3, 8, 8, 1), np.uint8))[1])
  stamp = sorted(p.stat().st_mtime for p in directory.rglob("*") if p.is_file())
  app.load_feature_net(data, progress=False, steps=3)
  assert sorted(p.stat().st_mtime for p in directory.rglob("*") if p.is_file()) == stamp


def test_the_ddpm_paper_cifar10_config_has_its_35_7m_parameters():
  import jax
  import jax.numpy as jnp

  from jaxgen.tasks.diffusion import DiffusionTask
  c = config("ddpm", arg="cifar10")
  assert (c.data.source, c.data.name, c.data.image_size) == ("tfds", "cifar10", 32)
  task = DiffusionTask(c)
  shapes = jax.eval_shape(task.unet.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                          jnp.zeros((1,), jnp.int32))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == 35_746_307  # diffusers' count


def test_bfloat16_compute_trains_like_float32(tmp_path):
  """Mixed precision: bfloat16 activations, float32 params, optimizer state and diffusion math."""
  import json

  import jax
  import jax.numpy as jnp
  losses = {}
  for dtype in ("float32", "bfloat16"):
    wd = tmp_path / dtype
    state = train(config("ddpm", "data.image_size=8", "train.sample_every=0", "train.log_every=1",
                         f"model.dtype={dtype}"), wd, progress=False)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    losses[dtype] = [json.loads(line)["loss"] for line in (wd / "metrics.jsonl").open()]
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.05)


def test_lora_on_a_trained_pixel_ddpm(tmp_path, capsys):
  """configs/lora.py adapts our own U-Nets too: only the attention adapters train, the restored
  run samples with the merged weights, and no diffusers file is written for a pixel model."""
  import jax

  from helpers import REPO
  from jaxgen import lora
  base = tmp_path / "base"
  train(config("ddpm", "data.image_size=8"), base, progress=False)
  cfg = app.load_config(f"{REPO / 'configs' / 'lora.py'}:smoke,base={base},rank=2")
  wd = tmp_path / "lora"
  state = train(cfg, wd, progress=False)
  base_run = app.restore_run(base, with_state=False)
  assert set(state.params) == set(lora.targets(base_run.params, r"(to_q|to_k|to_v|to_out)/kernel$"))
  assert lora.num_params(state.params) * 2 == sum(
      a.size for a in jax.tree.leaves(state.opt_state) if a.ndim)
  run = app.restore_run(wd)
  assert jax.tree.structure(run.params) == jax.tree.structure(base_run.params)
  assert not (wd / app.LORA_FILE).exists()
  main(["sample", "--workdir", str(wd), "--num", "2", "--steps", "2", "--out",
        str(tmp_path / "s.png")])
  assert capsys.readouterr().out.strip() == str(tmp_path / "s.png")
