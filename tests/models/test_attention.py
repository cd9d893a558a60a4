"""Memory-efficient attention: parity with JAX's own dot_product_attention (an independent
implementation) in values and gradients, and memory that grows linearly with the sequence."""
import textwrap

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_python
from jaxgen import app
from jaxgen.errors import ConfigError
from jaxgen.models import layers
from jaxgen.models.attention import Transformer2D, position_embedding_2d
from jaxgen.models.chunked_attention import chunked_attention


def reference(q, k, v, mask=None):
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def qkv(b, t, s, n, h, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (b, t, n, h), dtype)
  k = jax.random.normal(ks[1], (b, s, n, h), dtype)
  v = jax.random.normal(ks[2], (b, s, n, h), dtype)
  return q, k, v, jax.random.normal(ks[3], (b, t, n, h), jnp.float32)


def masks(kind, b, t, s):
  if kind == "causal":
    return jnp.tril(jnp.ones((t, s), bool))[None, None]
  if kind == "padding":  # per-example key lengths: all, ..., 3
    lengths = jnp.maximum(jnp.arange(b, 0, -1) * s // b - jnp.where(jnp.arange(b) == b - 1,
                                                                      s // b, 0), 3)
    return (jnp.arange(s)[None] < lengths[:, None])[:, None, None, :]
  return None


def assert_matches(mine, ref, q, k, v, w):
  """Values, and the gradients of q, k, v under the cotangent w, of mine against ref."""
  np.testing.assert_allclose(mine(q, k, v), ref(q, k, v), atol=2e-6)
  loss = lambda f: lambda *a: (f(*a) * w).sum()
  for g_mine, g_ref in zip(jax.grad(loss(mine), (0, 1, 2))(q, k, v),
                           jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g_mine, g_ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,chunks,mask", [
    ((2, 37, 53, 3, 8), (16, 16), None),       # lengths that are no multiple of the chunks
    ((2, 64, 64, 2, 16), (16, 32), "causal"),  # the text tower's mask
    ((3, 10, 24, 2, 4), (4, 8), "padding"),    # key padding, one example without keys
    ((1, 20, 77, 4, 8), (512, 1024), None),    # chunks larger than the sequences
    ((2, 37, 53, 2, 32), (16, 16), "causal"),  # heads wider than 16: query-major backward
])
def test_values_and_gradients_match_jax_reference(shape, chunks, mask):
  b, t, s, n, h = shape
  q, k, v, w = qkv(b, t, s, n, h)
  m = masks(mask, b, t, s)
  mine = lambda q, k, v: chunked_attention(q, k, v, m, q_chunk=chunks[0], k_chunk=chunks[1])
  ref = lambda q, k, v: reference(q, k, v, m)
  assert_matches(mine, ref, q, k, v, w)


