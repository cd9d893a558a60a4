"""Held-out reconstruction metrics of an autoencoder, from a predict function and images."""
from __future__ import annotations

import math

import jax
import numpy as np

from jaxgen.eval.image_metrics import psnr, ssim
from jaxgen.images import map_batches, to_unit


def reconstruction_metrics(predict, images: np.ndarray, batch_size: int, key, *,
                           likelihood: bool, variational: bool) -> dict:
  """predict(images uint8 [b, ...], key) -> dict(rec [b], kl [b], recon [b, H, W, C] in [0, 1]),
  jittable. Returns mean PSNR, SSIM (images of at least 11 px), rec, kl, and with a likelihood
  loss the NLL (and for a VAE the negative ELBO, also in bits per dimension)."""
  dims = math.prod(images.shape[1:])

  @jax.jit
  def per_batch(batch, k):
    out = predict(batch["image"], k)
    x = to_unit(batch["image"])
    metrics = dict(rec=out["rec"], kl=out["kl"], psnr=psnr(x, out["recon"]))
    if min(x.shape[1:3]) >= 11:  # SSIM's 11x11 window
      metrics["ssim"] = ssim(x, out["recon"])
    return metrics

  r = map_batches(per_batch, {"image": images}, min(batch_size, len(images)), key)
  out = dict(num_images=len(r["rec"]), psnr=float(r["psnr"].mean()),
             rec=float(r["rec"].mean()), kl=float(r["kl"].mean()))
  if "ssim" in r:
    out["ssim"] = float(r["ssim"].mean())
  if likelihood:
    out["nll"] = out["rec"]
    if variational:
      neg_elbo = r["rec"] + r["kl"]
      out["neg_elbo"] = float(neg_elbo.mean())
      out["neg_elbo_bits_per_dim"] = float(neg_elbo.mean() / (dims * math.log(2.0)))
  return out
