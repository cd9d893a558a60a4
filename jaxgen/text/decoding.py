"""Autoregressive decoding as pure, jittable functions: greedy, temperature / top-k / top-p
sampling, and beam search, each one `lax.while_loop` over a fixed maximum length that stops
early once every sequence has produced the end token.

A model enters through `step(tokens [N], pos, cache) -> (logits [N, V], cache)`: the logits of
the token after `tokens`, which sit at position `pos`, given a key/value cache of the earlier
positions. Temperature, top_k and top_p are traced values (changing them never recompiles);
the number of beams and the maximum length fix the shapes, so they are static.

Sequences come back as ids [N, L]: ids[:, 0] is the start token, then the generated tokens, the
end token, and `pad_id` after it.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Step = Callable[[jax.Array, jax.Array, object], tuple[jax.Array, object]]
NEG_INF = -1e30  # finite, so that masked scores never make inf - inf


def filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
  """Hugging Face's sampling warpers in their order: logits / temperature, then keep the top_k
  largest (ties with the k-th kept; 0 = all), then top-p (nucleus): drop the tokens, smallest
  first, whose cumulative probability stays at or below 1 - top_p (the most likely is always
  kept). Dropped tokens get -inf. float32 [..., V] -> [..., V]."""
  logits = jnp.asarray(logits, jnp.float32) / jnp.asarray(temperature, jnp.float32)
  vocab = logits.shape[-1]
  top_k = jnp.asarray(top_k, jnp.int32)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  descending = -jnp.sort(-logits, axis=-1)
  kth = jnp.take_along_axis(descending, jnp.broadcast_to(k - 1, logits.shape[:-1])[..., None], -1)
  logits = jnp.where(logits < kth, -jnp.inf, logits)
  order = jnp.argsort(logits, axis=-1)  # ascending
  ascending = jnp.take_along_axis(logits, order, -1)
  cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
  drop_sorted = (cumulative <= 1.0 - jnp.asarray(top_p, jnp.float32)).at[..., -1].set(False)
  drop = jnp.take_along_axis(drop_sorted, jnp.argsort(order, axis=-1), -1)
  return jnp.where(drop, -jnp.inf, logits)


def sample(step: Step, cache, batch: int, key, *, bos_id: int, eos_id: int, pad_id: int,
           max_len: int, temperature=0.0, top_k=0, top_p=1.0) -> jax.Array:
  """Greedy decoding (temperature 0) or sampling from the filtered distribution (temperature
  > 0, with top_k / top_p). -> ids [batch, max_len]."""
  temperature = jnp.asarray(temperature, jnp.float32)

  def choose(logits, k):
    greedy = jnp.argmax(logits, axis=-1)
    warped = filter_logits(logits, jnp.where(temperature > 0, temperature, 1.0), top_k, top_p)
    drawn = jax.random.categorical(k, warped, axis=-1)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)

  def cond(carry):
    i, _, _, done = carry
    return (i < max_len - 1) & ~jnp.all(done)

  def body(carry):
    i, ids, cache, done = carry
    logits, cache = step(ids[:, i], i, cache)
    token = choose(logits, jax.random.fold_in(key, i))
    token = jnp.where(done, pad_id, token)
    ids = ids.at[:, i + 1].set(token)
    return i + 1, ids, cache, done | (token == eos_id)

  ids = jnp.full((batch, max_len), pad_id, jnp.int32).at[:, 0].set(bos_id)
  done = jnp.zeros((batch,), bool)
  return jax.lax.while_loop(cond, body, (jnp.int32(0), ids, cache, done))[1]


def _length_penalty(length, alpha):
  return jnp.asarray(length, jnp.float32) ** alpha


def beam_search(step: Step, cache, batch: int, beams: int, *, bos_id: int, eos_id: int,
                pad_id: int, max_len: int, length_penalty=1.0) -> tuple[jax.Array, jax.Array]:
  """Beam search with `beams` hypotheses per sequence. `cache` holds batch * beams rows
  (sequence-major: rows b * beams .. b * beams + beams - 1 belong to sequence b).

  A hypothesis's score is its summed log-probability / length ** length_penalty, the length
  counting the generated tokens with the end token (Hugging Face's normalisation). Each step
  extends the alive hypotheses by every token, keeps the best 2 * beams candidates, moves those
  that end to the finished set (its best `beams` kept) and continues the best `beams` others.
  At max_len the alive ones finish as they are. The search stops early when no alive
  hypothesis can still beat the worst finished one (the bound holds for length_penalty >= 0),
  so with enough beams it returns the exact best sequence.
  -> (ids [batch, beams, max_len] best first, scores [batch, beams])."""
  alpha = jnp.asarray(length_penalty, jnp.float32)
  seqs = jnp.full((batch, beams, max_len), pad_id, jnp.int32).at[:, :, 0].set(bos_id)
  # one live beam at first: the others start at -inf so that the first step does not repeat it
  alive_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (beams - 1), jnp.float32), (batch, 1))
  fin_seqs = seqs
  fin_scores = jnp.full((batch, beams), NEG_INF, jnp.float32)

  def cond(carry):
    i, _, alive_logp, _, _, fin_scores = carry
    best_possible = alive_logp[:, 0] / _length_penalty(max_len - 1, alpha)
    worst_finished = fin_scores[:, -1]
    can_improve = jnp.any(best_possible > worst_finished)
    return (i < max_len - 1) & can_improve

  def body(carry):
    i, seqs, alive_logp, cache, fin_seqs, fin_scores = carry
    logits, cache = step(seqs[:, :, i].reshape(batch * beams), i, cache)
    v = logits.shape[-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(batch, beams, v)
    cand = (alive_logp[..., None] + logp).reshape(batch, beams * v)
    top_logp, top_idx = jax.lax.top_k(cand, 2 * beams)
    parent, token = top_idx // v, (top_idx % v).astype(jnp.int32)
    cand_seqs = jnp.take_along_axis(seqs, parent[..., None], axis=1).at[:, :, i + 1].set(token)
    ends = (token == eos_id) | (i + 1 == max_len - 1)
    # finished: merge the candidates that end with the finished set, keep the best `beams`
    new_scores = jnp.where(ends & (top_logp > NEG_INF / 2),
                           top_logp / _length_penalty(i + 1, alpha), NEG_INF)
    all_scores = jnp.concatenate([fin_scores, new_scores], axis=1)
    all_seqs = jnp.concatenate([fin_seqs, cand_seqs], axis=1)
    fin_scores, keep = jax.lax.top_k(all_scores, beams)
    fin_seqs = jnp.take_along_axis(all_seqs, keep[..., None], axis=1)
    # alive: the best `beams` candidates that do not end
    alive_scores = jnp.where(ends, NEG_INF, top_logp)
    alive_logp, keep = jax.lax.top_k(alive_scores, beams)
    seqs = jnp.take_along_axis(cand_seqs, keep[..., None], axis=1)
    rows = (jnp.take_along_axis(parent, keep, axis=1)
            + jnp.arange(batch)[:, None] * beams).reshape(-1)
    cache = jax.tree.map(lambda c: c[rows], cache)
    return i + 1, seqs, alive_logp, cache, fin_seqs, fin_scores

  carry = (jnp.int32(0), seqs, alive_logp, cache, fin_seqs, fin_scores)
  _, _, _, _, fin_seqs, fin_scores = jax.lax.while_loop(cond, body, carry)
  return fin_seqs, fin_scores
