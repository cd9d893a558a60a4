"""Pure float32 loss functions of the latent-diffusion first stage: pixel losses, the hinge GAN
losses of a patch discriminator, an LPIPS-style feature distance and running latent statistics.

Every function here is jittable and differentiable; weights and schedules belong to the task.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from jaxgen.images import to_signed


def _per_image_sum(v) -> jax.Array:
  return v.reshape(v.shape[0], -1).sum(-1)


def l1_loss(x, y) -> jax.Array:
  """sum |x - y| over all but the batch axis -> [B]. Like the LDM autoencoder, the loss is
  summed over pixels (not averaged), so its KL weights (1e-6) carry over unchanged."""
  return _per_image_sum(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))


def l2_loss(x, y) -> jax.Array:
  """sum (x - y)^2 over all but the batch axis -> [B]."""
  return _per_image_sum(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)))


def hinge_d_loss(logits_real, logits_fake) -> jax.Array:
  """The discriminator's hinge loss (Lim & Ye 2017): real logits pushed above 1, fake below -1."""
  real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
  fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
  return 0.5 * (real + fake)


def hinge_g_loss(logits_fake) -> jax.Array:
  """The generator's side of the hinge GAN: raise the discriminator's logits on its outputs."""
  return -jnp.mean(logits_fake.astype(jnp.float32))


def unit_normalize(f, eps: float = 1e-10) -> jax.Array:
  """Scales each position's feature vector [..., C] to unit length (LPIPS' normalisation)."""
  f = f.astype(jnp.float32)
  return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + eps)


def perceptual_distance(feats_a: Sequence[jax.Array], feats_b: Sequence[jax.Array]) -> jax.Array:
  """LPIPS (Zhang et al. 2018) with all channel weights 1: for each stage's map [B, h, w, C],
  the squared difference of the unit-normalised features summed over channels and averaged over
  space; summed over stages -> [B]."""
  total = 0.0
  for a, b in zip(feats_a, feats_b, strict=True):
    d = jnp.sum(jnp.square(unit_normalize(a) - unit_normalize(b)), axis=-1)  # [B, h, w]
    total = total + d.reshape(d.shape[0], -1).mean(-1)
  return total


def adaptive_weight(grad_rec, grad_gan, max_weight: float = 1e4) -> jax.Array:
  """||grad of the reconstruction loss|| / ||grad of the generator's GAN loss||, clipped, with
  no gradient of its own: the GAN term then pulls about as hard as the reconstruction, whatever
  the latter's scale (Esser et al. 2021, eq. 7)."""
  norm = lambda t: jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                                for g in jax.tree.leaves(t)))
  return jax.lax.stop_gradient(jnp.clip(norm(grad_rec) / (norm(grad_gan) + 1e-4), 0.0,
                                        max_weight))


def moments(z) -> tuple[jax.Array, jax.Array]:
  """Mean and (biased) variance over all elements of z, in float32."""
  z = z.astype(jnp.float32)
  mean = jnp.mean(z)
  return mean, jnp.mean(jnp.square(z - mean))


def update_latent_stats(stats: dict, z, count, momentum: float) -> dict:
  """One step of an exponential moving average of z's mean and variance, as BatchNorm keeps.

  `count` is the number of earlier updates. The batch's weight is (1 - m) / (1 - m^(count+1))
  rather than 1 - m, which makes the stored value the bias-corrected average (as in Adam): the
  first batch replaces the initial guess and the weight settles to 1 - m after ~1 / (1 - m)
  steps, so short runs do not report statistics dragged towards the initial (0, 1).
  """
  mean, var = moments(jax.lax.stop_gradient(z))
  t = jnp.asarray(count, jnp.float32) + 1.0
  w = (1.0 - momentum) / (1.0 - jnp.power(jnp.float32(momentum), t))
  return {"mean": stats["mean"] + w * (mean - stats["mean"]),
          "var": stats["var"] + w * (var - stats["var"])}


class FeatureDistance:
  """perceptual_distance() in the stage outputs of a frozen classifier: images [B, H, W, C] in
  [0, 1] -> [B]. The classifier's variables are constants of the traced function (never
  parameters of the model being trained), so the feature network is not trained with it."""

  def __init__(self, module, variables, stages: Sequence[str], **apply_kwargs):
    self.module, self.variables = module, variables
    self.stages, self.apply_kwargs = tuple(stages), apply_kwargs

  @classmethod
  def from_feature_net(cls, net) -> FeatureDistance:
    """From a jaxgen.eval.quality.FeatureNet: an ImageClassifier with a ResNet trunk, whose
    last block of each stage gives one feature map."""
    sizes = net.module.stage_sizes
    stages = [f"stage{i + 1}_block{n}" for i, n in enumerate(sizes)]
    return cls(net.module, net.variables, stages, train=False)

  def features(self, images) -> list[jax.Array]:
    keep = lambda mdl, method: method == "__call__" and mdl.name in self.stages
    _, state = self.module.apply(self.variables, to_signed(images), capture_intermediates=keep,
                                 mutable=["intermediates"], **self.apply_kwargs)
    found = {}
    for path, value in jax.tree_util.tree_flatten_with_path(
        state["intermediates"], is_leaf=lambda v: isinstance(v, tuple))[0]:
      found[path[-2].key] = value[0]  # [..., stage name, "__call__"] -> (output,)
    missing = [s for s in self.stages if s not in found]
    if missing:
      raise ValueError(f"The feature network has no submodules {missing}; it has "
                       f"{sorted(found)}.")
    return [found[s] for s in self.stages]

  def __call__(self, a, b) -> jax.Array:
    return perceptual_distance(self.features(a), self.features(b))
