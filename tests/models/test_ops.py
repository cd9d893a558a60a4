"""jaxgen's fast layers: the fused GroupNorm(+SiLU) against flax's GroupNorm then nn.silu with
autodiff gradients; the dropout masks' rate, independence, keys and sharding; the convolutions
with matmul filter gradients against flax's nn.Conv differentiated by XLA."""
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_python
from jaxgen import app
from jaxgen.errors import ConfigError
from jaxgen.models import ops
from jaxgen.models.ops import Dropout, GroupNorm, dropout_keep_mask, group_norm_silu


def _inputs(shape, seed=0):
  rng = np.random.RandomState(seed)
  c = shape[-1]
  x = (2.0 * rng.randn(*shape) + 0.7).astype(np.float32)
  scale = (1.0 + 0.2 * rng.randn(c)).astype(np.float32)
  bias = (0.3 * rng.randn(c)).astype(np.float32)
  cot = rng.randn(*shape).astype(np.float32)
  return x, scale, bias, cot


def _flax(x, scale, bias, groups, eps, silu):
  y = nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False).apply(
      {"params": {"scale": scale, "bias": bias}}, x)
  return nn.silu(y) if silu else y


@pytest.mark.parametrize("shape,groups,silu", [((3, 5, 4, 8), 4, True), ((2, 6, 6, 12), 3, False),
                                               ((2, 4, 4, 6), 6, True)])
def test_value_and_gradients_match_flax(shape, groups, silu):
  x, scale, bias, cot = _inputs(shape)

  def loss(fn):
    return lambda x, s, b: jnp.sum(fn(x, s, b, groups, 1e-5, silu) * cot)

  ours = jax.jit(jax.value_and_grad(loss(group_norm_silu), argnums=(0, 1, 2)))(x, scale, bias)
  ref = jax.jit(jax.value_and_grad(loss(_flax), argnums=(0, 1, 2)))(x, scale, bias)
  np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5, atol=1e-4)
  for a, b, name in zip(ours[1], ref[1], ("dx", "dscale", "dbias")):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5 * np.abs(b).max(), err_msg=name)


def test_module_has_flax_parameters_and_bfloat16_input():
  x, scale, bias, _ = _inputs((2, 4, 4, 8))
  module = GroupNorm(num_groups=2, epsilon=1e-6, act="silu")
  variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x))
  flax_vars = jax.eval_shape(lambda: nn.GroupNorm(2).init(jax.random.PRNGKey(0), x))
  assert jax.tree.map(lambda s: (s.shape, s.dtype), variables) == \
      jax.tree.map(lambda s: (s.shape, s.dtype), flax_vars)
  params = {"params": {"scale": scale, "bias": bias}}
  xb = jnp.asarray(x, jnp.bfloat16)
  out = module.apply(params, xb)
  assert out.dtype == jnp.float32  # bfloat16 input promoted with float32 parameters, as flax does
  ref = _flax(xb.astype(jnp.float32), scale, bias, 2, 1e-6, True)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  dx = jax.grad(lambda x: jnp.sum(module.apply(params, x)))(xb)
  assert dx.dtype == jnp.bfloat16


def test_errors_name_the_problem():
  x = jnp.zeros((1, 2, 2, 6))
  with pytest.raises(ValueError, match="6 channels do not split into 4 groups"):
    GroupNorm(num_groups=4).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="act must be None or 'silu'"):
    GroupNorm(num_groups=2, act="relu").init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="NHWC"):
    GroupNorm(num_groups=2).init(jax.random.PRNGKey(0), jnp.zeros((2, 6)))


