"""Distribution distances between image sets in a feature space: Frechet distance (FID when the
features are FID-Inception's), precision/recall (Kynkaenniemi et al. 2019) and density/coverage
(Naeem et al. 2020, which outliers in the real set do not inflate).

The feature network is pluggable: `jaxgen.eval.quality` uses a classifier trained on the real
data (runs offline); `InceptionFeatures` loads the standard FID Inception from a weights file.
"""
from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import ShapeError
from jaxgen.images import to_unit


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  f = np.asarray(features, np.float64)
  return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

  Tr((S1 S2)^(1/2)) = sum of sqrt(eigenvalues of S1^(1/2) S2 S1^(1/2)), a symmetric PSD
  matrix: more stable than a general matrix square root of S1 S2.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.atleast_2d(cov1).astype(np.float64), np.atleast_2d(cov2).astype(np.float64)
  w, v = np.linalg.eigh(cov1)
  sqrt1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  m = sqrt1 @ cov2 @ sqrt1
  tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt)


@jax.jit
def _sq_dists(a, b):
  return jnp.maximum(jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2 * a @ b.T, 0.0)


def _pairwise(a: np.ndarray, b: np.ndarray, chunk: int = 1024) -> np.ndarray:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return np.concatenate([np.asarray(_sq_dists(a[i:i + chunk], b))
                         for i in range(0, len(a), chunk)])


def _knn_radii(feats: np.ndarray, k: int) -> np.ndarray:
  d = _pairwise(feats, feats)
  return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
  """Precision: share of fakes inside the k-NN balls of the reals; recall: share of reals
  inside the k-NN balls of the fakes (squared distances compared with squared radii)."""
  real_r, fake_r = _knn_radii(real, k), _knn_radii(fake, k)
  d = _pairwise(fake, real)  # [n_fake, n_real]
  precision = float(np.mean(np.any(d <= real_r[None, :], axis=1)))
  recall = float(np.mean(np.any(d.T <= fake_r[None, :], axis=1)))
  return precision, recall


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> tuple[float, float]:
  """Density: how many real k-NN balls hold each fake, over k (about 1 for a perfect generator);
  coverage: share of real balls that hold at least one fake."""
  inside = _pairwise(fake, real) <= _knn_radii(real, k)[None, :]  # [n_fake, n_real]
  return float(inside.sum() / (k * len(fake))), float(np.mean(inside.any(axis=0)))


class InceptionFeatures:
  """The FID Inception network with weights from pytorch-fid's pt_inception-2015-12-05 file."""

  def __init__(self, variables):
    from jaxgen.models.inception import FIDInceptionV3
    self.module = FIDInceptionV3()
    self.variables = variables

  @classmethod
  def from_file(cls, path: str | pathlib.Path) -> InceptionFeatures:
    from jaxgen.convert.torch_pickle import load_torch_state_dict
    from jaxgen.models.inception import FIDInceptionV3, params_from_torch
    template = jax.eval_shape(lambda: FIDInceptionV3().init(
        jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3)), logits=True))
    return cls(params_from_torch(load_torch_state_dict(path), template))

  @functools.partial(jax.jit, static_argnums=0)
  def _features(self, variables, images):
    return self.module.apply(variables, images)

  def __call__(self, images) -> jax.Array:
    """images: uint8 or [0, 1] float, [B, H, W, 1 or 3] -> [B, 2048]."""
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ShapeError(f"FID Inception takes images [B, H, W, 1 or 3]; got {images.shape}.")
    images = to_unit(images)
    if images.shape[-1] == 1:
      images = jnp.repeat(images, 3, axis=-1)
    return self._features(self.variables, images)

  def __hash__(self):
    return id(self)

  def __eq__(self, other):
    return self is other
