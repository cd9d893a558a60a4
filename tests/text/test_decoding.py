"""Decoding: Hugging Face's sampling warpers as the reference for the filtered distribution; an
exhaustive search over all sequences as the reference for beam search; plain Python loops as the
reference for greedy decoding."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.text import decoding

PAD, BOS, EOS = 0, 1, 2


def markov_step(table):
  """A toy model: the next token's logits depend on the current token only (the cache, unused,
  counts the calls)."""
  table = jnp.asarray(table, jnp.float32)
  return lambda tokens, pos, cache: (table[tokens], cache + 1)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0),
                                                     (1.3, 0, 0.8), (0.5, 8, 0.6),
                                                     (1.0, 1, 0.9), (2.0, 0, 0.05)])
def test_filter_logits_matches_transformers(temperature, top_k, top_p):
  torch = pytest.importorskip("torch")
  lp = pytest.importorskip("transformers.generation.logits_process")
  logits = np.random.default_rng(0).normal(size=(4, 40)).astype(np.float32) * 3
  expected = torch.from_numpy(logits.copy())
  warpers = [lp.TemperatureLogitsWarper(temperature)]
  if top_k:
    warpers.append(lp.TopKLogitsWarper(top_k))
  if top_p < 1.0:
    warpers.append(lp.TopPLogitsWarper(top_p))
  for w in warpers:
    expected = w(None, expected)
  got = np.asarray(decoding.filter_logits(logits, temperature, top_k, top_p))
  expected = expected.numpy()
  np.testing.assert_array_equal(np.isinf(got), np.isinf(expected))
  finite = np.isfinite(expected)
  np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-6)


def test_greedy_is_the_argmax_chain_and_stops_at_the_end_token():
  rng = np.random.default_rng(1)
  table = rng.normal(size=(6, 6))
  ids = decoding.sample(markov_step(table), jnp.int32(0), 3, jax.random.PRNGKey(0),
                        bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=8)
  expected = [BOS]
  while len(expected) < 8 and expected[-1] != EOS:
    expected.append(int(np.argmax(table[expected[-1]])))
  expected += [PAD] * (8 - len(expected))
  np.testing.assert_array_equal(np.asarray(ids), np.tile(expected, (3, 1)))
  # a model that ends at once: the end token, then padding
  table = np.zeros((6, 6))
  table[:, EOS] = 10.0
  step = markov_step(table)
  ids = decoding.sample(step, jnp.int32(0), 2, jax.random.PRNGKey(0), bos_id=BOS, eos_id=EOS,
                        pad_id=PAD, max_len=8)
  np.testing.assert_array_equal(np.asarray(ids), [[BOS, EOS] + [PAD] * 6] * 2)


def test_sampling_stays_inside_top_k_and_follows_the_distribution():
  logits = np.log(np.array([0.02, 0.02, 0.06, 0.5, 0.3, 0.1]))
  table = np.tile(logits, (6, 1))
  table[:, EOS] = -1e9  # never end: every position is a draw
  ids = decoding.sample(markov_step(table), jnp.int32(0), 4000, jax.random.PRNGKey(3),
                        bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=3, temperature=1.0, top_k=2)
  drawn = np.asarray(ids)[:, 1:].ravel()
  assert set(np.unique(drawn)) == {3, 4}
  np.testing.assert_allclose(np.mean(drawn == 3), 0.5 / 0.8, atol=0.02)


def exhaustive_best(table, max_len, alpha):
  """The best sequence by summed log-probability / length ** alpha, over every sequence that
  ends with EOS or reaches max_len."""
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(table, jnp.float32), -1), np.float64)
  best, best_score = None, -np.inf
  v = table.shape[0]
  for n in range(1, max_len):
    for seq in itertools.product(range(v), repeat=n):
      if EOS in seq[:-1] or (seq[-1] != EOS and n < max_len - 1):
        continue
      prev = (BOS,) + seq[:-1]
      score = sum(logp[a, b] for a, b in zip(prev, seq)) / n ** alpha
      if score > best_score:
        best, best_score = seq, score
  return [BOS, *best] + [PAD] * (max_len - 1 - len(best)), best_score


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_with_enough_beams_finds_the_exhaustive_best(alpha, seed):
  table = np.random.default_rng(seed).normal(size=(5, 5)) * 1.5
  max_len, beams = 5, 64  # 4 ** 3 unfinished prefixes at most: nothing is ever pruned
  ids, scores = decoding.beam_search(markov_step(table), jnp.zeros((2 * beams,), jnp.int32),
                                     2, beams, bos_id=BOS, eos_id=EOS, pad_id=PAD,
                                     max_len=max_len, length_penalty=alpha)
  expected, expected_score = exhaustive_best(table, max_len, alpha)
  np.testing.assert_array_equal(np.asarray(ids)[:, 0], [expected, expected])
  np.testing.assert_allclose(np.asarray(scores)[:, 0], expected_score, rtol=1e-5)
  assert np.all(np.diff(np.asarray(scores), axis=1) <= 1e-6)  # best first


def test_one_beam_with_no_length_penalty_is_greedy():
  table = np.random.default_rng(4).normal(size=(7, 7))
  greedy = decoding.sample(markov_step(table), jnp.int32(0), 1, jax.random.PRNGKey(0),
                           bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=9)
  ids, _ = decoding.beam_search(markov_step(table), jnp.zeros((1,), jnp.int32), 1, 1,
                                bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len=9,
                                length_penalty=0.0)
  np.testing.assert_array_equal(np.asarray(ids)[:, 0], np.asarray(greedy))