def test_dropout_mask_rate_independence_and_keys():
  key = jax.random.PRNGKey(7)
  shape = (16, 8, 8, 64)
  mask = np.asarray(dropout_keep_mask(key, shape, 0.9))
  n = mask.size
  assert abs(mask.mean() - 0.9) < 5 * np.sqrt(0.9 * 0.1 / n)
  # the two words of each hash fill the two halves of the last axis: they must not agree more
  # than independent draws would (p^2 + (1-p)^2 = 0.82)
  agree = (mask[..., :32] == mask[..., 32:]).mean()
  assert abs(agree - 0.82) < 5 * np.sqrt(0.82 * 0.18 / (n / 2))
  # nor repeat along any axis
  assert (mask[0] != mask[1]).any() and (mask[:, 0] != mask[:, 1]).any()
  assert np.array_equal(mask, np.asarray(dropout_keep_mask(key, shape, 0.9)))
  assert not np.array_equal(mask, np.asarray(dropout_keep_mask(jax.random.PRNGKey(8), shape, 0.9)))
  typed = np.asarray(dropout_keep_mask(jax.random.wrap_key_data(key), shape, 0.9))
  assert np.array_equal(mask, typed)
  odd = np.asarray(dropout_keep_mask(key, (3, 5, 7), 0.5))
  assert odd.shape == (3, 5, 7) and 0.3 < odd.mean() < 0.7
  assert np.asarray(dropout_keep_mask(key, (1000,), 0.0)).sum() == 0
  assert np.asarray(dropout_keep_mask(key, (1000,), 1.0)).all()


def test_dropout_module_scales_kept_inputs_and_passes_through_when_deterministic():
  x = jnp.asarray(np.random.RandomState(0).rand(4, 6, 6, 8).astype(np.float32)) + 1.0
  key = jax.random.PRNGKey(3)
  drop = Dropout(0.25)
  assert drop.apply({}, x, deterministic=True) is x
  y = drop.apply({}, x, deterministic=False, rngs={"dropout": key})
  kept = np.asarray(y) != 0
  np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
  assert 0.65 < kept.mean() < 0.85
  g = jax.grad(lambda x: jnp.sum(drop.apply({}, x, deterministic=False, rngs={"dropout": key})))(x)
  np.testing.assert_allclose(g, kept / 0.75, rtol=1e-6)
  none = Dropout(1.0).apply({}, x, deterministic=False, rngs={"dropout": key})
  assert np.asarray(none).sum() == 0


