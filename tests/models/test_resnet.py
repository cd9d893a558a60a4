"""ResNet: torchvision's parameter counts, a PyTorch functional reference, BatchNorm modes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.errors import ConfigError, ShapeError
from jaxgen.models.resnet import ResNet, ResNet18, ResNet50


def n_params(model, shape):
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape)))
  return sum(x.size for x in jax.tree.leaves(variables["params"]))


def test_parameter_counts_match_torchvision():
  # torchvision's published counts include the 1000-way fc layer: compare like with like.
  assert n_params(ResNet18(num_classes=1000), (1, 224, 224, 3)) == 11_689_512
  assert n_params(ResNet50(num_classes=1000), (1, 224, 224, 3)) == 25_557_032
  r18, r50 = ResNet18(), ResNet50()
  assert (r18.feature_dim, r50.feature_dim) == (512, 2048)
  assert n_params(r50, (1, 224, 224, 3)) + 2048 * 1000 + 1000 == 25_557_032
  out = jax.eval_shape(lambda: r50.init_with_output(jax.random.PRNGKey(0),
                                                    jnp.zeros((2, 224, 224, 3)))[0])
  assert out.shape == (2, 2048) and out.dtype == jnp.float32


def random_variables(model, x, seed=0):
  """Variables of the right shapes drawn in NumPy (eager jax.random compiles once per shape,
  seconds on a small CPU): He-scaled kernels, BN affine parameters and statistics away from
  their defaults, so that reference comparisons test them too."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape)))

  def draw(path, leaf):
    name, n = path[-1].key, rng.normal(size=leaf.shape)
    if name == "kernel":
      return n * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    if name in ("scale", "var"):
      return 1.0 + 0.2 * np.abs(n)
    return 0.1 * n

  return jax.tree_util.tree_map_with_path(lambda p, leaf: jnp.asarray(draw(p, leaf), jnp.float32),
                                          shapes)


def torch_reference(variables, x, stage_sizes, block, cifar_stem):
  """torchvision's ResNet v1.5 forward in eval mode, written with torch.nn.functional."""
  import torch
  import torch.nn.functional as F
  p, s = variables["params"], variables["batch_stats"]
  t = lambda a: torch.tensor(np.asarray(a))
  conv = lambda h, m, stride=1, pad=0: F.conv2d(h, t(m["kernel"]).permute(3, 2, 0, 1),
                                                stride=stride, padding=pad)
  bn = lambda h, m, st: F.batch_norm(h, t(st["bn"]["mean"]), t(st["bn"]["var"]),
                                     t(m["bn"]["scale"]), t(m["bn"]["bias"]), False, 0.0, 1e-5)
  h = t(x).permute(0, 3, 1, 2)
  if cifar_stem:
    h = F.relu(bn(conv(h, p["stem_conv"], 1, 1), p["stem_norm"], s["stem_norm"]))
  else:
    h = F.relu(bn(conv(h, p["stem_conv"], 2, 3), p["stem_norm"], s["stem_norm"]))
    h = F.max_pool2d(h, 3, 2, 1)
  for i, n in enumerate(stage_sizes):
    for j in range(n):
      name = f"stage{i + 1}_block{j + 1}"
      m, st = p[name], s[name]
      stride = 2 if (i > 0 and j == 0) else 1
      if block == "basic":
        y = F.relu(bn(conv(h, m["conv1"], stride, 1), m["norm1"], st["norm1"]))
        y = bn(conv(y, m["conv2"], 1, 1), m["norm2"], st["norm2"])
      else:
        y = F.relu(bn(conv(h, m["conv1"]), m["norm1"], st["norm1"]))
        y = F.relu(bn(conv(y, m["conv2"], stride, 1), m["norm2"], st["norm2"]))
        y = bn(conv(y, m["conv3"]), m["norm3"], st["norm3"])
      if "shortcut_conv" in m:
        h = bn(conv(h, m["shortcut_conv"], stride), m["shortcut_norm"], st["shortcut_norm"])
      h = F.relu(h + y)
  return h.mean(dim=(2, 3)).numpy()


@pytest.mark.parametrize("block, stage_sizes, cifar_stem, size", [
    ("basic", (2, 1, 1), False, 32), ("bottleneck", (1, 2), True, 12)])
def test_forward_matches_a_pytorch_reference(block, stage_sizes, cifar_stem, size):
  model = ResNet(stage_sizes=stage_sizes, block=block, width=4, cifar_stem=cifar_stem)
  x = np.random.default_rng(0).normal(size=(2, size, size + 2, 3)).astype(np.float32)
  variables = random_variables(model, x)
  ours = model.apply(variables, x)
  assert ours.shape == (2, model.feature_dim)
  np.testing.assert_allclose(ours, torch_reference(variables, x, stage_sizes, block, cifar_stem),
                             rtol=1e-4, atol=1e-5)


def test_batch_norm_updates_statistics_in_train_mode_only():
  model = ResNet(stage_sizes=(1, 1), width=4, cifar_stem=True)
  x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype(np.float32) + 2.0
  variables = random_variables(model, x)
  variables["batch_stats"] = jax.tree_util.tree_map_with_path(  # as at init: mean 0, var 1
      lambda p, v: jnp.zeros_like(v) if p[-1].key == "mean" else jnp.ones_like(v),
      variables["batch_stats"])
  assert set(variables) == {"params", "batch_stats"}
  out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  old, new = jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(updates["batch_stats"])
  assert all(not np.allclose(a, b) for a, b in zip(old, new))
  stem_mean = updates["batch_stats"]["stem_norm"]["bn"]["mean"]
  conv = jax.lax.conv_general_dilated(
      x, variables["params"]["stem_conv"]["kernel"], (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  # Running mean after one step from 0 with flax momentum 0.9 (torchvision's 0.1).
  np.testing.assert_allclose(stem_mean, 0.1 * np.mean(conv, axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  # Eval mode reads the statistics without writing them (apply without `mutable` would raise
  # if it tried), and an image's features do not depend on the rest of its batch.
  ev = model.apply(variables, x)
  np.testing.assert_allclose(model.apply(variables, x[:1]), ev[:1], rtol=1e-5, atol=1e-6)
  tr_one = model.apply(variables, x[:2], train=True, mutable=["batch_stats"])[0]
  assert not np.allclose(tr_one[:1], out[:1], atol=1e-4)  # train mode: batch statistics


def test_group_norm_and_stem_shapes():
  gn = ResNet(stage_sizes=(1, 1), width=8, norm="group", groups=4, cifar_stem=True)
  x = jnp.ones((2, 28, 28, 1))
  variables = random_variables(gn, x)
  assert set(variables) == {"params"}
  assert gn.apply(variables, x, train=True).shape == (2, 16)
  big = ResNet(stage_sizes=(1, 1, 1), block="bottleneck", width=4)
  out = jax.eval_shape(lambda: big.init_with_output(jax.random.PRNGKey(0),
                                                    jnp.zeros((2, 64, 48, 3)))[0])
  assert out.shape == (2, 64)


def test_bad_inputs_are_clear_errors():
  model = ResNet(stage_sizes=(1, 1), width=4)
  with pytest.raises(ShapeError, match=r"\[B, H, W, C\]"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((8, 8, 3)))
  with pytest.raises(ShapeError, match="too small"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3)))
  with pytest.raises(ConfigError, match="block"):
    ResNet(block="dense").init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ConfigError, match="norm"):
    ResNet(norm="layer").init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
