"""The latent-diffusion first stage: pixel, hinge and perceptual losses against NumPy, the patch
discriminator against PyTorch, the stop-gradient split between autoencoder and discriminator,
the discriminator's start step, the running latent statistics and the smoke config's real run."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import config
from jaxgen import losses
from jaxgen.commands import evaluate_autoencoder
from jaxgen.data import heldout_images
from jaxgen.errors import ConfigError
from jaxgen.models.discriminator import PatchDiscriminator
from jaxgen.pipelines import autoencoder as pipe
from jaxgen.pipelines.autoencoder import latent_scale, latent_stats, latent_stats_for_scale
from jaxgen.tasks.vae import AutoencoderTask


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


# -- pure losses against NumPy -------------------------------------------------------------
def test_pixel_and_hinge_losses_match_numpy():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, 3, 4, 4, 2)).astype(np.float32)
  np.testing.assert_allclose(losses.l1_loss(a, b), np.abs(a - b).sum((1, 2, 3)), rtol=1e-5)
  np.testing.assert_allclose(losses.l2_loss(a, b), ((a - b) ** 2).sum((1, 2, 3)), rtol=1e-5)
  real, fake = 2.0 * rng.normal(size=(2, 3, 2, 2, 1)).astype(np.float32)
  ref_d = 0.5 * (np.maximum(0.0, 1.0 - real).mean() + np.maximum(0.0, 1.0 + fake).mean())
  assert float(losses.hinge_d_loss(real, fake)) == pytest.approx(ref_d, rel=1e-5)
  assert float(losses.hinge_g_loss(fake)) == pytest.approx(-fake.mean(), rel=1e-5)


def test_perceptual_distance_matches_numpy():
  rng = np.random.default_rng(1)
  fa = [rng.normal(size=(2, 8, 8, 4)), rng.normal(size=(2, 4, 4, 8))]
  fb = [f + 0.3 * rng.normal(size=f.shape) for f in fa]

  def unit(f):
    return f / (np.sqrt((f ** 2).sum(-1, keepdims=True)) + 1e-10)

  ref = sum(((unit(a) - unit(b)) ** 2).sum(-1).mean((1, 2)) for a, b in zip(fa, fb))
  np.testing.assert_allclose(losses.perceptual_distance(fa, fb), ref, rtol=1e-5)
  np.testing.assert_allclose(losses.perceptual_distance(fa, fa), 0.0, atol=1e-6)
  # Per-position normalisation: scaling a feature vector changes nothing.
  scaled = [f * rng.uniform(0.5, 2.0, size=f.shape[:-1] + (1,)) for f in fa]
  np.testing.assert_allclose(losses.perceptual_distance(fa, scaled), 0.0, atol=1e-6)


def test_running_latent_stats_are_the_bias_corrected_average():
  rng = np.random.default_rng(2)
  m = 0.9
  zs = [rng.normal(loc=0.5 * i, scale=1.0 + 0.1 * i, size=(4, 3, 3, 2)) for i in range(6)]
  stats = {"mean": jnp.float32(0.0), "var": jnp.float32(1.0)}
  update = jax.jit(losses.update_latent_stats, static_argnums=3)
  for t, z in enumerate(zs):
    stats = update(stats, z, t, m)
    w = np.array([(1 - m) * m ** (t - i) for i in range(t + 1)]) / (1 - m ** (t + 1))
    assert float(stats["mean"]) == pytest.approx(sum(wi * zi.mean() for wi, zi in zip(w, zs)),
                                                 rel=1e-5, abs=1e-6)
    assert float(stats["var"]) == pytest.approx(sum(wi * zi.var() for wi, zi in zip(w, zs)),
                                                rel=1e-5)
  assert float(latent_scale({"latent_stats": latent_stats_for_scale(0.18215)})) == (
      pytest.approx(0.18215, rel=1e-6))


# -- the patch discriminator against a PyTorch reference -----------------------------------
def test_patch_discriminator_matches_a_torch_reference():
  torch = pytest.importorskip("torch")
  nn = torch.nn
  disc = PatchDiscriminator(ch=4, num_layers=2, groups=2)
  x = np.random.default_rng(3).uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
  rng = np.random.default_rng(8)
  shapes = jax.eval_shape(disc.init, jax.random.PRNGKey(0), x)["params"]
  p = jax.tree.map(lambda s: rng.normal(0.0, 0.3, s.shape).astype(np.float32), shapes)
  variables = {"params": p}
  # taming's NLayerDiscriminator(n_layers=2) with GroupNorm in place of BatchNorm.
  ref = nn.Sequential(
      nn.Conv2d(3, 4, 4, 2, 1), nn.LeakyReLU(0.2),
      nn.Conv2d(4, 8, 4, 2, 1, bias=False), nn.GroupNorm(2, 8, eps=1e-6), nn.LeakyReLU(0.2),
      nn.Conv2d(8, 16, 4, 1, 1, bias=False), nn.GroupNorm(2, 16, eps=1e-6), nn.LeakyReLU(0.2),
      nn.Conv2d(16, 1, 4, 1, 1))
  names = ["conv_0", None, "conv_1", "norm_1", None, "conv_2", "norm_2", None, "conv_out"]
  with torch.no_grad():
    for layer, name in zip(ref, names):
      if name is None:
        continue
      if name.startswith("conv"):
        layer.weight.copy_(torch.from_numpy(p[name]["kernel"].transpose(3, 2, 0, 1).copy()))
        if "bias" in p[name]:
          layer.bias.copy_(torch.from_numpy(p[name]["bias"]))
      else:
        layer.weight.copy_(torch.from_numpy(p[name]["scale"]))
        layer.bias.copy_(torch.from_numpy(p[name]["bias"]))
    expected = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  out = np.asarray(disc.apply(variables, x))
  assert out.shape == (2, 2, 2, 1) == expected.shape  # 16 -> 8 -> 4 -> 3 -> 2
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


# -- the task's losses ----------------------------------------------------------------------
def random_params(init, *args, seed=0):
  """Parameters of init's shapes drawn in NumPy: a jitted init compiles the whole forward pass
  (seconds on a small CPU), and these tests need weights, not the initialiser."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return (rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(leaf.dtype)
    return np.full(leaf.shape, 1.0 if name == "scale" else 0.0, leaf.dtype)

  params, model_state = jax.eval_shape(init, *args)
  fresh = {"latent_stats": {"mean": np.float32(0.0), "var": np.float32(1.0)},
           "step": np.int32(0)}
  assert jax.tree.structure(model_state) == jax.tree.structure(fresh)
  return jax.tree_util.tree_map_with_path(draw, params), fresh


