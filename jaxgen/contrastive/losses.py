"""Contrastive losses over the global batch: SimCLR's NT-Xent, CLIP's InfoNCE, SigLIP's sigmoid.

Each takes embeddings of the whole (global) batch and returns `(loss, metrics)` in float32.
Under jit with the batch sharded on the mesh's Auto 'data' axis, the similarity matrices below
are global [N, N] arrays (XLA gathers what it needs), so every example is a negative for every
other, whatever the number of devices. Nothing here may compute a per-shard loss: no
shard_map, no pmean of local losses. (With an Explicit-axis mesh, reshard the embeddings to P()
before calling.)
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxgen.errors import ShapeError

# CLIP clips the learned inverse temperature so that logits are scaled by at most 100.
MAX_LOGIT_SCALE = math.log(100.0)
# Masks self-similarity out of the softmax; finite so that no inf - inf appears in the grads.
_MASK = -1e9


def l2_normalize(x, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  x = jnp.asarray(x, jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps))


def _similarity(a, b) -> jax.Array:
  """a @ b.T at full float32 precision (the default may use TF32/bf16 passes on GPU/TPU)."""
  return jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)


def _check_pair(a, b, what: str):
  if a.ndim != 2 or a.shape != b.shape:
    raise ShapeError(f"{what}: expected two [N, D] arrays of the same shape, got {a.shape} and "
                     f"{b.shape}")


def _cross_entropy(logits, labels) -> jax.Array:
  """Mean cross-entropy of integer labels; float32 [N, C], [N] -> []."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def _accuracy(logits, labels) -> jax.Array:
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def nt_xent(z1, z2, temperature=0.1) -> tuple[jax.Array, dict]:
  """SimCLR's NT-Xent (Chen et al. 2020, eq. 1) for views z1, z2 [N, D] of the same N images.

  Cosine similarities / temperature over the 2N views; each anchor's positive is the other view
  of its image and the 2N - 2 other views are negatives; the loss is the mean over 2N anchors.
  metrics: `accuracy` (positive ranked first among the 2N - 1 candidates).
  """
  _check_pair(z1, z2, "nt_xent")
  n = z1.shape[0]
  z = l2_normalize(jnp.concatenate([z1, z2], axis=0))  # [2N, D]
  logits = _similarity(z, z) / jnp.asarray(temperature, jnp.float32)  # [2N, 2N]
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), _MASK, logits)
  positives = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  loss = _cross_entropy(logits, positives)
  return loss, {"accuracy": _accuracy(logits, positives)}


def _check_negatives(negatives, negative_mask, txt_emb, what: str):
  if negatives is None:
    return
  if negatives.ndim != 2 or negatives.shape[1] != txt_emb.shape[1]:
    raise ShapeError(f"{what}: hard negatives must be [M, {txt_emb.shape[1]}]; got "
                     f"{negatives.shape}")
  if negative_mask is not None and negative_mask.shape != negatives.shape[:1]:
    raise ShapeError(f"{what}: negative_mask must be [{negatives.shape[0]}]; got "
                     f"{negative_mask.shape}")


def clip_loss(img_emb, txt_emb, logit_scale, negatives=None,
              negative_mask=None) -> tuple[jax.Array, dict]:
  """CLIP's symmetric InfoNCE (Radford et al. 2021, fig. 3) over N matching pairs [N, D].

  `logit_scale` is the learned log inverse temperature (initialised to log(1 / 0.07)); it is
  clipped at log(100) in the forward pass, which also stops its gradient when above the clip.
  negatives [M, D] (NegCLIP, Yuksekgonul et al. 2023): embeddings of hard-negative texts (the
  captions' twins, jaxgen.text.negatives), extra columns of every image's softmax over texts;
  negative_mask [M] bool says which count. The text->image direction is unchanged.
  metrics: image->text and text->image top-1 accuracy, and the scale exp(logit_scale) used.
  """
  _check_pair(img_emb, txt_emb, "clip_loss")
  _check_negatives(negatives, negative_mask, txt_emb, "clip_loss")
  scale = jnp.exp(jnp.minimum(jnp.asarray(logit_scale, jnp.float32), MAX_LOGIT_SCALE))
  img = l2_normalize(img_emb)
  # [N images, N texts]
  logits = scale * _similarity(img, l2_normalize(txt_emb))
  labels = jnp.arange(img_emb.shape[0])
  i2t = logits
  if negatives is not None:
    extra = scale * _similarity(img, l2_normalize(negatives))
    if negative_mask is not None:
      extra = jnp.where(negative_mask[None, :], extra, _MASK)
    i2t = jnp.concatenate([logits, extra], axis=1)
  loss = 0.5 * (_cross_entropy(i2t, labels) + _cross_entropy(logits.T, labels))
  metrics = {"i2t_accuracy": _accuracy(i2t, labels),
             "t2i_accuracy": _accuracy(logits.T, labels), "logit_scale": scale}
  return loss, metrics


def siglip_loss(img_emb, txt_emb, t_prime, bias, negatives=None,
                negative_mask=None) -> tuple[jax.Array, dict]:
  """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, algorithm 1) over N pairs [N, D].

  logits = t * cos(img_i, txt_j) + b with t = exp(t'); labels +1 on the diagonal, -1 elsewhere;
  loss = -sum log sigmoid(labels * logits) / N (paper init: t' = log 10, b = -10).
  negatives [M, D], negative_mask [M]: hard-negative texts, labelled -1 for every image.
  metrics: image->text top-1 accuracy, t and b.
  """
  _check_pair(img_emb, txt_emb, "siglip_loss")
  _check_negatives(negatives, negative_mask, txt_emb, "siglip_loss")
  n = img_emb.shape[0]
  t = jnp.exp(jnp.asarray(t_prime, jnp.float32))
  b = jnp.asarray(bias, jnp.float32)
  img = l2_normalize(img_emb)
  logits = t * _similarity(img, l2_normalize(txt_emb)) + b
  labels = 2.0 * jnp.eye(n, dtype=jnp.float32) - 1.0
  loss = -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / n
  if negatives is not None:
    extra = jax.nn.log_sigmoid(-(t * _similarity(img, l2_normalize(negatives)) + b))
    if negative_mask is not None:
      extra = jnp.where(negative_mask[None, :], extra, 0.0)
    loss = loss - jnp.sum(extra) / n
  metrics = {"i2t_accuracy": _accuracy(logits, jnp.arange(n)), "temperature": t, "bias": b}
  return loss, metrics
