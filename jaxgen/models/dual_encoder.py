"""The CLIP-style dual encoder (a training module): image tower + projection, text tower with its
projection, and the learnable temperature (and SigLIP's bias)."""
from __future__ import annotations

import flax.linen as nn
import jax


class DualEncoderModule(nn.Module):
  """Image tower + projection, text tower (with its projection), learnable temperature."""
  image_encoder: nn.Module
  text_encoder: nn.Module
  embed_dim: int
  loss: str = "clip"                 # clip | siglip
  init_logit_scale: float = 2.6593   # log(1 / 0.07), CLIP's initial temperature
  init_bias: float = -10.0           # SigLIP's initial bias
  lock_image: bool = False           # LiT: the image tower runs frozen (eval mode, no gradient)
  lock_text: bool = False

  def setup(self):
    self.image_proj = nn.Dense(self.embed_dim, use_bias=False,
                               kernel_init=nn.initializers.lecun_normal(), name="image_proj")
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.init_logit_scale),
                                  ())
    if self.loss == "siglip":
      self.bias = self.param("bias", nn.initializers.constant(self.init_bias), ())

  def embed_image(self, x, *, train: bool = False):
    h = self.image_encoder(x, train=train and not self.lock_image)
    if self.lock_image:
      h = jax.lax.stop_gradient(h)
    return self.image_proj(h)

  def text_outputs(self, input_ids, attention_mask=None):
    out = self.text_encoder(input_ids, attention_mask)
    return jax.lax.stop_gradient(out) if self.lock_text else out

  def embed_text(self, input_ids, attention_mask=None):
    return self.text_outputs(input_ids, attention_mask)["text_embeds"]

  def __call__(self, x, input_ids, attention_mask=None, *, train: bool = False):
    return self.embed_image(x, train=train), self.embed_text(input_ids, attention_mask)