TINY = ("model.ch_mult=1,2", "model.mid_attention=False", "model.beta=1e-6")


@pytest.fixture(scope="module")
def gan():
  task = AutoencoderTask(config("ldm_autoencoder", "model.disc_start=3", *TINY,
                                arg="smoke,gan"))
  batch = {"image": heldout_images(task.config.data, 4)}
  params, model_state = random_params(task.init, jax.random.PRNGKey(0), batch)
  return task, params, model_state, batch


def test_reconstruction_losses_match_numpy(gan):
  task, params, _, batch = gan
  x = batch["image"] / 255.0
  out = np.random.default_rng(4).normal(size=x.shape).astype(np.float32)
  x_hat = 1.0 / (1.0 + np.exp(-out))  # the bernoulli output: logits
  nll = -(x * np.log(x_hat) + (1 - x) * np.log(1 - x_hat)).sum((1, 2, 3))
  np.testing.assert_allclose(task.reconstruction_loss(params, x, out), nll, rtol=1e-4)
  for kind, ref in (("l1", np.abs(2 * x - 2 * x_hat).sum((1, 2, 3))),
                    ("l2", ((2 * x - 2 * x_hat) ** 2).sum((1, 2, 3)))):
    t = AutoencoderTask(config("ldm_autoencoder", f"model.rec_loss={kind}", arg="smoke"))
    np.testing.assert_allclose(t.reconstruction_loss(params, x, out), ref, rtol=1e-4)
  with pytest.raises(ConfigError, match="model.rec_loss must be"):
    config("ldm_autoencoder", "model.rec_loss=l3")


@pytest.fixture(scope="module")
def gan_grads(gan):
  """Gradients of the generator and the discriminator loss separately, and the loss values,
  at a step before disc_start=3 and one after: one compile, the step being traced."""
  task, params, model_state, batch = gan

  def parts(p, step):
    g, d, metrics, state = task.loss_parts(p, dict(model_state, step=step), batch,
                                           jax.random.PRNGKey(1))
    return jnp.stack([g, d]), (g, d, metrics, state)

  fn = jax.jit(jax.jacrev(parts, has_aux=True))  # every gradient leaf [2, ...]: g, d
  return {step: fn(params, jnp.int32(step)) for step in (2, 3)}


def test_generator_and_discriminator_gradients_are_separate(gan_grads):
  grads, _ = gan_grads[3]
  gen = jax.tree.map(lambda g: g[0], grads)
  dis = jax.tree.map(lambda g: g[1], grads)
  # Exactly zero across the split, not merely small.
  assert all((g == 0).all() for g in _leaves(gen["disc"]))
  assert all((g == 0).all() for g in _leaves(dis["params"]))
  assert any((g != 0).any() for g in _leaves(gen["params"]))
  assert any((g != 0).any() for g in _leaves(dis["disc"]))
  assert all(np.isfinite(g).all() for g in _leaves(grads))


