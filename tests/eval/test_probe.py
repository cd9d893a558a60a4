"""Linear probe against scipy's L-BFGS on the same objective; k-NN against NumPy brute force."""
import numpy as np
import pytest
from scipy import optimize

from jaxgen.errors import ConfigError
from jaxgen.eval import probe


def blobs(n, d=10, k=4, sep=2.0, seed=0):
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(123).normal(size=(k, d)) * sep
  y = rng.integers(0, k, size=n)
  return (centres[y] + rng.normal(size=(n, d)) + 5.0).astype(np.float32), y


def scipy_probe(x, y, k, l2):
  """The objective of `probe_objective`, minimised by scipy (as sklearn's lbfgs solver does)."""
  mean, std = x.mean(0), x.std(0) + 1e-6
  xs = ((x - mean) / std).astype(np.float64)
  n, d = xs.shape
  onehot = np.eye(k)[y]

  def f(theta):
    w, b = theta[:d * k].reshape(d, k), theta[d * k:]
    logits = xs @ w + b
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    loss = -np.mean(np.sum(onehot * np.log(p), 1)) + 0.5 * l2 * np.sum(w ** 2)
    g = (p - onehot) / n
    return loss, np.concatenate([(xs.T @ g + l2 * w).ravel(), g.sum(0)])

  res = optimize.minimize(f, np.zeros(d * k + k), jac=True, method="L-BFGS-B",
                          options=dict(maxiter=2000, gtol=1e-9))
  w, b = res.x[:d * k].reshape(d, k), res.x[d * k:]
  return res.fun, lambda z: np.argmax(((z - mean) / std) @ w + b, axis=1)


def test_linear_probe_matches_scipy_on_a_nearly_separable_problem():
  (x, y), (xt, yt) = blobs(300, sep=1.0), blobs(400, sep=1.0, seed=1)  # ~90% separable
  l2 = 1e-2
  ref_loss, ref_predict = scipy_probe(x, y, 4, l2)
  ref_acc = np.mean(ref_predict(xt) == yt)
  out = probe.linear_probe(x, y, xt, yt, num_classes=4, l2=l2)
  np.testing.assert_allclose(out["loss"], ref_loss, rtol=1e-4)
  assert ref_acc > 0.85 and abs(float(out["accuracy"]) - ref_acc) <= 0.005
  assert float(out["train_accuracy"]) > 0.85
  adam = probe.linear_probe(x, y, xt, yt, num_classes=4, l2=l2, method="adam", steps=300,
                            learning_rate=0.05)
  assert abs(float(adam["accuracy"]) - ref_acc) <= 0.02
  with pytest.raises(ConfigError, match="optimiser"):
    probe.fit_linear_probe(x, y, method="sgd")


def test_linear_probe_is_at_chance_on_random_labels():
  rng = np.random.default_rng(2)
  # The shapes of the test above: the compiled probe is reused.
  x, xt = rng.normal(size=(300, 10)), rng.normal(size=(1000, 10))
  y, yt = rng.integers(0, 4, 300), rng.integers(0, 4, 1000)
  out = probe.linear_probe(x, y, xt, yt, num_classes=4, l2=1e-3)
  assert float(out["train_accuracy"]) > 0.27  # fits some noise in the training set...
  assert abs(float(out["accuracy"]) - 0.25) < 0.04  # ...and nothing that transfers (sd 0.014)


def numpy_knn(train, labels, test, k, t, classes):
  """Wu et al. 2018: cosine top-k neighbours vote exp(s / T) for their class."""
  a = train / np.linalg.norm(train, axis=1, keepdims=True)
  q = test / np.linalg.norm(test, axis=1, keepdims=True)
  scores = np.zeros((len(test), classes))
  for i, sims in enumerate(q @ a.T):
    top = np.argsort(-sims, kind="stable")[:k]
    for j in top:
      scores[i, labels[j]] += np.exp(sims[j] / t)
  return scores


@pytest.mark.parametrize("k, t", [(20, 0.07), (5, 0.5)])
def test_knn_matches_numpy_brute_force(k, t):
  (x, y), (xt, _) = blobs(120, sep=0.5), blobs(37, sep=0.5, seed=3)
  x, xt = x - 5.0, xt - 5.0  # centred, so cosine similarity sees the classes
  ref = numpy_knn(x.astype(np.float64), y, xt.astype(np.float64), k, t, 4)
  scores = np.asarray(probe.knn_scores(x, y, xt, num_classes=4, k=k, temperature=t,
                                       batch_size=16))  # 37 = 2 x 16 + a remainder
  np.testing.assert_allclose(scores / scores.sum(1, keepdims=True),
                             ref / ref.sum(1, keepdims=True), rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(probe.knn_classify(x, y, xt, num_classes=4, k=k, temperature=t),
                                ref.argmax(1))
  assert float(probe.knn_accuracy(x, y, xt, ref.argmax(1), k=k, temperature=t)) == 1.0
