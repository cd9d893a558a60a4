import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.errors import ConfigError, ShapeError
from jaxgen.models import unet as unet_lib
from jaxgen.models.unet import UNet

KEY = jax.random.PRNGKey(0)


def count(variables) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def shapes(module, *args, **kwargs):
  return jax.eval_shape(lambda: module.init(KEY, *args, **kwargs))


def random_variables(module, *args, seed=0, **kwargs):
  """Random parameters of the right shapes from numpy: compiling module.init takes ~20 s."""
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    shape, name = leaf.shape, path[-1].key
    if name == "kernel":
      return rng.randn(*shape).astype(np.float32) / np.sqrt(np.prod(shape[:-1]))
    if name == "scale":
      return 1.0 + 0.1 * rng.randn(*shape).astype(np.float32)
    return 0.1 * rng.randn(*shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes(module, *args, **kwargs))


def tiny(**kw) -> UNet:
  cfg = dict(out_channels=2, block_channels=(8, 16), layers_per_block=1,
             attn_levels=(False, True), groups=4, num_heads=2)
  return UNet(**{**cfg, **kw})


def test_self_attention_unet_with_classes_and_remat():
  m = tiny(num_classes=3, dropout=0.1)
  x, t = jnp.ones((2, 8, 8, 3)), jnp.array([1, 999])
  variables = random_variables(m, x, t, labels=jnp.array([0, 3]))
  # num_classes rows + the null label's, which classifier-free guidance uses.
  assert variables["params"]["class_embedding"]["embedding"].shape == (4, 32)
  assert m.null_label_id == 3

  def run(module):
    fn = lambda v: module.apply(v, x, t, labels=jnp.array([module.null_label_id, 1]),
                                train=True, rngs={"dropout": KEY})
    return jax.jit(fn)(variables)

  y = run(m)
  assert y.shape == (2, 8, 8, 2) and y.dtype == jnp.float32
  assert np.isfinite(np.asarray(y)).all()
  # Same parameter tree and the same dropout masks under nn.remat.
  np.testing.assert_array_equal(y, run(m.clone(remat=True)))


@pytest.mark.parametrize("linear", [False, True])
def test_transformer_unet_shapes(linear):
  m = tiny(attention="transformer", num_heads=(1, 2), context_dim=6, transformer_depth=(1, 2),
           use_linear_projection=linear)
  x, ctx = jnp.ones((1, 8, 4, 3)), jnp.ones((1, 5, 6))
  v = shapes(m, x, 7.5, context=ctx)
  y = jax.eval_shape(lambda p: m.apply(p, x, 7.5, context=ctx), v)
  assert y.shape == (1, 8, 4, 2)
  blocks = v["params"]["up_0_attn_1"]
  assert set(blocks) == {"norm", "proj_in", "proj_out", "transformer_blocks_0",
                         "transformer_blocks_1"}
  assert len(blocks["proj_in"]["kernel"].shape) == (2 if linear else 4)
  assert set(blocks["transformer_blocks_0"]) == {"norm1", "attn1", "norm2", "attn2", "norm3",
                                                 "ff"}
  # Without context_dim the transformer blocks have self-attention only.
  v = shapes(tiny(attention="transformer"), x, 1)
  assert "attn2" not in v["params"]["mid_attn_0"]["transformer_blocks_0"]


def test_input_errors_name_the_problem():
  m = tiny()
  with pytest.raises(ShapeError, match=r"multiples of 2 .* got 7x8"):
    m.init(KEY, jnp.ones((1, 7, 8, 3)), jnp.ones((1,)))
  with pytest.raises(ShapeError, match=r"NHWC"):
    m.init(KEY, jnp.ones((8, 8, 3)), jnp.ones((1,)))
  with pytest.raises(ConfigError, match=r"labels given to a U-Net built without classes"):
    m.init(KEY, jnp.ones((1, 8, 8, 3)), jnp.ones((1,)), labels=jnp.zeros((1,), jnp.int32))
  with pytest.raises(ConfigError, match=r"context given to a U-Net built without cross-attention"):
    m.init(KEY, jnp.ones((1, 8, 8, 3)), jnp.ones((1,)), context=jnp.ones((1, 3, 4)))
  with pytest.raises(ConfigError, match=r"labels required"):
    tiny(num_classes=2).init(KEY, jnp.ones((1, 8, 8, 3)), jnp.ones((1,)))
  cross = tiny(attention="transformer", context_dim=4)
  with pytest.raises(ConfigError, match=r"context required"):
    cross.init(KEY, jnp.ones((1, 8, 8, 3)), jnp.ones((1,)))
  with pytest.raises(ShapeError, match=r"context: expected \[1, length, 4\], got \[1, 3, 5\]"):
    cross.init(KEY, jnp.ones((1, 8, 8, 3)), jnp.ones((1,)), context=jnp.ones((1, 3, 5)))
  with pytest.raises(ShapeError, match=r"t: expected a scalar or shape \[1\]"):
    m.init(KEY, jnp.ones((1, 8, 8, 3)), jnp.ones((2,)))
  with pytest.raises(ConfigError, match=r"attn_levels has 3 entries for 2 levels"):
    tiny(attn_levels=(True, True, True)).init(KEY, jnp.ones((1, 8, 8, 3)), 1)
  with pytest.raises(ConfigError, match=r"not divisible by 3 attention heads"):
    tiny(num_heads=3).init(KEY, jnp.ones((1, 8, 8, 3)), 1)


def test_published_parameter_counts():
  # diffusers' counts: google/ddpm-cifar10-32, SD 1.5 and SD 2.1 U-Nets (cross-checked
  # against diffusers in tests/convert).
  assert count(shapes(unet_lib.ddpm_cifar10(), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)))) \
      == 35_746_307
  for version, n in ((1, 859_520_964), (2, 865_910_724)):
    m = unet_lib.stable_diffusion(version)
    v = shapes(m, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
               context=jnp.zeros((1, 1, m.context_dim)))
    assert count(v) == n


def test_remat_wraps_every_block():
  m = tiny(attention="transformer", context_dim=4, dropout=0.2)
  x, t, ctx = jnp.ones((2, 8, 8, 3)), jnp.array([5, 50]), jnp.ones((2, 3, 4))
  v = shapes(m, x, t, context=ctx)

  def grad_primitives(module):
    loss = lambda p: jnp.sum(module.apply(p, x, t, context=ctx, train=True,
                                          rngs={"dropout": KEY}) ** 2)
    return [e.primitive.name for e in jax.make_jaxpr(jax.grad(loss))(v).jaxpr.eqns]

  # 6 ResBlocks and 3 transformer blocks on the way down and in the middle, 6 on the way up.
  assert grad_primitives(m.clone(remat=True)).count("remat2") == 12
  assert "remat2" not in grad_primitives(m)


def test_bfloat16_compute_stays_close_to_float32():
  m = tiny(attention="transformer", context_dim=4)
  rng = np.random.RandomState(0)
  x, ctx = rng.randn(2, 8, 8, 3).astype(np.float32), rng.randn(2, 3, 4).astype(np.float32)
  t = jnp.array([5, 50])
  v = random_variables(m, x, t, context=ctx)
  y32 = jax.jit(m.apply)(v, x, t, context=ctx)
  y16 = jax.jit(m.clone(dtype=jnp.bfloat16).apply)(v, x, t, context=ctx)
  assert y16.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(y16 - y32))) < 0.05 * float(jnp.max(jnp.abs(y32)))