def test_discriminator_is_off_before_disc_start(gan_grads):
  grads_before, (g_before, d_before, m_before, state_before) = gan_grads[2]
  _, (g_on, d_on, m_on, state_on) = gan_grads[3]
  assert int(state_before["step"]) == 3 and int(state_on["step"]) == 4
  assert float(m_before["disc_weight"]) == 0.0 and float(d_before) == 0.0
  assert all((g == 0).all() for g in _leaves(grads_before["disc"]))
  # Before the start the loss is the plain one, with the small KL weight (beta=1e-6).
  expected = float(m_before["rec"]) + 1e-6 * float(m_before["kl"])
  assert float(g_before) == pytest.approx(expected, rel=1e-6)
  assert float(m_on["disc_weight"]) > 0.0 and float(d_on) == pytest.approx(float(m_on["d_loss"]))
  assert float(g_on) == pytest.approx(
      expected + float(m_on["disc_weight"]) * float(m_on["g_loss"]), rel=1e-5)


def test_bad_discriminator_settings_are_refused():
  with pytest.raises(ConfigError, match="leaves no patch of a 32px image"):
    config("ldm_autoencoder", "model.disc_layers=4", arg="smoke,gan")
  with pytest.raises(ConfigError, match="latent_stats_momentum"):
    config("ldm_autoencoder", "model.latent_stats_momentum=1.0", arg="smoke")


# -- the perceptual loss --------------------------------------------------------------------
@pytest.fixture(scope="module")
def feature_distance():
  """A random-weight classifier of the metric's architecture: enough for LPIPS-style
  distances (random conv features already separate blur from noise), no training needed."""
  from jaxgen import app
  from jaxgen.eval.quality import FeatureNet, fill_classifier_config
  c = app.base_config("classifier")
  fill_classifier_config(c, config("ldm_autoencoder", arg="smoke").data, 4)
  task = app.build_task(c)
  x = np.zeros((1, 32, 32, 3), np.uint8)
  shapes = jax.eval_shape(task.init, jax.random.PRNGKey(0), {"image": x, "label": np.zeros(1)})
  rng = np.random.default_rng(7)
  params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: (rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
                          if path[-1].key == "kernel" else
                          np.full(leaf.shape, float(path[-1].key == "scale"))).astype(leaf.dtype),
      shapes[0])
  return losses.FeatureDistance.from_feature_net(
      FeatureNet(task.module, {**params, **shapes[1]}, c.data.to_dict()))


def _blur(x):
  pad = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
  return np.mean([pad[:, i:i + x.shape[1], j:j + x.shape[2]] for i in range(5) for j in range(5)],
                 axis=0)


def test_perceptual_distance_zero_blur_noise_and_gradient(feature_distance):
  x = heldout_images(config("ldm_autoencoder", arg="smoke").data, 4) / 255.0
  noisy = np.clip(x + np.random.default_rng(5).normal(0, 0.02, x.shape), 0, 1)
  ref, other = np.concatenate([x, x, x]), np.concatenate([x, _blur(x), noisy])
  fn = jax.jit(jax.grad(lambda y: (feature_distance(ref, y).sum(), feature_distance(ref, y)),
                        has_aux=True))
  grad, dist = jax.device_get(fn(other))
  same, blur, noise = np.split(dist, 3)
  np.testing.assert_allclose(same, 0.0, atol=1e-6)
  assert (blur > noise).all() and (noise > 0).all()
  assert np.isfinite(grad).all() and np.abs(grad[4:]).sum() > 0


# -- the smoke config through the real loop -------------------------------------------------
@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
  from jaxgen.app import train
  c = config("ldm_autoencoder", "train.num_steps=30", "model.disc_start=12",
             "model.latent_stats_momentum=0.8", "train.sample_every=30", "train.ckpt_every=30",
             arg="smoke,gan")
  wd = tmp_path_factory.mktemp("ldm_ae")
  state = train(c, wd, progress=False)
  return c, wd, state


def test_smoke_run_switches_the_discriminator_on_at_disc_start(gan_run):
  c, wd, state = gan_run
  rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
  weight = {r["step"]: r["disc_weight"] for r in rows}
  # Logged means over steps (s - 2, s]; the loss of step index 12 is the first with the GAN.
  assert all(w == 0 for s, w in weight.items() if s <= 12)
  assert all(w > 0 for s, w in weight.items() if s >= 14)
  assert int(state.model_state["step"]) == int(state.step) == 30
  assert sorted(p.name for p in (wd / "samples").glob("*.png")) == [
      "prior_samples_step0000030.png", "reconstructions_step0000030.png"]


