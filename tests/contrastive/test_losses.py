"""Losses against NumPy implementations written from the papers, and over 8 sharded devices."""
import math
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_python
from jaxgen.contrastive.losses import MAX_LOGIT_SCALE, clip_loss, nt_xent, siglip_loss
from jaxgen.errors import ShapeError


def normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_nt_xent(z1, z2, t):
  """Chen et al. 2020, eq. 1, one anchor at a time, in float64."""
  z = normalize(np.concatenate([z1, z2]).astype(np.float64))
  n2 = len(z)
  sim = z @ z.T / t
  losses, correct = [], []
  for i in range(n2):
    pos = (i + n2 // 2) % n2
    others = [k for k in range(n2) if k != i]
    losses.append(-sim[i, pos] + np.log(np.sum(np.exp(sim[i, others]))))
    correct.append(others[int(np.argmax(sim[i, others]))] == pos)
  return np.mean(losses), np.mean(correct)


def np_clip(img, txt, logit_scale):
  """Radford et al. 2021, fig. 3: symmetric cross-entropy over cosine logits * exp(t)."""
  logits = np.exp(min(logit_scale, math.log(100))) * normalize(img) @ normalize(txt).T
  ce = lambda lg: np.mean([np.log(np.sum(np.exp(row))) - row[i] for i, row in enumerate(lg)])
  return (ce(logits) + ce(logits.T)) / 2


def np_siglip(img, txt, t_prime, b):
  """Zhai et al. 2023, algorithm 1: -sum_ij log sigmoid(z_ij (t x_i.y_j + b)) / n."""
  n = len(img)
  x, y = normalize(img), normalize(txt)
  total = 0.0
  for i in range(n):
    for j in range(n):
      z = 1.0 if i == j else -1.0
      total += np.log1p(np.exp(-z * (np.exp(t_prime) * x[i] @ y[j] + b)))
  return total / n


def pairs(n=6, d=5, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(n, d))
  return a.astype(np.float32), (a + 0.8 * rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_nt_xent_matches_numpy(t):
  z1, z2 = pairs()
  loss, metrics = nt_xent(z1, z2, t)
  ref_loss, ref_acc = np_nt_xent(z1, z2, t)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], ref_acc)
  # Scale invariance: cosine similarities.
  np.testing.assert_allclose(nt_xent(3 * z1, 0.5 * z2, t)[0], ref_loss, rtol=1e-5)


@pytest.mark.parametrize("logit_scale", [math.log(1 / 0.07), 6.0])
def test_clip_loss_matches_numpy_and_clips_the_scale(logit_scale):
  img, txt = pairs(seed=1)
  loss, metrics = clip_loss(img, txt, logit_scale)
  np.testing.assert_allclose(loss, np_clip(img.astype(np.float64), txt, logit_scale), rtol=1e-5)
  np.testing.assert_allclose(metrics["logit_scale"], min(math.exp(logit_scale), 100.0), rtol=1e-6)
  grad = jax.grad(lambda s: clip_loss(img, txt, s)[0])(jnp.float32(logit_scale))
  assert (float(grad) == 0.0) == (logit_scale > MAX_LOGIT_SCALE)
  logits = normalize(img) @ normalize(txt).T
  np.testing.assert_allclose(metrics["i2t_accuracy"],
                             np.mean(np.argmax(logits, 1) == np.arange(6)))
  np.testing.assert_allclose(metrics["t2i_accuracy"],
                             np.mean(np.argmax(logits, 0) == np.arange(6)))


@pytest.mark.parametrize("t_prime, b", [(math.log(10.0), -10.0), (1.0, 0.5)])
def test_siglip_loss_matches_numpy(t_prime, b):
  img, txt = pairs(seed=2)
  loss, metrics = siglip_loss(img, txt, t_prime, b)
  np.testing.assert_allclose(loss, np_siglip(img.astype(np.float64), txt, t_prime, b), rtol=1e-5)
  np.testing.assert_allclose(metrics["temperature"], math.exp(t_prime), rtol=1e-6)


def np_negclip(img, txt, neg, valid, logit_scale):
  """NegCLIP (Yuksekgonul et al. 2023): each image's softmax over the batch's texts and the
  valid hard negatives; the text->image direction as CLIP's."""
  s = np.exp(min(logit_scale, math.log(100)))
  x, y, z = normalize(img), normalize(txt), normalize(neg[valid])
  i2t = [np.log(np.sum(np.exp(s * np.concatenate([x[i] @ y.T, x[i] @ z.T])))) - s * x[i] @ y[i]
         for i in range(len(x))]
  t2i = [np.log(np.sum(np.exp(s * y[i] @ x.T))) - s * y[i] @ x[i] for i in range(len(x))]
  return (np.mean(i2t) + np.mean(t2i)) / 2


