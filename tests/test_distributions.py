import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from jaxgen import distributions as dist


def test_gaussian_kl_matches_monte_carlo_estimate():
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(2, 3)).astype(np.float32)
  logvar = rng.normal(scale=0.5, size=(2, 3)).astype(np.float32)
  n = 400_000
  std = np.exp(0.5 * logvar)
  z = mean[None] + std[None] * rng.normal(size=(n, 2, 3))
  log_q = stats.norm.logpdf(z, mean[None], std[None]).sum(-1)
  log_p = stats.norm.logpdf(z).sum(-1)
  mc = (log_q - log_p).mean(0)
  np.testing.assert_allclose(dist.gaussian_kl(jnp.asarray(mean), jnp.asarray(logvar)), mc,
                             rtol=0.02, atol=0.01)


def test_log_probs_match_scipy():
  rng = np.random.default_rng(1)
  x = rng.uniform(size=(2, 4, 4, 1)).astype(np.float32)
  logits = rng.normal(size=x.shape).astype(np.float32)
  p = 1 / (1 + np.exp(-logits))
  ref = (x * np.log(p) + (1 - x) * np.log(1 - p)).reshape(2, -1).sum(-1)
  np.testing.assert_allclose(dist.bernoulli_log_prob(x, logits), ref, rtol=1e-5)
  mean = rng.normal(size=x.shape).astype(np.float32)
  log_scale = np.float32(-1.3)
  ref = stats.norm.logpdf(x, mean, np.exp(log_scale)).reshape(2, -1).sum(-1)
  np.testing.assert_allclose(dist.gaussian_log_prob(x, mean, log_scale), ref, rtol=1e-5)


def test_slerp_and_lerp():
  a = jnp.array([1.0, 0.0, 0.0])
  b = jnp.array([0.0, 2.0, 0.0])
  t = jnp.linspace(0, 1, 5)
  s = dist.slerp(a, b, t)
  np.testing.assert_allclose(s[0], a, atol=1e-6)
  np.testing.assert_allclose(s[-1], b, atol=1e-6)
  # For unit vectors the angle to `a` grows linearly in t and the norm stays 1 (Shoemake).
  u = dist.slerp(a, b / 2, t)
  angles = np.arccos(np.clip(np.asarray(u @ a) / np.linalg.norm(np.asarray(u), axis=1), -1, 1))
  np.testing.assert_allclose(angles, np.asarray(t) * np.pi / 2, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(u), axis=1), 1.0, rtol=1e-6)
  mid = dist.lerp(a, b, t)
  np.testing.assert_allclose(mid[2], (a + b) / 2)
  # Parallel vectors fall back to lerp instead of dividing by sin(0).
  np.testing.assert_allclose(dist.slerp(a, 3 * a, jnp.array([0.5]))[0], 2 * a, atol=1e-5)


def test_reparameterize_has_the_posterior_moments():
  mean, logvar = jnp.full((20000, 1), 2.0), jnp.full((20000, 1), np.log(0.25))
  z = dist.reparameterize(jax.random.PRNGKey(0), mean, logvar)
  assert abs(float(z.mean()) - 2.0) < 0.01 and abs(float(z.std()) - 0.5) < 0.01
