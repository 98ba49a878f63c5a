"""The decoding loops, independent of the model: sampling and beam search.

Both drive a step function

    step_fn(tokens [n], positions [n], cache) -> (logits [n, vocab] fp32, cache)

that feeds one token per row at its position and returns the logits of the
next one, with any pytree `cache` whose leaves all have the rows as their
leading axis (alone, or merged row-major with a further axis: [rows * m, ...]). Shapes stay static: a `jax.lax.while_loop` runs at most
`max_decode_len` steps and stops early once every row is done; rows that are
done keep producing padding.

Sampling (`sample_loop`): token i of a row is drawn from the logits of step i
(greedy, temperature, top-k, top-p: `sampling.py`); a row is done after its
eos.

Beam search (`beam_search`) keeps `beam_size` hypotheses per row and scores a
finished one (ended by eos) by its log-probability divided by the GNMT length
penalty ((5 + length) / 6) ** alpha (Wu et al. 2016, as in t5x), length
counting the eos. Each step takes the 2 * beam_size best continuations of the
live hypotheses by log-probability; those that end in eos and rank among the
first beam_size are finished, the best beam_size others stay live. A row is
done when beam_size hypotheses have finished (fairseq's stopping rule), or at
max_decode_len, where live hypotheses are scored at that length. With
beam_size 1 this is exactly greedy decoding, whatever the length penalty.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from longjax.decode import sampling

# Log-probability of an impossible hypothesis: finite, so sums stay finite.
NEG_INF = -1.0e9

StepFn = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


class Sampled(NamedTuple):
  """tokens [b, n] (eos included, then pad), lengths [b] (tokens up to and with eos),
  log_probs [b] (sum of the model's log-probabilities of the tokens), logits
  [b, n, vocab] of every step or None, and the final cache."""
  tokens: jax.Array
  lengths: jax.Array
  log_probs: jax.Array
  logits: Optional[jax.Array]
  cache: Any


class Beams(NamedTuple):
  """tokens [b, beam, n] best first (eos included, then pad), scores [b, beam]
  (length-penalised log-probabilities), lengths [b, beam]."""
  tokens: jax.Array
  scores: jax.Array
  lengths: jax.Array


def _token_lengths(tokens, eos_id):
  """Tokens up to and with the first eos (all of them if none)."""
  n = tokens.shape[-1]
  if eos_id is None:
    return jnp.full(tokens.shape[:-1], n, jnp.int32)
  is_eos = tokens == eos_id
  first = jnp.argmax(is_eos, axis=-1)
  return jnp.where(jnp.any(is_eos, axis=-1), first + 1, n).astype(jnp.int32)


def sample_loop(step_fn: StepFn, first_logits, cache, *, start_positions, max_decode_len: int,
                rng=None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                eos_id: Optional[int] = 1, pad_id: int = 0,
                return_logits: bool = False) -> Sampled:
  """Generates up to max_decode_len tokens per row.

  first_logits: [b, vocab], the logits of token 0 (after the prompt).
  start_positions: [b], the position of token 0 (it is fed there to get the
    logits of token 1, and so on).
  eos_id: a row stops after this token; None never stops early.
  """
  sampling.check_settings(temperature, top_k, top_p)
  if max_decode_len < 1:
    raise ValueError(f'max_decode_len must be >= 1; got {max_decode_len}.')
  batch, vocab = first_logits.shape
  if rng is None:
    rng = jax.random.key(0)
  start_positions = jnp.asarray(start_positions, jnp.int32)

  state = dict(
      step=jnp.zeros((), jnp.int32),
      tokens=jnp.full((batch, max_decode_len), pad_id, jnp.int32),
      done=jnp.zeros((batch,), bool),
      log_probs=jnp.zeros((batch,), jnp.float32),
      next_logits=first_logits.astype(jnp.float32),
      rng=rng,
      cache=cache,
  )
  if return_logits:
    state['logits'] = jnp.zeros((batch, max_decode_len, vocab), jnp.float32)

  def emit(state):
    """Chooses token `step` of every row from next_logits."""
    rng, key = jax.random.split(state['rng'])
    token = sampling.sample_logits(state['next_logits'], key, temperature=temperature,
                                   top_k=top_k, top_p=top_p)
    done = state['done']
    token = jnp.where(done, pad_id, token)
    log_prob = jnp.take_along_axis(jax.nn.log_softmax(state['next_logits']), token[:, None],
                                   axis=1)[:, 0]
    state = dict(state, rng=rng,
                 tokens=state['tokens'].at[:, state['step']].set(token),
                 log_probs=state['log_probs'] + jnp.where(done, 0.0, log_prob),
                 done=done | (token == eos_id) if eos_id is not None else done)
    if return_logits:
      state['logits'] = state['logits'].at[:, state['step']].set(state['next_logits'])
    return state, token

  def body(state):
    state, token = emit(state)
    logits, cache = step_fn(token, start_positions + state['step'], state['cache'])
    return dict(state, step=state['step'] + 1, next_logits=logits.astype(jnp.float32),
                cache=cache)

  def cond(state):
    return (state['step'] < max_decode_len - 1) & ~jnp.all(state['done'])

  state = jax.lax.while_loop(cond, body, state)
  state, _ = emit(state)  # the last token needs no step after it
  return Sampled(state['tokens'], _token_lengths(state['tokens'], eos_id), state['log_probs'],
                 state.get('logits'), state['cache'])


def length_penalty(length, alpha: float):
  """GNMT / t5x brevity penalty ((5 + length) / 6) ** alpha."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _by_rows(fn, x, rows: int):
  """fn on x's rows: a leading axis of rows * m (rows merged with a further axis,
  row-major, as the caches' window buffers) is split into [rows, m] around fn."""
  if x.shape[0] == rows:
    return fn(x)
  y = fn(x.reshape((rows, x.shape[0] // rows) + x.shape[1:]))
  return y.reshape((-1,) + x.shape[1:])


def expand_beams(tree, beam_size: int, rows: Optional[int] = None):
  """Repeats every leaf's rows beam_size times: [b, ...] -> [b * beam_size, ...].

  rows: b, where some leaves merge the rows with a further axis ([b * m, ...]);
  None: every leading axis is b.
  """
  if rows is None:
    return jax.tree.map(lambda x: jnp.repeat(x, beam_size, axis=0), tree)
  return jax.tree.map(lambda x: _by_rows(lambda y: jnp.repeat(y, beam_size, axis=0), x, rows),
                      tree)


def _gather_beams(tree, origin, batch: int, beam_size: int):
  """Leaves [b * beam, ...] (or [b * beam * m, ...]): row (i, j) takes row (i, origin[i, j])."""
  flat = (jnp.arange(batch)[:, None] * beam_size + origin).reshape(-1)
  return jax.tree.map(lambda x: _by_rows(lambda y: jnp.take(y, flat, axis=0), x,
                                         batch * beam_size), tree)


def _top(scores, k, *arrays):
  """The k best entries along axis 1 of scores and of each array [b, m, ...]."""
  best, index = jax.lax.top_k(scores, k)
  take = lambda x: jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)),
                                       axis=1)
  return (best,) + tuple(take(x) for x in arrays)


def beam_search(step_fn: StepFn, first_logits, cache, *, start_positions, beam_size: int,
                max_decode_len: int, alpha: float = 0.6, eos_id: Optional[int] = 1,
                pad_id: int = 0) -> Beams:
  """Beam search with a length penalty (see the module docstring).

  first_logits: [b, vocab]; cache: leaves [b, ...] (expanded to b * beam_size
  rows here); start_positions: [b]. step_fn is called with b * beam_size rows.
  """
  if beam_size < 1:
    raise ValueError(f'beam_size must be >= 1; got {beam_size}.')
  if max_decode_len < 1:
    raise ValueError(f'max_decode_len must be >= 1; got {max_decode_len}.')
  batch, vocab = first_logits.shape
  k, n = beam_size, max_decode_len
  positions = jnp.repeat(jnp.asarray(start_positions, jnp.int32), k)
  first = jax.nn.log_softmax(first_logits.astype(jnp.float32))
  empty = jnp.full((batch, k, n), pad_id, jnp.int32)
  state = dict(
      step=jnp.zeros((), jnp.int32),
      alive_seqs=empty,
      # Only the first live hypothesis exists at the start.
      alive_lp=jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF)[None].repeat(batch, 0),
      fin_seqs=empty,
      fin_scores=jnp.full((batch, k), NEG_INF, jnp.float32),
      fin_count=jnp.zeros((batch,), jnp.int32),
      next_lp=jnp.broadcast_to(first[:, None], (batch, k, vocab)),
      cache=expand_beams(cache, k, rows=batch),
  )

  def emit(state):
    """Extends the live hypotheses by token `step`; returns (state, origin, tokens)."""
    step = state['step']
    done = state['fin_count'] >= k
    candidates = (state['alive_lp'][:, :, None] + state['next_lp']).reshape(batch, k * vocab)
    lp, index = jax.lax.top_k(candidates, 2 * k)
    origin, token = index // vocab, (index % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(state['alive_seqs'], origin[:, :, None], axis=1)
    seqs = seqs.at[:, :, step].set(token)
    is_eos = (token == eos_id) if eos_id is not None else jnp.zeros_like(token, bool)
    possible = lp > NEG_INF / 2
    finishes = is_eos & possible & (jnp.arange(2 * k) < k) & ~done[:, None]
    new_scores = jnp.where(finishes, lp / length_penalty(step + 1, alpha), NEG_INF)
    fin_scores, fin_seqs = _top(jnp.concatenate([state['fin_scores'], new_scores], axis=1), k,
                                jnp.concatenate([state['fin_seqs'], seqs], axis=1))
    live_lp = jnp.where(is_eos, NEG_INF, lp)
    alive_lp, alive_seqs, alive_origin, alive_token = _top(live_lp, k, seqs, origin, token)
    state = dict(state, alive_seqs=alive_seqs, alive_lp=alive_lp, fin_seqs=fin_seqs,
                 fin_scores=fin_scores,
                 fin_count=state['fin_count'] + jnp.sum(finishes, axis=1, dtype=jnp.int32))
    return state, alive_origin, alive_token

  def body(state):
    state, origin, token = emit(state)
    cache = _gather_beams(state['cache'], origin, batch, k)
    logits, cache = step_fn(token.reshape(-1), positions + state['step'], cache)
    next_lp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, k, vocab)
    return dict(state, step=state['step'] + 1, next_lp=next_lp, cache=cache)

  def cond(state):
    return (state['step'] < n - 1) & ~jnp.all(state['fin_count'] >= k)

  state = jax.lax.while_loop(cond, body, state)
  state, _, _ = emit(state)
  # Rows that did not finish beam_size hypotheses also rank their live ones,
  # scored at the length they reached.
  unfinished = state['fin_count'] < k
  live_scores = jnp.where(unfinished[:, None] & (state['alive_lp'] > NEG_INF / 2),
                          state['alive_lp'] / length_penalty(state['step'] + 1, alpha), NEG_INF)
  scores, tokens = _top(jnp.concatenate([state['fin_scores'], live_scores], axis=1), k,
                        jnp.concatenate([state['fin_seqs'], state['alive_seqs']], axis=1))
  return Beams(tokens, scores, _token_lengths(tokens, eos_id))
