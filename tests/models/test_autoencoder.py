import jax
import jax.numpy as jnp
import pytest

from jaxgen.models.autoencoder import Autoencoder
from jaxgen.models.layers import Downsample, Upsample


@pytest.mark.parametrize("latent_dim, variational, latent_shape", [
    (6, True, (6,)), (0, True, (7, 7, 3)), (0, False, (7, 7, 3)), (5, False, (5,))])
def test_autoencoder_shapes(latent_dim, variational, latent_shape):
  m = Autoencoder(in_channels=1, out_channels=1, image_size=28, ch=8, ch_mult=(1, 2, 2),
                  z_channels=3, latent_dim=latent_dim, variational=variational, groups=4,
                  mid_attention=True)
  x = jnp.zeros((2, 28, 28, 1))
  params = m.init(jax.random.PRNGKey(0), x)
  mean, logvar = m.apply(params, x, method=Autoencoder.encode)
  assert mean.shape == (2,) + latent_shape and m.latent_shape == latent_shape
  assert (logvar is None) == (not variational)
  assert m.apply(params, mean, method=Autoencoder.decode).shape == (2, 28, 28, 1)


def test_down_and_upsampling_shapes():
  x = jnp.zeros((1, 28, 28, 4))
  for asym in (True, False):
    d = Downsample(4, asymmetric=asym)
    assert d.apply(d.init(jax.random.PRNGKey(0), x), x).shape == (1, 14, 14, 4)
  u = Upsample(2)
  assert u.apply(u.init(jax.random.PRNGKey(0), x), x).shape == (1, 56, 56, 2)
