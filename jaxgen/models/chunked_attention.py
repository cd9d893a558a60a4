"""Attention whose memory grows linearly with the sequence (Rabe & Staats 2021, "Self-attention
does not need O(n^2) memory"; the backward pass as in FlashAttention, Dao et al. 2022).

Keys and values are visited in chunks with an online softmax (running maximum and sum), and
queries in chunks, so the [T, S] logits never exist whole. The backward pass is a custom VJP
that keeps only the output and the log-sum-exp of each query's logits and recomputes each
block's probabilities from them; its memory is linear too. Logits, softmax statistics and the
accumulators are float32 whatever the inputs' dtype; the output has v's dtype.

Layout as in jaxgen.models.layers.attention: q [B, T, N, H], k/v [B, S, N, H], mask broadcasting
to [B, N, T, S] with True = attend. A query whose keys are all masked gets the mean of the
values, as the materialised softmax over equal logits gives.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

MASKED = float(jnp.finfo(jnp.float32).min)  # a masked key's logit: what the reference uses


def _pad_to(x, axis: int, multiple: int):
  n = x.shape[axis]
  pad = -n % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _prepare_mask(mask, b, n, t, s, tp, sp):
  """The mask as [B or 1, N or 1, T or 1, S or 1] bool, padded to the chunk multiples; None
  stays None. Singleton dimensions stay singleton, so that a key-padding mask costs O(S)."""
  if mask is None:
    return None
  mask = jnp.asarray(mask, bool)
  if mask.ndim > 4:
    raise ValueError(f"attention mask has {mask.ndim} dimensions; it must broadcast to "
                     f"[batch, heads, queries, keys] = {[b, n, t, s]}")
  mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  want = (b, n, t, s)
  for have, full in zip(mask.shape, want):
    if have not in (1, full):
      raise ValueError(f"attention mask of shape {list(mask.shape)} does not broadcast to "
                       f"[batch, heads, queries, keys] = {want}")
  if mask.shape[2] == t:
    mask = _pad_to(mask, 2, tp)
  if mask.shape[3] == s:
    mask = _pad_to(mask, 3, sp)
  return mask


def _block_mask(mask, qi, q_chunk, ki, k_chunk):
  """The [B|1, N|1, q_chunk|1, k_chunk|1] piece of a prepared mask."""
  if mask.shape[2] != 1:
    mask = jax.lax.dynamic_slice_in_dim(mask, qi * q_chunk, q_chunk, axis=2)
  if mask.shape[3] != 1:
    mask = jax.lax.dynamic_slice_in_dim(mask, ki * k_chunk, k_chunk, axis=3)
  return mask


def _logits(q_blk, k_blk, mask, qi, ki, q_chunk, k_chunk, s):
  """Masked float32 logits [B, N, q_chunk, k_chunk] of one block (q comes scaled); keys past s
  (padding) are -inf so that they never count, masked keys get MASKED as in the reference."""
  logits = jnp.einsum("bnth,bnsh->bnts", q_blk, k_blk, preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(_block_mask(mask, qi, q_chunk, ki, k_chunk), logits, MASKED)
  if s % k_chunk == 0:  # no padded keys: skip a pass over the block
    return logits
  key_pos = ki * k_chunk + jnp.arange(k_chunk)
  return jnp.where(key_pos < s, logits, -jnp.inf)


def _logits_t(q_blk, k_blk, mask, qi, ki, q_chunk, k_chunk, s):
  """_logits transposed, [B, N, k_chunk, q_chunk], computed key-major (for the backward)."""
  logits = jnp.einsum("bnsh,bnth->bnst", k_blk, q_blk, preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(jnp.swapaxes(_block_mask(mask, qi, q_chunk, ki, k_chunk), 2, 3), logits,
                       MASKED)
  if s % k_chunk == 0:
    return logits
  key_pos = ki * k_chunk + jnp.arange(k_chunk)
  return jnp.where((key_pos < s)[:, None], logits, -jnp.inf)


def _forward(q, k, v, mask, s, q_chunk, k_chunk):
  """Padded q (scaled) [B, N, Tp, H], k/v [B, N, Sp, H] -> (out float32 [B, N, Tp, H],
  lse [B, N, Tp])."""
  b, n, tp, h = q.shape
  nk = k.shape[2] // k_chunk

  def one_query_block(qi):
    q_blk = jax.lax.dynamic_slice_in_dim(q, qi * q_chunk, q_chunk, axis=2)

    def step(carry, ki):
      m, total, acc = carry
      k_blk = jax.lax.dynamic_slice_in_dim(k, ki * k_chunk, k_chunk, axis=2)
      v_blk = jax.lax.dynamic_slice_in_dim(v, ki * k_chunk, k_chunk, axis=2)
      logits = _logits(q_blk, k_blk, mask, qi, ki, q_chunk, k_chunk, s)
      m_new = jnp.maximum(m, logits.max(-1))
      p = jnp.exp(logits - m_new[..., None])
      corr = jnp.exp(m - m_new)
      total = total * corr + p.sum(-1)
      acc = acc * corr[..., None] + jnp.einsum("bnts,bnsh->bnth", p,
                                                 v_blk.astype(jnp.float32))
      return (m_new, total, acc), None

    init = (jnp.full((b, n, q_chunk), -jnp.inf, jnp.float32),
            jnp.zeros((b, n, q_chunk), jnp.float32),
            jnp.zeros((b, n, q_chunk, h), jnp.float32))
    (m, total, acc), _ = jax.lax.scan(step, init, jnp.arange(nk))
    out = acc / total[..., None]
    return out, m + jnp.log(total)

  outs, lses = jax.lax.map(one_query_block, jnp.arange(tp // q_chunk))
  # [nq, B, N, qc, H] -> [B, N, Tp, H]; [nq, B, N, qc] -> [B, N, Tp]
  out = jnp.moveaxis(outs, 0, 2).reshape(b, n, tp, h)
  lse = jnp.moveaxis(lses, 0, 2).reshape(b, n, tp)
  return out, lse


def _backward_key_major(q, k, v, mask, s, q_chunk, k_chunk, out, lse, d_out):
  """Gradients of q, k, v (float32, padded) from the saved output and log-sum-exp.

  Each block is computed key-major, [k_chunk, q_chunk], and dq is accumulated transposed,
  [H, T], from K^T transposed once per key block: then every product is a plain or a
  B-transposed matmul. Written query-major, two of the five (dv = P^T dO, dk = dS^T Q) contract
  the leading axis of the [T, S] block, which XLA:CPU runs 4-6x slower than the same product
  with the block laid out [S, T] (9.1 against 1.5 ms at the SD-like shape; an output transposed
  back is folded into the product again). dq = K^T dS written on the [S, H] key block contracts
  its leading axis too: XLA:CPU left that product to its own dot rather than YNNPACK, and the
  SD-like train step (one device, batch 4, alternated in one process) took 5.41 against 4.69 s
  with it (median of 8; each of the 8 slower), though the attention alone timed the same."""
  b, n, tp, h = q.shape
  sp = k.shape[2]
  nq = tp // q_chunk
  d_out = d_out.astype(jnp.float32)
  delta = (d_out * out).sum(-1)  # rowsum(dO * O); as an einsum, XLA:CPU made it a batched matmul

  def one_key_block(dq_t, ki):
    k_blk = jax.lax.dynamic_slice_in_dim(k, ki * k_chunk, k_chunk, axis=2).astype(jnp.float32)
    v_blk = jax.lax.dynamic_slice_in_dim(v, ki * k_chunk, k_chunk, axis=2).astype(jnp.float32)
    k_t = jnp.swapaxes(k_blk, 2, 3)  # [B, N, H, kc], outside the loop over query blocks

    def step(carry, qi):
      dk, dv = carry
      sl = lambda x: jax.lax.dynamic_slice_in_dim(x, qi * q_chunk, q_chunk, axis=2)
      q_blk, do_blk = sl(q).astype(jnp.float32), sl(d_out)
      logits_t = _logits_t(q_blk, k_blk, mask, qi, ki, q_chunk, k_chunk, s)
      p_t = jnp.exp(logits_t - sl(lse)[:, :, None, :])  # [B, N, kc, qc]
      dv = dv + jnp.einsum("bnst,bnth->bnsh", p_t, do_blk)
      dp_t = jnp.einsum("bnsh,bnth->bnst", v_blk, do_blk)
      ds_t = p_t * (dp_t - sl(delta)[:, :, None, :])
      dk = dk + jnp.einsum("bnst,bnth->bnsh", ds_t, q_blk)
      dq_t_blk = jnp.einsum("bnhs,bnst->bnht", k_t, ds_t)  # [B, N, H, qc]
      return (dk, dv), dq_t_blk

    zeros = jnp.zeros((b, n, k_chunk, h), jnp.float32)
    (dk, dv), dq_blocks = jax.lax.scan(step, (zeros, zeros), jnp.arange(nq))
    # [nq, B, N, H, qc] -> [B, N, H, Tp]
    dq_t = dq_t + jnp.moveaxis(dq_blocks, 0, 3).reshape(b, n, h, tp)
    return dq_t, (dk, dv)

  dq_t, (dks, dvs) = jax.lax.scan(one_key_block, jnp.zeros((b, n, h, tp), jnp.float32),
                                  jnp.arange(sp // k_chunk))
  unblock = lambda x: jnp.moveaxis(x, 0, 2).reshape(b, n, sp, h)
  return jnp.swapaxes(dq_t, 2, 3), unblock(dks), unblock(dvs)


def _backward_query_major(q, k, v, mask, s, q_chunk, k_chunk, out, lse, d_out):
  """Gradients of q, k, v (float32, padded) from the saved output and log-sum-exp, each block
  computed query-major, [q_chunk, k_chunk] (the faster layout for heads wider than 16)."""
  b, n, tp, h = q.shape
  sp = k.shape[2]
  nq = tp // q_chunk
  d_out = d_out.astype(jnp.float32)
  delta = jnp.einsum("bnth,bnth->bnt", d_out, out)  # rowsum(dO * O): as a sum, slower here
  # (one head of 256, 64 positions, fwd + bwd: 3.1 against 2.4 ms)

  def one_key_block(dq, ki):
    k_blk = jax.lax.dynamic_slice_in_dim(k, ki * k_chunk, k_chunk, axis=2)
    v_blk = jax.lax.dynamic_slice_in_dim(v, ki * k_chunk, k_chunk, axis=2)

    def step(carry, qi):
      dk, dv = carry
      sl = lambda x: jax.lax.dynamic_slice_in_dim(x, qi * q_chunk, q_chunk, axis=2)
      q_blk, do_blk = sl(q), sl(d_out)
      logits = _logits(q_blk, k_blk, mask, qi, ki, q_chunk, k_chunk, s)
      p = jnp.exp(logits - sl(lse)[..., None])  # [B, N, qc, kc]
      dv = dv + jnp.einsum("bnts,bnth->bnsh", p, do_blk)
      dp = jnp.einsum("bnth,bnsh->bnts", do_blk, v_blk.astype(jnp.float32))
      ds = p * (dp - sl(delta)[..., None])
      dk = dk + jnp.einsum("bnts,bnth->bnsh", ds, q_blk.astype(jnp.float32))
      dq_blk = jnp.einsum("bnts,bnsh->bnth", ds, k_blk.astype(jnp.float32))
      return (dk, dv), dq_blk

    zeros = jnp.zeros((b, n, k_chunk, h), jnp.float32)
    (dk, dv), dq_blocks = jax.lax.scan(step, (zeros, zeros), jnp.arange(nq))
    dq = dq + jnp.moveaxis(dq_blocks, 0, 2).reshape(b, n, tp, h)
    return dq, (dk, dv)

  dq, (dks, dvs) = jax.lax.scan(one_key_block, jnp.zeros((b, n, tp, h), jnp.float32),
                                jnp.arange(sp // k_chunk))
  unblock = lambda x: jnp.moveaxis(x, 0, 2).reshape(b, n, sp, h)
  return dq, unblock(dks), unblock(dvs)


# The backward's block layout by head width, measured on a 2-core CPU (XLA:CPU, jax 0.10; fwd +
# bwd): key-major is faster for heads of 16 (1024 positions, 8 heads, batch 4: 110 against 157
# ms; cross-attention to 77 tokens 13.5 against 17.2), query-major for wider ones (256 positions:
# heads of 32 12.1 against 14.0 ms, one head of 256 9.6 against 12.2, 4 of 64 17.8 against 21.3).
KEY_MAJOR_MAX_HEAD_DIM = 16


def _backward(q, k, v, mask, s, q_chunk, k_chunk, out, lse, d_out):
  impl = _backward_key_major if q.shape[-1] <= KEY_MAJOR_MAX_HEAD_DIM else _backward_query_major
  return impl(q, k, v, mask, s, q_chunk, k_chunk, out, lse, d_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, mask, s, q_chunks, k_chunk):
  return _forward(q, k, v, mask, s, q_chunks[0], k_chunk)[0]


def _attention_fwd(q, k, v, mask, s, q_chunks, k_chunk):
  out, lse = _forward(q, k, v, mask, s, q_chunks[0], k_chunk)
  return out, (q, k, v, mask, out, lse)


def _attention_bwd(s, q_chunks, k_chunk, residuals, d_out):
  q, k, v, mask, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, mask, s, q_chunks[1], k_chunk, out, lse, d_out)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)

# The default query chunks, measured on a 2-core CPU (XLA:CPU, jax 0.10; self-attention over
# 1024 positions, 8 heads of 16, and cross-attention to 77 tokens): the forward is fastest when
# a block's logits over all examples and heads number about 2^21 (1024 positions at batch 2:
# 128 queries, 18.5 against 22.4 ms at 256; at batch 4: 64 queries, 45.8 against 50.6 ms), the
# backward with blocks of 256 queries (fwd + bwd at batch 4: 110 ms against 114 at 128).
FORWARD_BLOCK_LOGITS = 2 ** 21
BACKWARD_Q_CHUNK = 256


def _default_q_chunks(b: int, n: int, t: int, k_chunk: int) -> tuple[int, int]:
  """(forward, backward) query chunks: the forward's a power of two in [64, 512] (at most t)
  whose block holds about FORWARD_BLOCK_LOGITS logits; the backward's the largest multiple of
  it up to BACKWARD_Q_CHUNK that divides the padded queries (padding is to the forward's)."""
  fwd = 2 ** int(math.log2(max(FORWARD_BLOCK_LOGITS // (b * n * k_chunk), 1)))
  fwd = min(max(fwd, 64), 512, t)
  blocks = -(-t // fwd)
  bwd = fwd
  for m in range(2, max(BACKWARD_Q_CHUNK // fwd, 1) + 1):
    if blocks % m == 0:
      bwd = fwd * m
  return fwd, bwd


# Long sequences are computed a few heads at a time. Batched over every example and head, a
# block of 256 queries by 1024 keys at batch 4 and 8 heads holds 2^23 logits (32 MB), and each
# of the block's products and elementwise passes streams it through memory; a loop over the
# heads keeps each block near 2^19 logits (2 MB, in the cache) at the cost of more, smaller
# products. The batch stays inside the block, so that a batch split over devices stays split.
# Measured on the 2-core CPU (XLA:CPU, jax 0.10; fwd + bwd, alternated): 1024 positions, 8 heads
# of 16, batch 4: 187 -> 143 ms (a head and 128 queries a block), batch 2: 78 -> 68 ms (256
# queries), batch 1: 44 -> 35 ms; 8 heads of 40 at batch 1: 2304 positions 583 -> 380 ms, 4096
# positions 1,431 -> 1,200 ms, 1024 positions the same. With 256 positions (2^16 logits a head)
# or cross-attention to 77 tokens, one block over all heads is faster, so the loop starts where
# a head's block of up to 1024 queries by its key chunk reaches HEAD_LOOP_MIN_LOGITS. Only on
# the CPU, where it was measured: elsewhere all heads stay in one block.
HEAD_LOOP_MIN_LOGITS = 2 ** 20
HEAD_GROUP_LOGITS = 2 ** 19


def _default_head_group(b: int, n: int, t: int, k_chunk: int) -> tuple[int, int | None]:
  """(heads per block, query chunk): (n, None), one block over all heads, off the CPU or below
  HEAD_LOOP_MIN_LOGITS a head; else a power-of-two query chunk in [64, 512] (at most t) and the
  largest divisor of n whose block, b x heads x queries x k_chunk, holds at most
  HEAD_GROUP_LOGITS (at least one head)."""
  if jax.default_backend() != "cpu" or min(t, 1024) * k_chunk < HEAD_LOOP_MIN_LOGITS:
    return n, None
  qc = 2 ** int(math.log2(max(HEAD_GROUP_LOGITS // (b * k_chunk), 1)))
  qc = min(max(qc, 64), 512, t)
  group = max(g for g in range(1, n + 1)
              if n % g == 0 and (g == 1 or b * g * qc * k_chunk <= HEAD_GROUP_LOGITS))
  return group, qc


def _head_loop(q, k, v, mask, s, q_chunks, k_chunk, group):
  """_attention over heads-first padded q, k, v [B, N, T, H], `group` heads at a time (lax.map
  over the head groups; each group's backward is the same custom VJP)."""
  b, n, tp, h = q.shape
  split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], n // group, group, *x.shape[2:]), 1, 0)
  xs = (split(q), split(k), split(v))
  if mask is not None and mask.shape[1] != 1:  # one mask per head: looped with the heads
    xs += (split(mask),)

  def one(args):
    m = args[3] if len(args) == 4 else mask
    return _attention(args[0], args[1], args[2], m, s, q_chunks, k_chunk)

  out = jax.lax.map(one, xs)  # [N / group, B, group, Tp, H]
  return jnp.moveaxis(out, 0, 1).reshape(b, n, tp, h)


def chunked_attention(q, k, v, mask=None, *, q_chunk: int | None = None, k_chunk: int = 1024,
                      head_group: int | None = None):
  """Scaled dot-product attention in O(T + S) memory. q [B, T, N, H], k/v [B, S, N, H]; mask
  broadcasts to [B, N, T, S] (True = attend). Chunks larger than the sequence shrink to it.
  head_group: how many of the N heads each block holds (a divisor of N; fewer than N loops over
  the heads); q_chunk: the queries each block holds. None: chosen by shape
  (_default_head_group, then _default_q_chunks when all heads are in one block)."""
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[::2] != k.shape[::2] or \
      q.shape[-1] != k.shape[-1]:
    raise ValueError(f"attention expects q [B, T, N, H] and k, v [B, S, N, H]; got "
                     f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
  b, t, n, _ = q.shape
  s = k.shape[1]
  k_chunk = min(k_chunk, s)
  group_qc = None
  if head_group is None:
    head_group, group_qc = _default_head_group(b, n, t, k_chunk)
  if head_group < 1 or n % head_group:
    raise ValueError(f"head_group={head_group} does not divide the {n} heads")
  if q_chunk is not None:
    q_chunks = (min(q_chunk, t),) * 2
  elif group_qc is not None:
    q_chunks = (group_qc,) * 2
  else:
    q_chunks = _default_q_chunks(b, head_group, t, k_chunk)
  heads_first = lambda x, c: _pad_to(jnp.swapaxes(x, 1, 2), 2, c)  # [B, N, T, H]: plain matmuls
  # q scaled here, outside the custom VJP (its gradient is scaled back by JAX), so no block of
  # logits is: a pass over each block fewer, forward and backward.
  q = (q.astype(jnp.float32) / math.sqrt(q.shape[-1])).astype(q.dtype)
  qp, kp, vp = heads_first(q, q_chunks[0]), heads_first(k, k_chunk), heads_first(v, k_chunk)
  mask = _prepare_mask(mask, b, n, t, s, q_chunks[0], k_chunk)
  if head_group < n:
    out = _head_loop(qp, kp, vp, mask, s, q_chunks, k_chunk, head_group)
  else:
    out = _attention(qp, kp, vp, mask, s, q_chunks, k_chunk)
  return jnp.swapaxes(out[:, :, :t], 1, 2).astype(v.dtype)
