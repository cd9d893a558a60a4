"""The DiT task and flow matching through the real loop (smoke sizes): train, sample from the
command line with euler and heun, evaluate; a flow-matching U-Net; no recompiles of the flow
sampler for new seeds, labels and guidance."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from helpers import config
from jaxgen.app import restore_run, train
from jaxgen.cli import main
from jaxgen.errors import ConfigError
from jaxgen.pipelines import diffusion as pipe

pytestmark = pytest.mark.slow


def test_dit_flow_trains_samples_and_evaluates(tmp_path, capsys):
  wd = tmp_path / "dit"
  train(config("dit"), wd, progress=False)
  for sampler in ("euler", "heun"):
    main(["sample", "--workdir", str(wd), "--sampler", sampler, "--steps", "3", "--num", "10",
          "--label", "4", "--out", str(tmp_path / f"{sampler}.png")])
    with Image.open(tmp_path / f"{sampler}.png") as im:
      assert im.size[0] > 16
  capsys.readouterr()
  with pytest.raises(SystemExit):
    main(["sample", "--workdir", str(wd), "--sampler", "ddim"])
  assert "flow-matching model samples with euler, heun" in capsys.readouterr().err
  # a smoke classifier as the metric's feature net (the default one trains for 600 steps)
  train(config("classifier", "data.image_size=16"), tmp_path / "classifier", progress=False)
  main(["eval", "--workdir", str(wd), "--num", "20", "--batch", "20",
        "--feature-net", str(tmp_path / "classifier")])
  m = json.loads(capsys.readouterr().out)
  assert m["sampler"] == "euler" and 0 <= m["class_accuracy"] <= 1
  run = restore_run(wd)
  model, params = run.task.model, run.params
  assert model.is_flow
  pipe.generate.jitted._clear_cache()
  for seed, label, g in [(0, 1, 2.0), (1, 3, 5.0)]:
    pipe.generate(model, params, jax.random.PRNGKey(seed), num=4,
                  labels=jnp.full((4,), label, jnp.int32), guidance_scale=jnp.float32(g),
                  sampler="heun", num_steps=3)
  assert pipe.generate.jitted._cache_size() == 1
  with pytest.raises(ConfigError, match="flow-matching model"):
    pipe.img2img(model, params, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)), strength=0.5,
                 num=1)


def test_flow_matching_unet_and_eps_dit(tmp_path):
  state = train(config("ddpm_class", "diffusion.objective=flow", "diffusion.sampler=heun"),
                tmp_path / "unet_flow", progress=False)
  assert int(state.step) == 4
  run = restore_run(tmp_path / "unet_flow")
  x = pipe.generate(run.task.model, run.params, jax.random.PRNGKey(0), num=2,
                    labels=jnp.array([0, 1]), guidance_scale=jnp.float32(2.0), sampler="heun",
                    num_steps=2)
  assert x.shape == (2, 16, 16, 1)
  train(config("dit", arg="smoke,eps"), tmp_path / "dit_eps", progress=False)
  with pytest.raises(ConfigError, match="objective=flow samples with euler or heun"):
    config("dit", "diffusion.sampler=ddim")


def test_a_flow_model_denoises_from_the_matching_time(tmp_path):
  """With a perfect velocity for a picture set (the one clean picture) the ODE from the matched
  time returns it; jaxgen denoise takes flow runs."""
  from jaxgen.models.dit import DiT
  clean = jnp.linspace(-0.8, 0.8, 16 * 16).reshape(1, 16, 16, 1)

  class Oracle(DiT):  # velocity towards `clean`: (x_t - clean) / t
    def __call__(self, x, t, labels=None, context=None, *, train=False):
      t = (t / 1000.0)[:, None, None, None]
      return (x - clean) / jnp.maximum(t, 1e-6)

  model = pipe.DiffusionModel(Oracle(), (16, 16, 1), objective="flow")
  noisy = (clean + 1) / 2 + 0.1 * jax.random.normal(jax.random.PRNGKey(0), clean.shape)
  out, sigma = pipe.denoise(model, {}, noisy, jax.random.PRNGKey(1), sigma=0.1, steps=5)
  np.testing.assert_allclose(out, (clean + 1) / 2, atol=1e-4)
  with pytest.raises(ConfigError, match="draws must be 1"):
    pipe.denoise(model, {}, noisy, jax.random.PRNGKey(1), sigma=0.1, draws=4)