def test_running_latent_stats_approach_the_exact_ones(gan_run):
  c, wd, state = gan_run
  from jaxgen.data import load_all, load_source
  task = AutoencoderTask(c)
  images = load_all(load_source(c.data, c.data.train_split), limit=512)["image"]
  exact = latent_stats(task.model, task.autoencoder_params(state.params), images)
  running = jax.device_get(state.model_state["latent_stats"])
  assert float(running["var"]) == pytest.approx(float(exact["var"]), rel=0.1)
  assert float(running["mean"]) == pytest.approx(float(exact["mean"]),
                                                 abs=0.1 * np.sqrt(float(exact["var"])))
  # The scale against an independent NumPy computation: sampled latents' 1 / std.
  mean, logvar = jax.device_get(pipe.encode(task.model, task.autoencoder_params(state.params),
                                            images))
  rng = np.random.default_rng(6)
  z = np.stack([mean + np.exp(0.5 * logvar) * rng.normal(size=mean.shape) for _ in range(8)])
  scale = float(latent_scale({"latent_stats": exact}))
  assert scale == pytest.approx(1.0 / z.std(), rel=5e-3)
  exact_var = (mean.astype(np.float64) ** 2 + np.exp(logvar)).mean() - mean.mean() ** 2
  assert scale == pytest.approx(1.0 / np.sqrt(exact_var), rel=1e-5)


def test_restored_run_evaluates_with_the_autoencoder_params_only(gan_run):
  c, wd, state = gan_run
  from jaxgen.app import restore_run
  run = restore_run(wd)
  assert set(run.params) == {"params", "disc"}
  ae = run.task.autoencoder_params(run.params)
  assert set(ae) == {"params"}
  x = heldout_images(run.config.data, 2)
  assert pipe.encode(run.task.model, ae, x)[0].shape == (2, 8, 8, 4)
  metrics = evaluate_autoencoder(run.task, run.params, run.model_state, jax.random.PRNGKey(0),
                                 limit=16)
  assert metrics["latent_scale"] == pytest.approx(float(latent_scale(run.model_state)))
  assert {"psnr", "rec", "kl", "nll", "neg_elbo", "latent_scale_heldout"} <= set(metrics)


def test_perceptual_net_from_a_workdir_must_be_a_classifier(gan_run):
  c, wd, _ = gan_run
  task = AutoencoderTask(config("ldm_autoencoder", f"model.perceptual_net={wd}", arg="smoke"))
  with pytest.raises(ConfigError, match="holds a vae run"):
    task.feature_distance()
  task = AutoencoderTask(config("ldm_autoencoder", f"model.perceptual_net={wd}/nothing",
                                arg="smoke"))
  with pytest.raises(ConfigError, match="is not a jaxgen workdir"):
    task.feature_distance()


def test_perceptual_loss_in_the_task_is_frozen(gan, feature_distance):
  _, params, model_state, batch = gan
  c = config("ldm_autoencoder", "model.perceptual_net=auto", "model.perceptual_weight=0.5",
             *TINY, arg="smoke")
  task = AutoencoderTask(c)
  task._feature_distance = feature_distance  # what `auto` would load, without training it
  ae = task.autoencoder_params(params)
  loss, (metrics, _) = jax.jit(task.loss_fn)(ae, model_state, batch, jax.random.PRNGKey(1))
  dims = 32 * 32 * 3
  assert float(metrics["perceptual"]) > 0
  assert float(loss) == pytest.approx(float(metrics["rec"]) + 1e-6 * float(metrics["kl"])
                                      + 0.5 * dims * float(metrics["perceptual"]), rel=1e-5)
  assert set(ae) == {"params"}  # the feature network is no parameter of the model


@pytest.mark.slow
def test_perceptual_auto_trains_the_metric_network_first(tmp_path, monkeypatch):
  """perceptual_net=auto: the app layer trains (once) and caches the metric's classifier before
  the autoencoder's loss needs it."""
  import functools

  from jaxgen import app
  from jaxgen.eval import quality
  monkeypatch.setenv("JAXGEN_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(app, "load_feature_net",
                      functools.partial(app.load_feature_net, steps=2))
  c = config("ldm_autoencoder", "train.num_steps=2", "train.sample_every=0",
             arg="smoke,perceptual")
  state = app.train(c, tmp_path / "run", progress=False)
  assert int(state.step) == 2
  assert (quality.feature_net_dir(c.data) / "checkpoints").is_dir()