def np_siglip_negatives(img, txt, neg, valid, t_prime, b):
  x, z = normalize(img), normalize(neg[valid])
  extra = np.log1p(np.exp(np.exp(t_prime) * x @ z.T + b)).sum() / len(img)
  return np_siglip(img, txt, t_prime, b) + extra


def test_hard_negatives_match_numpy_and_a_fully_masked_set_changes_nothing():
  img, txt = pairs(seed=3)
  neg = np.random.default_rng(4).normal(size=(12, 5)).astype(np.float32)
  valid = np.random.default_rng(5).uniform(size=12) < 0.6
  loss, metrics = clip_loss(img, txt, 2.0, neg, valid)
  np.testing.assert_allclose(loss, np_negclip(img.astype(np.float64), txt, neg, valid, 2.0),
                             rtol=1e-5)
  assert float(loss) > float(clip_loss(img, txt, 2.0)[0])  # more negatives: a larger loss
  none = np.zeros(12, bool)
  np.testing.assert_allclose(clip_loss(img, txt, 2.0, neg, none)[0],
                             clip_loss(img, txt, 2.0)[0], rtol=1e-6)
  np.testing.assert_allclose(siglip_loss(img, txt, 1.0, -2.0, neg, valid)[0],
                             np_siglip_negatives(img.astype(np.float64), txt, neg, valid, 1.0,
                                                 -2.0), rtol=1e-5)
  with pytest.raises(ShapeError, match="hard negatives"):
    clip_loss(img, txt, 2.0, neg[:, :3], valid)


def test_gradients_are_finite_even_for_degenerate_inputs():
  z1, z2 = pairs()
  cases = [(z1, z2), (z1, z1), (np.zeros_like(z1), z2)]  # identical views, a zero embedding
  fns = [lambda a, b: nt_xent(a, b, 0.1)[0],
         lambda a, b: clip_loss(a, b, math.log(1 / 0.07))[0],
         lambda a, b: siglip_loss(a, b, math.log(10.0), -10.0)[0]]
  for f in fns:
    for a, b in cases:
      grads = jax.grad(f, argnums=(0, 1))(a, b)
      assert all(np.all(np.isfinite(g)) for g in grads)
  with pytest.raises(ShapeError, match="same shape"):
    nt_xent(z1, z2[:4], 0.1)


@pytest.mark.slow
def test_sharded_global_batch_loss_equals_one_device_loss():
  """Each loss and its gradients over a batch split across 8 devices equal the 1-device values,
  so every example of the global batch is a negative; a per-shard loss would differ."""
  code = textwrap.dedent("""
      import math, jax, jax.numpy as jnp, numpy as np
      from jaxgen import runtime
      runtime.enable_compilation_cache()
      from jax.sharding import NamedSharding, PartitionSpec as P
      from jaxgen.train.mesh import make_mesh
      from jaxgen.contrastive.losses import nt_xent, clip_loss, siglip_loss
      assert len(jax.devices()) == 8
      rng = np.random.default_rng(0)
      a = rng.normal(size=(16, 8)).astype(np.float32)
      b = (a + rng.normal(size=(16, 8))).astype(np.float32)
      losses = {
          "nt_xent": lambda x, y, s: nt_xent(x, y, jnp.exp(-s))[0],
          "clip": lambda x, y, s: clip_loss(x, y, s)[0],
          "siglip": lambda x, y, s: siglip_loss(x, y, s, -2.0)[0],
      }
      scale = jnp.float32(math.log(1 / 0.07))
      for name, f in losses.items():
        g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
        results = {}
        for n in (8, 1):
          mesh = make_mesh(jax.devices()[:n])
          split = NamedSharding(mesh, P("data"))
          x, y = jax.device_put(a, split), jax.device_put(b, split)
          assert len(x.sharding.device_set) == n
          s = jax.device_put(scale, NamedSharding(mesh, P()))
          results[n] = jax.device_get(g(x, y, s))
        (l8, g8), (l1, g1) = results[8], results[1]
        np.testing.assert_allclose(l8, l1, rtol=1e-6)
        for u, v in zip(g8, g1):
          np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)
        per_shard = np.mean([f(a[i:i + 2], b[i:i + 2], scale) for i in range(0, 16, 2)])
        assert abs(per_shard - l1) > 1e-2, (name, per_shard, l1)
        print(name, float(l8), float(l1), float(per_shard))
      print("OK")
  """)
  r = run_python(code, timeout=300, devices=8)
  assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr[-3000:]
