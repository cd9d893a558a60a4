import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import config
from jaxgen.errors import ConfigError, ShapeError
from jaxgen.pipelines import diffusion as pipe
from jaxgen.tasks.diffusion import DiffusionTask


def _task(name, *overrides):
  task = DiffusionTask(config(name, *overrides))
  s = task.config.data.image_size
  batch = {"image": np.zeros((2, s, s, 1), np.uint8), "label": np.zeros(2, np.int32)}
  params, _ = jax.jit(task.init)(jax.random.PRNGKey(0), batch)
  return task, params


@pytest.fixture(scope="module")
def cond():
  return _task("ddpm_class", "data.image_size=8")


@pytest.fixture(scope="module")
def uncond():
  return _task("ddpm", "data.image_size=8")


def test_generate_without_recompiling_when_seeds_labels_or_guidance_change(cond):
  task, params = cond
  m = task.model
  kw = dict(num=4, sampler="ddim", num_steps=3)
  # Python numbers are traced too (weakly typed): new values reuse the compiled program.
  a = pipe.generate(m, params, jax.random.PRNGKey(0), labels=jnp.array([0, 1, 2, 3]),
                    guidance_scale=2.0, eta=0.0, **kw)
  size = pipe.generate.jitted._cache_size()
  b = pipe.generate(m, params, jax.random.PRNGKey(1), labels=jnp.array([4, 5, 6, 7]),
                    guidance_scale=5.0, eta=0.5, **kw)
  c = pipe.generate(m, params, jax.random.PRNGKey(0), labels=jnp.array([0, 1, 2, 3]),
                    guidance_scale=2.0, eta=0.0, **kw)
  assert pipe.generate.jitted._cache_size() == size  # no new compilation
  assert a.shape == (4, 8, 8, 1) and float(a.min()) >= 0 and float(a.max()) <= 1
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, c)


def test_vmap_over_guidance_scales_equals_separate_calls(cond):
  task, params = cond
  labels = jnp.array([1, 2])
  key = jax.random.PRNGKey(3)
  f = lambda g: pipe.generate(task.model, params, key, num=2, labels=labels, guidance_scale=g,
                              num_steps=2)
  scales = jnp.array([1.0, 4.0])
  both = jax.vmap(f)(scales)
  for i, g in enumerate(scales):
    np.testing.assert_allclose(both[i], f(g), atol=1e-5)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(labels=jnp.array([1, 2])), ConfigError, "unconditional"),
    (dict(guidance_scale=2.0), ConfigError, "guidance_scale needs labels"),
    (dict(num_steps=5000), ConfigError, "num_steps"),
])
def test_bad_sampling_requests_on_an_unconditional_model(uncond, kwargs, error, message):
  task, params = uncond
  args = dict(num=2, num_steps=2)
  args.update(kwargs)
  with pytest.raises(error, match=message):
    pipe.generate(task.model, params, jax.random.PRNGKey(0), **args)


def test_bad_labels_and_images(cond):
  task, params = cond
  with pytest.raises(ConfigError, match=r"labels must lie in \[0, 9\]"):
    pipe.generate(task.model, params, jax.random.PRNGKey(0), num=2, labels=jnp.array([3, 10]),
                  num_steps=2)
  with pytest.raises(ShapeError, match=r"labels must have shape \[2\]"):
    pipe.generate(task.model, params, jax.random.PRNGKey(0), num=2, labels=jnp.array([3]),
                  num_steps=2)
  with pytest.raises(ShapeError, match=r"makes images \[batch, 8, 8, 1\]"):
    pipe.img2img(task.model, params, jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 1)),
                 strength=0.5, num=2, num_steps=2)


def test_inpaint_keeps_the_known_pixels_and_img2img_stays_near_the_input(uncond):
  task, params = uncond
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
  mask = np.zeros((2, 8, 8, 1), np.float32)
  mask[:, :, :4] = 1.0
  out = pipe.inpaint(task.model, params, jax.random.PRNGKey(1), images, mask, num=2,
                     num_steps=4)
  np.testing.assert_allclose(np.asarray(out)[:, :, :4], images[:, :, :4] / 255.0, atol=1e-6)
  near = pipe.img2img(task.model, params, jax.random.PRNGKey(2), images, strength=0.02, num=2,
                      num_steps=50)
  far = pipe.img2img(task.model, params, jax.random.PRNGKey(2), images, strength=1.0, num=2,
                     num_steps=50)
  err = lambda x: float(np.abs(np.asarray(x) - images / 255.0).mean())
  assert err(near) < 0.05 < err(far)


def test_interpolation_has_the_requested_points(cond):
  task, params = cond
  a, b = np.zeros((8, 8, 1), np.uint8), np.full((8, 8, 1), 255, np.uint8)
  path = pipe.interpolate(task.model, params, a, b, num=5, num_steps=4, label=3)
  assert path.shape == (5, 8, 8, 1)
  with pytest.raises(ShapeError, match="image_a"):
    pipe.interpolate(task.model, params, np.zeros((4, 4, 1)), b, num=3, num_steps=2)