def test_dropout_mask_split_over_eight_devices_is_the_same_and_local():
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      from jaxgen.models.ops import dropout_keep_mask
      mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
      key = jax.random.PRNGKey(1)
      x = jax.device_put(jnp.ones((16, 4, 4, 6)), NamedSharding(mesh, P("data")))
      f = jax.jit(lambda k, x: jnp.where(dropout_keep_mask(k, x.shape, 0.8), x, 0.0),
                  out_shardings=NamedSharding(mesh, P("data")))
      hlo = f.lower(key, x).compile().as_text()
      assert not any(c in hlo for c in ("all-gather", "all-to-all", "collective-permute",
                                        "all-reduce")), "dropout masks needed communication"
      one = np.asarray(jnp.where(dropout_keep_mask(key, x.shape, 0.8), 1.0, 0.0))
      assert np.array_equal(np.asarray(f(key, x)), one)
      print("OK")
  """)
  r = run_python(code, devices=8)
  assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr[-3000:]


@pytest.fixture
def conv_setting():
  """Restores the process-wide convolution setting after a test that changes it."""
  yield ops.set_conv
  ops.set_conv("auto")


def _conv_case(k, hw, cin, cout, seed=0, **kwargs):
  rng = np.random.RandomState(seed)
  x = rng.randn(2, hw, hw + 1, cin).astype(np.float32)
  module, reference = ops.Conv(cout, (k, k), **kwargs), nn.Conv(cout, (k, k), **kwargs)
  params = reference.init(jax.random.PRNGKey(seed), x)
  cot = rng.randn(*reference.apply(params, x).shape).astype(np.float32)

  def value_and_grads(m):
    loss = lambda p, x: jnp.sum(m.apply(p, x).astype(jnp.float32) * cot)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

  return module, reference, params, x, value_and_grads


# 3x3 at 4x5 positions: im2col matmuls (forward, both gradients); at 7x8 (and the 1x1 at 6x7),
# XLA's forward (few channels, over 64 positions per device) and the gradients as matmuls;
# at 16x17: XLA's
# forward and input gradient, the filter gradient one matmul per shift
# (g shifted where the output has fewer than 4x the input's channels, x shifted from it on)
@pytest.mark.parametrize("k,hw,cin,cout", [(3, 4, 5, 7), (3, 7, 6, 4), (3, 16, 4, 6), (1, 6, 5, 3),
                                           (5, 16, 3, 4), (3, 16, 2, 9), (5, 16, 2, 8)])
def test_conv_matmul_filter_gradient_matches_xla(conv_setting, monkeypatch, k, hw, cin, cout):
  conv_setting("matmul")
  # the matmul forms at small positions for these narrow kernels too (the default leaves kernels
  # narrower than 256 x 256 channels to XLA there: test_conv_narrow_kernels_at_small_sizes_...)
  monkeypatch.setattr(ops, "SMALL_MATMUL_MIN_KERNEL", 0)
  module, reference, params, x, value_and_grads = _conv_case(k, hw, cin, cout)
  assert jax.tree.map(jnp.shape, module.init(jax.random.PRNGKey(0), x)) == \
      jax.tree.map(jnp.shape, params)  # flax's parameter names and shapes
  (v, (dp, dx)), (rv, (rdp, rdx)) = value_and_grads(module), value_and_grads(reference)
  np.testing.assert_allclose(v, rv, rtol=1e-5)
  np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4 * np.abs(rdx).max())
  for name in ("kernel", "bias"):
    a, b = dp["params"][name], rdp["params"][name]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=name)
  # the matmul path was taken (XLA's gradient of a convolution has no dot); below 16x16
  # positions the input gradient is a matmul too, and the forward where the kernel is wide or
  # the batch holds few positions; from 16x16 on both are XLA's
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(module.apply(p, x))))(params))
  assert "dot_general" in jaxpr
  small = hw * (hw + 1) < ops.IM2COL_BELOW
  im2col = small and ops._im2col_forward(x, params["params"]["kernel"])
  assert im2col == ((hw, cin) == (4, 5))  # 40 positions: the only case under the rule
  assert ("conv_general_dilated" in jaxpr) == (not im2col)
  if small:
    assert jaxpr.count("conv_general_dilated") <= 1  # the forward only, never a gradient


def test_conv_forward_choice_follows_the_measured_rule():
  # im2col below 16x16 positions for a kernel of at least 256 x 512 channels or at most 64
  # positions per device (the batch split over jax.device_count()); XLA's otherwise
  choice = lambda b, hw, ci, co: ops._im2col_forward(np.zeros((b, hw, hw, ci)),
                                                     np.zeros((3, 3, ci, co)))
  assert choice(4, 8, 256, 512) and choice(4, 4, 1024, 512)
  assert choice(jax.device_count(), 8, 32, 32) and not choice(2 * jax.device_count(), 8, 32, 32)
  assert not choice(64, 8, 32, 32) and not choice(8, 8, 256, 256)
  assert not choice(1, 16, 1024, 512)  # 16x16 and up: always XLA's


def test_conv_narrow_kernels_at_small_sizes_are_xlas_throughout(conv_setting):
  # Below 16x16 positions a k x k kernel (k > 1) of fewer than 256 x 256 channels is XLA's
  # convolution, forward and gradients; 1x1 kernels, wider kernels and larger sizes keep the
  # matmul forms.
  conv_setting("matmul")
  pays = lambda k, hw, ci, co: ops._matmul_pays(np.zeros((2, hw, hw, ci)),
                                                np.zeros((k, k, ci, co)))
  assert not pays(3, 8, 128, 64) and not pays(3, 4, 256, 128) and not pays(3, 15, 16, 16)
  assert pays(3, 8, 256, 256) and pays(3, 4, 1024, 512)  # the SD-like U-Net's, CIFAR-10's
  assert pays(1, 8, 16, 16) and pays(3, 16, 16, 16)
  for k, hw, matmul in [(3, 7, False), (1, 7, True), (3, 16, True)]:
    module, _, params, x, _ = _conv_case(k, hw, 6, 4)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(module.apply(p, x))))(params))
    assert ("dot_general" in jaxpr) == matmul, (k, hw)  # XLA's gradients have no dot


def test_conv_filter_gradient_over_two_devices_sums_once_outside_its_loop():
  # With the batch split over the devices, the loop of shifted matmuls keeps one partial sum per
  # device and the sum over devices comes after it: an all-reduce inside the loop would make the
  # devices wait for each other once per shift of every layer.
  code = textwrap.dedent("""
      import re
      import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      from jaxgen.models import ops
      ops.set_conv("matmul")
      rng = np.random.RandomState(0)
      x = rng.randn(4, 16, 16, 5).astype(np.float32)
      # 6 output channels: g shifted in the loop; 24: x shifted
      for (cout, axis_type) in [(c, a) for c in (6, 24) for a in (jax.sharding.AxisType.Auto,
                                                                  jax.sharding.AxisType.Explicit)]:
        module, reference = ops.Conv(cout, (3, 3)), nn.Conv(cout, (3, 3))
        params = reference.init(jax.random.PRNGKey(0), x)
        cot = rng.randn(4, 16, 16, cout).astype(np.float32)
        grad = lambda m: jax.grad(lambda p, x: jnp.sum(m.apply(p, x) * cot))
        mesh = jax.make_mesh((2,), ("data",), axis_types=(axis_type,))
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        f = jax.jit(grad(module), out_shardings=NamedSharding(mesh, P()))
        with jax.set_mesh(mesh):
          hlo = f.lower(params, xs).compile().as_text()
          ours = f(params, xs)["params"]
        bodies = set(re.findall(r"body=%?([\\w.\\-]+)", hlo))
        assert bodies, "no loop: the shifted matmuls were not taken"
        for block in re.split(r"\\n(?=\\S)", hlo):
          name = re.match(r"(?:ENTRY )?%?([\\w.\\-]+)", block)
          if name and name.group(1) in bodies:
            assert "all-reduce" not in block, f"all-reduce inside the loop ({cout}, {axis_type})"
        assert "all-reduce" in hlo  # the sum over the devices, after the loop
        for op in ("all-gather", "collective-permute", "all-to-all"):  # the batch stays split
          assert op not in hlo, f"{op} in the gradient ({cout}, {axis_type})"
        exact = grad(reference)(params, x)["params"]
        for k in ("kernel", "bias"):
          np.testing.assert_allclose(ours[k], exact[k], rtol=1e-4,
                                     atol=1e-5 * np.abs(exact[k]).max())
      print("OK")
  """)
  r = run_python(code, devices=2)
  assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr[-3000:]


def test_conv_bfloat16_filter_gradient_accumulates_in_float32(conv_setting):
  conv_setting("matmul")
  module, _, params, x, _ = _conv_case(3, 16, 8, 8, dtype=jnp.bfloat16)
  ref = nn.Conv(8, (3, 3), dtype=jnp.float32)
  grad = lambda m: jax.grad(lambda p: jnp.sum(m.apply(p, x).astype(jnp.float32) ** 2))(params)
  ours, exact = grad(module)["params"]["kernel"], grad(ref)["params"]["kernel"]
  assert ours.dtype == jnp.float32  # the parameters' dtype
  np.testing.assert_allclose(ours, exact, rtol=0.05, atol=0.02 * np.abs(exact).max())


@pytest.mark.parametrize("kwargs", [dict(strides=(2, 2)), dict(padding="VALID"),
                                    dict(padding=((0, 1), (0, 1))), dict(kernel_dilation=(2, 2)),
                                    dict(feature_group_count=2)])
def test_conv_other_convolutions_are_xlas(conv_setting, kwargs):
  conv_setting("matmul")
  module, reference, params, x, value_and_grads = _conv_case(3, 8, 4, 6, **kwargs)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(module.apply(p, x))))(params))
  assert "custom_vjp" not in jaxpr and "dot_general" not in jaxpr
  (v, (dp, dx)), (rv, (rdp, rdx)) = value_and_grads(module), value_and_grads(reference)
  np.testing.assert_array_equal(v, rv)
  np.testing.assert_array_equal(dp["params"]["kernel"], rdp["params"]["kernel"])
  np.testing.assert_array_equal(dx, rdx)


def test_conv_setting_auto_xla_and_errors(conv_setting):
  assert ops.conv_implementation() == "matmul"  # auto, on the CPU
  conv_setting("xla")
  module, _, params, x, _ = _conv_case(3, 16, 4, 4)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(module.apply(p, x))))(params))
  assert "dot_general" not in jaxpr
  with pytest.raises(ConfigError, match="conv must be one of"):
    ops.set_conv("im2col")
  with pytest.raises(ConfigError, match="conv must be one of .*got 'fast'"):
    app.load_config("configs/ddpm.py:smoke", ["conv=fast"])
