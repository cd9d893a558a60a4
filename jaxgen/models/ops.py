"""Layers written for speed: GroupNorm(+SiLU) with a hand-written gradient, dropout with
cheaper masks, and stride-1 convolutions whose filter gradient is a matmul. All are drop-in for
flax's modules (same parameters, same semantics).

GroupNorm. Autodiff of GroupNorm -> SiLU makes XLA read the activation about eight times in the
forward and backward passes and save several intermediates for the backward pass. Here the forward
pass is one reduction (per-channel sums and sums of squares, folded into groups) and one
elementwise pass, the backward pass one reduction (per-channel sums of dy and dy * x_hat) and one
elementwise pass, and only the input, the group means and the inverse deviations are saved: x_hat
and the SiLU are recomputed. On the CPU the small DDPM U-Net's GroupNorm+SiLU layers (forward +
backward) run 1.4-2.0x faster (benchmarks/cpu_conv.py, part "layers"). Statistics and the gradient
math are float32 whatever the input's dtype; the variance is E[x^2] - E[x]^2, as flax's GroupNorm
computes it by default.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p

from jaxgen.errors import ConfigError


def _per_channel(v, groups: int, channels: int):
  """[B, G] -> [B, 1, 1, C], each group's value repeated over its channels."""
  return jnp.repeat(v, channels // groups, axis=-1)[:, None, None, :]


def _stats(x, groups: int, eps: float):
  b, h, w, c = x.shape
  xf = x.astype(jnp.float32)
  s1 = jnp.sum(xf, axis=(1, 2)).reshape(b, groups, -1).sum(-1)
  s2 = jnp.sum(xf * xf, axis=(1, 2)).reshape(b, groups, -1).sum(-1)
  n = h * w * (c // groups)
  mean = s1 / n
  var = jnp.maximum(s2 / n - mean * mean, 0.0)
  return mean, jax.lax.rsqrt(var + eps)


def _normalised(x, mean, rstd, groups: int):
  c = x.shape[-1]
  return (x.astype(jnp.float32) - _per_channel(mean, groups, c)) * _per_channel(rstd, groups, c)


def _forward(x, scale, bias, groups, eps, silu):
  mean, rstd = _stats(x, groups, eps)
  y = _normalised(x, mean, rstd, groups) * scale + bias
  out = y * jax.nn.sigmoid(y) if silu else y
  return out.astype(jnp.promote_types(x.dtype, scale.dtype)), (x, mean, rstd, scale, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm_silu(x, scale, bias, groups: int, eps: float, silu: bool):
  """GroupNorm of NHWC `x` over `groups` channel groups, scale and bias per channel, then SiLU
  when `silu`. Equals `nn.silu(nn.GroupNorm(groups, epsilon=eps)(x))` (tests/models/test_ops)."""
  return _forward(x, scale, bias, groups, eps, silu)[0]


def _backward(groups, eps, silu, saved, g):
  del eps
  x, mean, rstd, scale, bias = saved
  b, h, w, c = x.shape
  xhat = _normalised(x, mean, rstd, groups)
  dy = g.astype(jnp.float32)
  if silu:
    y = xhat * scale + bias
    s = jax.nn.sigmoid(y)
    dy = dy * s * (1.0 + y * (1.0 - s))
  sum_dy = jnp.sum(dy, axis=(1, 2))                # [B, C]
  sum_dy_xhat = jnp.sum(dy * xhat, axis=(1, 2))    # [B, C]
  n = h * w * (c // groups)
  # d x_hat = dy * scale; dx = rstd (d x_hat - mean_g(d x_hat) - x_hat mean_g(d x_hat x_hat))
  a = (sum_dy * scale).reshape(b, groups, -1).sum(-1) / n
  m = (sum_dy_xhat * scale).reshape(b, groups, -1).sum(-1) / n
  dx = _per_channel(rstd, groups, c) * (dy * scale - _per_channel(a, groups, c)
                                        - xhat * _per_channel(m, groups, c))
  return (dx.astype(x.dtype), jnp.sum(sum_dy_xhat, 0).astype(scale.dtype),
          jnp.sum(sum_dy, 0).astype(bias.dtype))


group_norm_silu.defvjp(_forward, _backward)


class GroupNorm(nn.Module):
  """flax's GroupNorm parameters (`scale`, `bias`) for NHWC input, with SiLU fused when
  `act == "silu"`. The output dtype is the input's promoted with the parameters' (float32)."""
  num_groups: int
  epsilon: float = 1e-6
  act: str | None = None

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if x.ndim != 4:
      raise ValueError(f"GroupNorm expects NHWC input; got shape {x.shape}")
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {c} channels do not split into {self.num_groups} groups")
    if self.act not in (None, "silu"):
      raise ValueError(f"GroupNorm act must be None or 'silu'; got {self.act!r}")
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return group_norm_silu(x, scale, bias, self.num_groups, self.epsilon, self.act == "silu")


def dropout_keep_mask(key, shape: tuple[int, ...], keep: float) -> jax.Array:
  """Boolean mask, True with probability `keep`, from a threefry key.

  jax.random.bernoulli (flax's Dropout) runs one threefry2x32 hash per element, keeps 32 of its 64
  output bits, and compares uniform floats. Here each hash gives two elements (the halves of the
  last axis) and the bits are compared with an integer threshold: the dropout of the small DDPM
  U-Net's activations (forward + backward) ran 1.6x faster on the CPU. The counters are the
  element's index within the leading axes, so a batch split over devices needs no communication.
  """
  if jnp.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
    if jax.random.key_impl(key) != "threefry2x32":
      return jax.random.bernoulli(key, keep, shape)
    key = jax.random.key_data(key)
  half = (*shape[:-1], -(-shape[-1] // 2)) if shape else (1,)
  n = int(np.prod(half))
  if n >= 2 ** 32:
    raise ValueError(f"dropout_keep_mask: {shape} has too many elements for 32-bit counters")
  count = jax.lax.iota(jnp.uint32, n).reshape(half)
  y1, y2 = threefry2x32_p.bind(key[0], key[1], jnp.zeros_like(count), count)
  bits = jnp.concatenate([y1, y2], axis=-1)[..., :shape[-1]] if shape else y1.reshape(())
  return bits < np.uint32(min(round(keep * 2.0 ** 32), 2 ** 32 - 1))


class Dropout(nn.Module):
  """flax's nn.Dropout (rate, `deterministic`, the 'dropout' rng collection, inputs scaled by
  1 / (1 - rate)) with the cheaper masks of `dropout_keep_mask`."""
  rate: float
  deterministic: bool | None = None

  @nn.compact
  def __call__(self, x, deterministic: bool | None = None):
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep = 1.0 - self.rate
    mask = dropout_keep_mask(self.make_rng("dropout"), x.shape, keep)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


# -- convolutions ---------------------------------------------------------------------------------
# XLA:CPU lowers the filter gradient of a convolution at about half the speed of the forward
# convolution (27-75 GFLOP/s against 51-132 on this machine's two cores for 3x3 kernels at the
# U-Nets' shapes; 11-13 GFLOP/s for 1x1 kernels). Written as matmuls over the batch and positions
# (the k*k shifted copies of the input against the output gradient; one matmul for 1x1), the
# filter gradient runs 1.4-7.3x faster (benchmarks/results/conv_grad.md, 2026-12-06). Below
# IM2COL_BELOW positions (8x8, 4x4), for kernels of SMALL_MATMUL_MIN_KERNEL channels and more,
# the input gradient is a matmul too, and the forward where the kernel is wider still or the
# batch small (_im2col_forward): XLA's are slow there, and its input
# gradient first flips and transposes the kernel (at 8x8, batch 4,
# 1024->512 channels: forward 20.1 against 11.2 ms, input gradient 25.8 against 8.7 ms; SD-like
# network call 844 -> 791 ms, train step 3.79 -> 3.65 s, alternated). From 16x16 on they stay
# XLA's (a 1x1 forward as a matmul at all sizes made the SD-like network call slower: 1.52
# against 1.21 s). "auto" takes the matmuls on the CPU only: cuDNN needs no help.
CONV_IMPLEMENTATIONS = ("auto", "xla", "matmul")
_conv_implementation = "auto"
_NHWC = ("NHWC", "HWIO", "NHWC")
# Below this many output positions the k*k shifted copies are concatenated into one matrix
# (im2col, one matmul with a long contraction; also the forward's and the input gradient's);
# from it on, the filter gradient is one matmul per shift in a loop, which
# holds one shifted copy at a time (measured faster at 16x16 and 32x32, slower at 4x4 and 8x8;
# unrolled, the copies of every layer raised the CIFAR-10 U-Net step's XLA temporaries from
# 1,048 to 2,612 MB).
IM2COL_BELOW = 16 * 16
# In that loop, g is shifted rather than x where the output has fewer than this many times the
# input's channels (_filter_grad_shifted_g). Measured on the 2-core CPU (XLA:CPU, jax 0.10, one
# device, the filter gradient alone): batch 4 at 32x32, 384 -> 128 channels 86.8 -> 35.4 ms,
# 256 -> 256 68.5 -> 45.4 ms; at 16x16, 768 -> 256 46.9 -> 32.8, 512 -> 512 50.5 -> 43.1; batch 8
# at 32x32, 64 -> 128 33.8 -> 21.6; equal at 32 -> 128, slower from 16 -> 128 (4.7 -> 7.8 ms).
SHIFT_OUTPUT_GRAD_BELOW = 4
# The forward at those sizes is im2col only where the kernel has at least this many input x
# output channels, or each device holds at most IM2COL_FORWARD_ROWS positions of the batch;
# otherwise XLA's convolution is faster. 3x3, one device, ms XLA / im2col: batch 128 at 8x8,
# 32 -> 32 channels 1.08 / 1.91, 64 -> 32 2.14 / 12.3; batch 8 at 8x8, 256 -> 256 2.25 / 3.06;
# about equal from 384 -> 256 and 256 -> 512; batch 4 at 8x8, 256 -> 512 3.02 / 2.60,
# 512 -> 512 6.31 / 5.67, 1024 -> 512 17.6 / 11.8; 256 -> 256 at batch 2, 4x4 0.86 / 0.42.
# The input gradient stays a matmul at all these widths below IM2COL_BELOW positions (faster
# or about equal at all these shapes).
IM2COL_FORWARD_MIN_KERNEL = 256 * 512
IM2COL_FORWARD_ROWS = 64
# Below IM2COL_BELOW positions, a k x k kernel (k > 1) of fewer than this many input x output
# channels is XLA's convolution throughout (forward and both gradients): the matmul forms' extra
# passes (the k*k shifted copies and sums) cost more than they save on narrow kernels. Whole train
# steps on the 2-core AMD EPYC, two devices, the settings compiled in one process and run
# alternately (benchmarks/results/conv_grad.md, 2026-12-07): the small DDPM U-Net (8x8 and 4x4
# kernels of 16x32 to 128x64 channels) 177 -> 142 ms, the small latent U-Net (64x64 to 256x128)
# 509 -> 426 ms, the VAE 326 -> 278 ms. The wide
# kernels that the rules above were measured on (the SD-like U-Net's and the DDPM paper's
# U-Net's, 256x256 channels and up at these sizes) keep the matmuls.
SMALL_MATMUL_MIN_KERNEL = 256 * 256


def set_conv(implementation: str) -> None:
  """How jaxgen's stride-1 'SAME' convolutions are computed from now on (read when a function
  is traced): "xla" as XLA lowers them, "matmul" the filter gradients as matmuls, and below
  IM2COL_BELOW positions the forward and the input gradient too (there, kernels narrower than
  SMALL_MATMUL_MIN_KERNEL stay XLA's), "auto" matmul on the CPU and
  xla elsewhere. The config key `conv` sets it for a task (jaxgen.app.build_task)."""
  if implementation not in CONV_IMPLEMENTATIONS:
    raise ConfigError(f"conv must be one of {CONV_IMPLEMENTATIONS}, got {implementation!r}")
  global _conv_implementation
  _conv_implementation = implementation


def conv_implementation() -> str:
  """What conv_general_dilated runs for a convolution it can take under the current setting."""
  if _conv_implementation != "auto":
    return _conv_implementation
  return "matmul" if jax.default_backend() == "cpu" else "xla"


def _same_pad(padding, k: int):
  """The symmetric padding p of a stride-1 k x k 'SAME' convolution, or None if `padding` is
  something else."""
  p = (k - 1) // 2
  if isinstance(padding, str):
    return p if padding.upper() == "SAME" and k % 2 else None
  pads = [tuple(int(v) for v in pair) for pair in padding]
  return p if pads == [(p, p), (p, p)] else None


def _xla_conv(x, w, pad: int, precision):
  return jax.lax.conv_general_dilated(x, w, (1, 1), [(pad, pad), (pad, pad)],
                                      dimension_numbers=_NHWC, precision=precision)


def _columns(xp, k: int, h: int, w: int):
  """im2col: the k*k shifted [B, h, w, I] windows of the padded xp side by side, [B*h*w, k*k*I]
  (tap-major: window (i, j) holds columns (i*k + j)*I to (i*k + j + 1)*I)."""
  cols = jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(k) for j in range(k)], -1)
  return cols.reshape(-1, cols.shape[-1])


def _filter_grad(x, g, k: int, pad: int, precision):
  """d/dw of sum(g * conv(x, w)) for NHWC x [B, H, W, I], g [B, H, W, O]: [k, k, I, O] float32."""
  b, h, w, ci = x.shape
  co = g.shape[-1]
  g2 = g.reshape(-1, co)
  if pad:
    x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  matmul = functools.partial(jnp.einsum, "nk,nc->kc", precision=precision,
                             preferred_element_type=jnp.float32)
  if k == 1:
    return matmul(x.reshape(-1, ci), g2).reshape(1, 1, ci, co)
  if h * w < IM2COL_BELOW:
    return matmul(_columns(x, k, h, w), g2).reshape(k, k, ci, co)

  # the batch as [groups, b / groups] (a split of the leading axis, also under an Explicit mesh)
  groups = math.gcd(b, jax.device_count())
  if co < SHIFT_OUTPUT_GRAD_BELOW * ci:
    return _filter_grad_shifted_g(x, g, k, groups, precision)
  xg = x.reshape(groups, b // groups, *x.shape[1:])
  gg = g.reshape(groups, b // groups, h, w, co)
  group_matmul = functools.partial(jnp.einsum, "gbhwk,gbhwc->gkc", precision=precision,
                                   preferred_element_type=jnp.float32)

  def one_shift(ij):  # in a loop, so that one shifted copy of x exists at a time
    shifted = jax.lax.dynamic_slice(xg, (0, 0, ij // k, ij % k, 0), (*xg.shape[:2], h, w, ci))
    return group_matmul(shifted, gg)

  # Summed over the batch groups after the loop: with the batch split over the devices, a sum
  # inside it would be one all-reduce, so one rendezvous of the devices, per shift.
  return jax.lax.map(one_shift, jnp.arange(k * k)).sum(1).reshape(k, k, ci, co)


def _filter_grad_shifted_g(xp, g, k: int, groups: int, precision):
  """_filter_grad's loop for a padded xp [B, H + k - 1, W + k - 1, I], with g shifted instead
  of x. Each group's examples are laid flat, row after row of the padded frame, and g is placed
  in the same frame (zeros in the k - 1 extra rows and columns): shift (i, j) pairs x at flat
  position m with g at m - (i * frame width + j), a contiguous slice of g. x is transposed once,
  [I, positions], before the loop, so each product is a plain matmul and each shift copies only
  that slice of g; the old loop's copy of each shifted window was also a transpose."""
  b, hp, wp, ci = xp.shape
  co = g.shape[-1]
  reach = (k - 1) * wp + (k - 1)  # the largest shift, as a flat offset
  # the leading axis split first, then the rest merged (so also under an Explicit mesh)
  flat = lambda a: a.reshape(groups, b // groups, *a.shape[1:]).reshape(groups, -1, a.shape[-1])
  xt = jnp.swapaxes(flat(xp), 1, 2)  # [groups, I, n]
  n = xt.shape[2]
  gf = flat(jnp.pad(g, ((0, 0), (0, k - 1), (0, k - 1), (0, 0))))
  gf = jnp.pad(gf, ((0, 0), (reach, 0), (0, 0)))

  def one_shift(ij):
    shifted = jax.lax.dynamic_slice_in_dim(gf, reach - (ij // k) * wp - ij % k, n, axis=1)
    return jnp.einsum("gkn,gnc->gkc", xt, shifted, precision=precision,
                      preferred_element_type=jnp.float32)

  # summed over the groups after the loop, as in _filter_grad
  return jax.lax.map(one_shift, jnp.arange(k * k)).sum(1).reshape(k, k, ci, co)


def _im2col_conv(x, w, pad: int, precision):
  """A 'SAME' stride-1 conv as one matmul of the k*k shifted copies of x, concatenated
  [B*H*W, k*k*I], against the kernel read as [k*k*I, O]."""
  b, h, wd, _ = x.shape
  k, co = w.shape[0], w.shape[-1]
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else x
  out = jnp.einsum("nk,ko->no", _columns(xp, k, h, wd), w.reshape(-1, co), precision=precision)
  return out.reshape(b, h, wd, co)


def _small(x) -> bool:
  return x.shape[1] * x.shape[2] < IM2COL_BELOW


def _matmul_pays(x, w) -> bool:
  """Whether the matmul forms take the convolution of x [B, H, W, I] with w [k, k, I, O]
  (SMALL_MATMUL_MIN_KERNEL)."""
  return w.shape[0] == 1 or not _small(x) or w.shape[2] * w.shape[3] >= SMALL_MATMUL_MIN_KERNEL


def _im2col_forward(x, w) -> bool:
  """Whether the forward of x [B, H, W, I] with kernel w [k, k, I, O] is taken as im2col."""
  b, h, wd, ci = x.shape
  rows = b // math.gcd(b, jax.device_count()) * h * wd  # per device, the batch split evenly
  return _small(x) and (ci * w.shape[-1] >= IM2COL_FORWARD_MIN_KERNEL
                        or rows <= IM2COL_FORWARD_ROWS)


def _same_forward(x, w, pad, precision):
  if _im2col_forward(x, w):
    return _im2col_conv(x, w, pad, precision)
  return _xla_conv(x, w, pad, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_same(x, w, pad: int, precision):
  return _same_forward(x, w, pad, precision)


def _conv_same_fwd(x, w, pad, precision):
  return _same_forward(x, w, pad, precision), (x, w)


def _input_grad(g, w, pad: int, precision):
  """d/dx of sum(g * conv(x, w)) for a 'SAME' stride-1 conv, g [B, H, W, O], w [k, k, I, O], as
  one matmul of g against the kernel read as [k*k*I, O] (contracting both on O, so the kernel is
  never transposed) and a sum of the k*k shifted products: dx[y, x] = sum_ij Y_ij[y + pad - i,
  x + pad - j]. XLA's input gradient first transposes and flips the kernel, which XLA:CPU does
  slowly (about 10-30 ms for a 3x3 kernel of 512 x 512-1024 channels, for a convolution of
  about the same time at 8x8)."""
  b, h, wd, co = g.shape
  k, ci = w.shape[0], w.shape[2]
  y = jnp.einsum("no,ko->nk", g.reshape(-1, co), w.reshape(-1, co).astype(g.dtype),
                 precision=precision, preferred_element_type=jnp.float32)
  y = y.reshape(b, h, wd, k, k, ci)
  dx = 0
  for i in range(k):
    for j in range(k):
      # tap (i, j) of output position (y, x) reads input (y + i - pad, x + j - pad)
      piece = y[:, :, :, i, j, :]
      top, left = i - pad, j - pad
      piece = jnp.pad(piece, ((0, 0), (max(top, 0), max(-top, 0)), (max(left, 0), max(-left, 0)),
                              (0, 0)))
      dx = dx + piece[:, max(-top, 0):max(-top, 0) + h, max(-left, 0):max(-left, 0) + wd, :]
  return dx


def _conv_same_bwd(pad, precision, saved, g):
  x, w = saved
  if _small(x):
    dx = _input_grad(g, w, pad, precision).astype(x.dtype)
  else:
    dx = jax.vjp(lambda x: _xla_conv(x, w, pad, precision), x)[1](g)[0]
  dw = _filter_grad(x, g, w.shape[0], pad, precision)
  return dx, dw.astype(w.dtype)


_conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1, precision=None,
                         preferred_element_type=None):
  """jax.lax.conv_general_dilated, with the convolutions that flax's nn.Conv makes by default
  (NHWC, stride 1, no dilation, one group, square odd kernel, 'SAME' padding) computed as
  set_conv says; everything else goes to lax unchanged. Pass it as nn.Conv's
  `conv_general_dilated` (see Conv)."""
  k = rhs.shape[0] if rhs.ndim == 4 else 0
  pad = _same_pad(padding, k) if k and rhs.shape[1] == k else None
  plain = (pad is not None and lhs.ndim == 4 and feature_group_count == 1
           and preferred_element_type is None
           and tuple(window_strides) == (1, 1)
           and all(d in (None, 1) or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
           and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if not plain or conv_implementation() != "matmul" or not _matmul_pays(lhs, rhs):
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
  return _conv_same(lhs, rhs, pad, precision)


def Conv(features: int, kernel_size, **kwargs) -> nn.Conv:
  """flax's nn.Conv (same parameters and arguments) computing with conv_general_dilated."""
  return nn.Conv(features, kernel_size, conv_general_dilated=conv_general_dilated, **kwargs)