def _eqns(jaxpr, primitive: str):
  """Every `primitive` equation in a jaxpr and the jaxprs nested in it (loops, custom VJPs)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == primitive:
      yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _eqns(sub, primitive)


def _dot_generals(jaxpr):
  return _eqns(jaxpr, "dot_general")


def test_key_major_backward_has_only_plain_or_b_transposed_products():
  """Heads up to 16 wide take the key-major backward, in which every product's first operand
  contracts its last axis (XLA:CPU hands an A-transposed product, such as dq = K^T dS on the
  key block as it is sliced, to a slower matmul)."""
  from jaxgen.models import chunked_attention as ca
  b, t, s, n, h = 2, 48, 40, 2, 8
  assert h <= ca.KEY_MAJOR_MAX_HEAD_DIM
  q, k, v, w = qkv(b, t, s, n, h)
  grad = jax.grad(lambda q, k, v: (chunked_attention(q, k, v, q_chunk=16, k_chunk=8) * w).sum(),
                  (0, 1, 2))
  dots = list(_dot_generals(jax.make_jaxpr(grad)(q, k, v).jaxpr))
  assert len(dots) >= 7  # two in the forward, five in the backward
  for eqn in dots:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    assert tuple(lhs_contract) == (eqn.invars[0].aval.ndim - 1,), eqn


@pytest.mark.parametrize("h", [8, 32])  # the key-major and the query-major backward
def test_no_block_of_logits_is_scaled(h):
  """q is scaled by 1/sqrt(H) before the blocks: no block of logits (or of their gradient) is
  multiplied by a scalar, forward or backward (a pass over every block fewer; the SD 1.5
  first-level self-attention's forward alone 268 -> 238 ms)."""
  b, t, s, n = 2, 48, 40, 2
  q, k, v, w = qkv(b, t, s, n, h)
  grad = jax.grad(lambda q, k, v: (chunked_attention(q, k, v, q_chunk=16, k_chunk=8) * w).sum(),
                  (0, 1, 2))
  jaxpr = jax.make_jaxpr(grad)(q, k, v).jaxpr
  blocks = {(b, n, 16, 8), (b, n, 8, 16)}
  muls = [e for e in _eqns(jaxpr, "mul") if tuple(e.outvars[0].aval.shape) in blocks]
  assert muls  # the backward's p * (dp - delta) is there: the check sees the blocks
  scaled = [e for e in muls if any(getattr(x.aval, "ndim", 0) == 0 for x in e.invars)]
  assert not scaled, scaled


def test_default_chunks_differ_between_forward_and_backward(monkeypatch):
  """By default the forward's query chunk follows the block size and the backward's is a
  multiple of it; both over padded queries and a key-padding mask still match the reference."""
  from jaxgen.models import chunked_attention as ca
  monkeypatch.setattr(ca, "FORWARD_BLOCK_LOGITS", 2 ** 10)
  b, t, s, n, h = 2, 200, 100, 2, 8
  assert ca._default_q_chunks(b, n, t, s) == (64, 256)  # 200 queries padded to 256
  q, k, v, w = qkv(b, t, s, n, h)
  m = masks("padding", b, t, s)
  mine = lambda q, k, v: chunked_attention(q, k, v, m)
  ref = lambda q, k, v: reference(q, k, v, m)
  assert_matches(mine, ref, q, k, v, w)


@pytest.mark.parametrize("mask,group", [(None, 1), ("causal", 2), ("padding", 1), ("heads", 2)])
def test_head_loop_matches_jax_reference(mask, group):
  """Blocks of `group` heads at a time, each with the whole batch: a mask shared by all heads,
  a key padding mask per example, and one mask per head (looped with the heads), over padded
  queries and keys."""
  b, t, s, n, h = 3, 37, 53 if mask != "causal" else 37, 4, 8
  q, k, v, w = qkv(b, t, s, n, h)
  if mask == "heads":
    m = jax.random.bernoulli(jax.random.PRNGKey(5), 0.7, (1, n, t, s))
  else:
    m = masks(mask, b, t, s)
  mine = lambda q, k, v: chunked_attention(q, k, v, m, k_chunk=16, head_group=group)
  ref = lambda q, k, v: reference(q, k, v, m)
  assert_matches(mine, ref, q, k, v, w)
  for bad in (3, 0):
    with pytest.raises(ValueError, match="does not divide"):
      chunked_attention(q, k, v, m, head_group=bad)


def test_large_blocks_loop_over_heads_by_default(monkeypatch):
  """From HEAD_LOOP_MIN_LOGITS a head the default computes the heads in groups (a loop in the
  compiled program, the batch inside each block) and still matches the reference."""
  from jaxgen.models import chunked_attention as ca
  monkeypatch.setattr(ca, "HEAD_LOOP_MIN_LOGITS", 2 ** 12)
  monkeypatch.setattr(ca, "HEAD_GROUP_LOGITS", 2 ** 13)
  assert ca._default_head_group(2, 4, 60, 60) == (4, None)  # 3,600 < 2^12: one block
  b, t, s, n, h = 2, 110, 40, 4, 8
  assert ca._default_head_group(b, n, t, s) == (1, 64)  # 2 x 1 x 64 x 40 <= 2^13
  monkeypatch.setattr(ca, "HEAD_GROUP_LOGITS", 2 ** 15)
  # 256 queries, at most t; 3 heads do not divide 4
  assert ca._default_head_group(b, n, t, s) == (2, 110)
  q, k, v, w = qkv(b, t, s, n, h)
  m = masks("padding", b, t, s)
  mine = lambda q, k, v: chunked_attention(q, k, v, m)
  loops = lambda f: jax.jit(f).lower(q, k, v).as_text().count("while")
  assert loops(mine) > loops(lambda q, k, v: chunked_attention(q, k, v, m, head_group=n))
  assert_matches(mine, lambda q, k, v: reference(q, k, v, m), q, k, v, w)


def test_head_loop_keeps_a_batch_split_over_devices_split():
  """The loop runs over heads, never over the batch: with the batch split over two devices,
  the compiled forward + backward exchanges nothing between them and matches one device."""
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      from jaxgen.models import chunked_attention as ca
      ca.HEAD_LOOP_MIN_LOGITS, ca.HEAD_GROUP_LOGITS = 2 ** 10, 2 ** 11
      b, t, n, h = 4, 64, 4, 8
      assert ca._default_head_group(b, n, t, t)[0] < n  # the loop is taken
      q = jax.random.normal(jax.random.PRNGKey(0), (b, t, n, h))
      f = jax.jit(jax.grad(lambda q: (ca.chunked_attention(q, q * 0.5, q) ** 2).sum()))
      mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
      qs = jax.device_put(q, NamedSharding(mesh, P("data")))
      hlo = f.lower(qs).compile().as_text()
      for op in ("all-gather", "all-reduce", "collective-permute", "all-to-all"):
        assert op not in hlo, op
      np.testing.assert_allclose(f(qs), f(q), rtol=1e-5, atol=1e-6)
      print("OK")
  """)
  r = run_python(code, devices=2)
  assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr[-3000:]


def test_a_query_without_keys_gets_the_mean_value():
  """As the materialised softmax over equal logits, and transformers' additive finfo.min masks
  (JAX's own dot_product_attention returns zeros there)."""
  q, k, v, _ = qkv(2, 5, 12, 1, 4)
  mask = jnp.arange(12)[None, None, None, :] < jnp.array([12, 0])[:, None, None, None]
  out = chunked_attention(q, k, v, mask, q_chunk=2, k_chunk=4)
  np.testing.assert_allclose(out[1], jnp.broadcast_to(v[1].mean(0), out[1].shape), atol=1e-6)
  np.testing.assert_allclose(out[0], reference(q, k, v)[0], atol=2e-6)


def test_bfloat16_inputs_keep_float32_softmax():
  q, k, v, _ = qkv(2, 40, 40, 2, 16, jnp.bfloat16)
  out = chunked_attention(q, k, v, q_chunk=16, k_chunk=16)
  assert out.dtype == jnp.bfloat16
  exact = reference(*(x.astype(jnp.float32) for x in (q, k, v)))
  np.testing.assert_allclose(out.astype(jnp.float32), exact, atol=2e-2)


def test_bad_mask_is_named():
  q, k, v, _ = qkv(1, 8, 8, 2, 4)
  with pytest.raises(ValueError, match="does not broadcast"):
    chunked_attention(q, k, v, jnp.ones((1, 3, 8, 8), bool))


def temp_bytes(f, *args) -> int:
  return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_training_memory_grows_linearly_with_the_sequence():
  """Forward and backward at 32x32 and 64x64 positions (Stable Diffusion's latents at 256 and
  512 pixels): 4x the sequence costs the chunked attention about 4x the scratch memory, and
  the materialised one near 16x (9.5x here: its linear parts still count at 1024)."""
  def grad_fn(impl):
    def f(q, k, v):
      layers.set_attention(impl)
      try:
        return jax.grad(lambda q, k, v: layers.attention(q, k, v).sum(), (0, 1, 2))(q, k, v)
      finally:
        layers.set_attention("auto")
    return f

  grow = {}
  for impl in ("chunked", "xla"):
    small, large = (temp_bytes(grad_fn(impl), *qkv(1, s, s, 1, 32)[:3]) for s in (1024, 4096))
    grow[impl] = large / small
  assert grow["chunked"] < 5.0, grow
  assert grow["xla"] > 8.0, grow  # 16 in the limit; the linear parts count at 1024


def test_setting_chooses_the_implementation():
  q, k, v, _ = qkv(1, 8, 8, 1, 4)
  big = jnp.zeros((1, 2048, 1, 4))
  try:
    layers.set_attention("auto")
    assert layers.attention_implementation(q, k) == "xla"
    assert layers.attention_implementation(big, big) == "chunked"
    layers.set_attention("chunked")
    assert layers.attention_implementation(q, k) == "chunked"
    np.testing.assert_allclose(layers.attention(q, k, v), reference(q, k, v), atol=2e-6)
    with pytest.raises(ConfigError, match="attention must be one of"):
      layers.set_attention("flash")
  finally:
    layers.set_attention("auto")


def test_config_key_is_checked_and_applied(repo):
  with pytest.raises(ConfigError, match="attention must be one of"):
    app.load_config(f"{repo}/configs/ddpm.py:smoke", ["attention=flash"])
  config = app.load_config(f"{repo}/configs/ddpm.py:smoke", ["attention=chunked"])
  try:
    app.build_task(config)
    assert layers.attention_implementation(jnp.zeros((1, 4, 1, 4)), jnp.zeros((1, 4, 1, 4))) \
        == "chunked"
  finally:
    layers.set_attention("auto")


def test_transformer_same_output_with_either_implementation():
  block = Transformer2D(heads=2, head_dim=4, context_dim=6, groups=4)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 8))
  ctx = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 6))
  variables = block.init(jax.random.PRNGKey(0), x, ctx)
  outs = []
  for impl in ("xla", "chunked"):
    layers.set_attention(impl)
    outs.append(block.apply(variables, x, ctx))
  layers.set_attention("auto")
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


def test_position_embedding_adds_no_parameters_and_tells_places_apart():
  pe = position_embedding_2d(8, 8, 16)
  assert pe.shape == (64, 16)
  # every place has its own code, and the same place at another resolution keeps it
  assert len(np.unique(np.round(np.asarray(pe), 5), axis=0)) == 64
  np.testing.assert_allclose(position_embedding_2d(4, 4, 16)[5], pe[2 * 8 + 2], atol=1e-6)
  with pytest.raises(ValueError, match="divisible by 4"):
    position_embedding_2d(4, 4, 6)
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 4, 4, 8))
  plain, placed = (Transformer2D(heads=2, head_dim=4, groups=4, position_embedding=p)
                   for p in (False, True))
  variables = plain.init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(variables) == jax.tree.structure(placed.init(jax.random.PRNGKey(0), x))
  assert not np.allclose(plain.apply(variables, x), placed.apply(variables, x))
