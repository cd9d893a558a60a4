"""Evaluation on frozen features: a linear probe (logistic regression) and a weighted k-NN."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from jaxgen.errors import ConfigError, ShapeError
from jaxgen.eval.retrieval import l2_normalize


def _check_xy(x, y, what: str):
  if x.ndim != 2 or y.shape != (x.shape[0],):
    raise ShapeError(f"{what}: expected features [N, D] and labels [N], got {x.shape} and "
                     f"{y.shape}")


def standardize(train_x, *others, eps: float = 1e-6):
  """Per-feature zero mean, unit variance with the statistics of `train_x`, applied to all."""
  train_x = jnp.asarray(train_x, jnp.float32)
  mean, std = jnp.mean(train_x, axis=0), jnp.std(train_x, axis=0) + eps
  return tuple((jnp.asarray(x, jnp.float32) - mean) / std for x in (train_x, *others))


def _logits(params, x):
  return jnp.matmul(x, params["w"], precision=jax.lax.Precision.HIGHEST) + params["b"]


def probe_objective(params, x, y, l2) -> jax.Array:
  """Mean cross-entropy + l2 / 2 * ||W||^2 (bias not penalised), as sklearn's
  LogisticRegression with C = 1 / (l2 * N)."""
  logits = _logits(params, x)
  ce = jnp.mean(jax.nn.logsumexp(logits, axis=-1)
                - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0])
  return ce + 0.5 * l2 * jnp.sum(params["w"] ** 2)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps", "method"))
def _fit(x, y, l2, learning_rate, tol, *, num_classes, steps, method):
  params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
  fun = functools.partial(probe_objective, x=x, y=y, l2=l2)
  if method == "lbfgs":
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
      p, s = carry
      v, g = value_and_grad(p, state=s)
      u, s = opt.update(g, s, p, value=v, grad=g, value_fn=fun)
      return optax.apply_updates(p, u), s

    def go_on(carry):
      # Stop at convergence: L-BFGS's curvature pairs degenerate once the gradient vanishes.
      count = otu.tree_get(carry[1], "count")
      return (count == 0) | ((count < steps) & (otu.tree_norm(otu.tree_get(carry[1], "grad"))
                                                >= tol))

    params, _ = jax.lax.while_loop(go_on, step, (params, opt.init(params)))
  else:
    opt = optax.adam(learning_rate)

    def adam_step(_, carry):
      p, s = carry
      u, s = opt.update(jax.grad(fun)(p), s, p)
      return optax.apply_updates(p, u), s

    params, _ = jax.lax.fori_loop(0, steps, adam_step, (params, opt.init(params)))
  return params, fun(params)


def fit_linear_probe(train_x, train_y, *, num_classes: int | None = None, l2: float = 1e-4,
                     method: str = "lbfgs", steps: int = 1000, learning_rate: float = 1e-2,
                     tol: float = 1e-5) -> dict:
  """Multinomial logistic regression on standardised features, full batch, jitted.

  method 'lbfgs' (up to `steps` iterations, stops when the gradient norm < tol) or 'adam'
  (`steps` steps of `learning_rate`). Returns the probe {'w', 'b', 'mean', 'std', 'loss'}.
  """
  train_x, train_y = jnp.asarray(train_x, jnp.float32), jnp.asarray(train_y, jnp.int32)
  _check_xy(train_x, train_y, "fit_linear_probe")
  if method not in ("lbfgs", "adam"):
    raise ConfigError(f"unknown probe optimiser {method!r}; choose 'lbfgs' or 'adam'")
  num_classes = int(num_classes or int(jnp.max(train_y)) + 1)
  mean, std = jnp.mean(train_x, axis=0), jnp.std(train_x, axis=0) + 1e-6
  params, loss = _fit((train_x - mean) / std, train_y, l2, learning_rate, tol,
                      num_classes=num_classes, steps=steps, method=method)
  return dict(params, mean=mean, std=std, loss=loss)


def probe_predict(probe: dict, x) -> jax.Array:
  """Class predictions [N] of a fitted probe on raw (unstandardised) features [N, D]."""
  x = (jnp.asarray(x, jnp.float32) - probe["mean"]) / probe["std"]
  return jnp.argmax(_logits(probe, x), axis=-1)


def linear_probe(train_x, train_y, test_x, test_y, **kwargs) -> dict:
  """Fits on train, reports {'accuracy' (held out), 'train_accuracy', 'loss'}; kwargs go to
  `fit_linear_probe`."""
  probe = fit_linear_probe(train_x, train_y, **kwargs)
  test_y = jnp.asarray(test_y)
  _check_xy(jnp.asarray(test_x), test_y, "linear_probe")
  acc = lambda x, y: jnp.mean((probe_predict(probe, x) == jnp.asarray(y)).astype(jnp.float32))
  return {"accuracy": acc(test_x, test_y), "train_accuracy": acc(train_x, train_y),
          "loss": probe["loss"]}


@functools.partial(jax.jit, static_argnames=("num_classes", "k", "batch_size"))
def _knn_scores(train_x, train_y, test_x, temperature, *, num_classes, k, batch_size):
  bank = l2_normalize(train_x)

  def one(q):
    sims = jnp.matmul(bank, l2_normalize(q), precision=jax.lax.Precision.HIGHEST)  # [N]
    top, idx = jax.lax.top_k(sims, k)
    # Relative to the best match: the same ranking of classes, and no overflow for a small T.
    weights = jnp.exp((top - top[0]) / temperature)
    return jnp.zeros((num_classes,)).at[train_y[idx]].add(weights)

  return jax.lax.map(one, test_x, batch_size=batch_size)


def knn_scores(train_x, train_y, test_x, *, num_classes: int | None = None, k: int = 20,
               temperature: float = 0.07, batch_size: int = 256) -> jax.Array:
  """Weighted k-NN votes (Wu et al. 2018): for each test feature, its k nearest training
  features by cosine similarity s each vote exp(s / T) for their class. -> [M, classes],
  each row scaled by exp(-s_max / T) (the nearest neighbour's weight is 1)."""
  train_x, train_y = jnp.asarray(train_x, jnp.float32), jnp.asarray(train_y, jnp.int32)
  test_x = jnp.asarray(test_x, jnp.float32)
  _check_xy(train_x, train_y, "knn")
  if test_x.ndim != 2 or test_x.shape[1] != train_x.shape[1]:
    raise ShapeError(f"knn: test features {test_x.shape} do not match train {train_x.shape}")
  if not 1 <= k <= train_x.shape[0]:
    raise ConfigError(f"knn: k={k} must lie in [1, {train_x.shape[0]}] (the training set size)")
  num_classes = int(num_classes or int(jnp.max(train_y)) + 1)
  return _knn_scores(train_x, train_y, test_x, jnp.float32(temperature), num_classes=num_classes,
                     k=k, batch_size=min(batch_size, test_x.shape[0]))


def knn_classify(train_x, train_y, test_x, **kwargs) -> jax.Array:
  """Predicted classes [M] of the weighted k-NN; kwargs go to `knn_scores`."""
  return jnp.argmax(knn_scores(train_x, train_y, test_x, **kwargs), axis=-1)


def knn_accuracy(train_x, train_y, test_x, test_y, **kwargs) -> jax.Array:
  return jnp.mean((knn_classify(train_x, train_y, test_x, **kwargs)
                   == jnp.asarray(test_y)).astype(jnp.float32))


def probe_metrics(train_x, train_y, test_x, test_y, num_classes: int) -> dict:
  """The linear probe's and the k-NN classifier's held-out accuracy on frozen features."""
  lin = linear_probe(train_x, train_y, test_x, test_y, num_classes=num_classes, l2=1e-3)
  knn = knn_accuracy(train_x, train_y, test_x, test_y, num_classes=num_classes)
  return dict(linear_probe=float(lin["accuracy"]), knn=float(knn))
