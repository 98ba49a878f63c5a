"""What a sweep holds fixed across lengths and kinds, so that a comparison compares context.

Two things confound a sequence-length sweep (shared/notes/science-audit.md §3):

* **Documents per step.** With a fixed token budget per step, a longer
  training length means fewer independent sequences per gradient (32 rows at
  L=128 but 2 at L=2048): the gradient's noise, not the context, made long
  runs look worse. `step_shape` keeps the sequences per optimizer step fixed at
  every length (`--sequences_per_step`), splitting them into micro-batches of
  at most `--micro_tokens` tokens by gradient accumulation; with a fixed token
  budget instead (`--tokens_per_batch`), `batch_for` refuses a length that
  leaves fewer than `--min_sequences` (16) sequences per step.
* **Attention budget.** Kinds see different numbers of keys for the same
  settings (local r: 2r + 1; global_local: 2r + 1 + g; transient_global:
  2r + 1 + L/k). `matched_settings` sets each kind's `budget_param` so that
  its keys per query (`KindSpec.keys_per_query`, `--match=keys`) or its
  attention layer's forward FLOPs per token (XLA's cost analysis of the
  lowered layer, nothing compiled or run, `--match=flops`) is the largest that does not
  exceed the budget: `--budget=K` keys, or the FLOPs per token of full
  attention over K keys. `full` has nothing to set and is left as it is (the
  ceiling every kind is compared to).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping, Optional


class BudgetError(ValueError):
  """A budget no setting of a kind meets; the message names the kind and the fix."""


# Documents per step ------------------------------------------------------------


def batch_for(tokens_per_batch: int, length: int, min_sequences: int = 16) -> int:
  """The global batch that holds `tokens_per_batch` tokens of `length` each."""
  if tokens_per_batch % length:
    raise BudgetError(f'--tokens_per_batch={tokens_per_batch} is not a multiple of length '
                      f'{length}: choose lengths that divide it, so every run sees the same '
                      'tokens per step.')
  batch = tokens_per_batch // length
  if batch < min_sequences:
    raise BudgetError(
        f'--tokens_per_batch={tokens_per_batch} gives {batch} sequences per step at length '
        f'{length}, fewer than --min_sequences={min_sequences}: a gradient over so few '
        'documents is noisier than at the short lengths, which a length comparison would '
        f'read as an effect of context. Raise --tokens_per_batch to at least '
        f'{min_sequences * length}, or hold documents fixed with --sequences_per_step.')
  return batch


def step_shape(sequences: int, length: int, micro_tokens: int = 0) -> tuple[int, int]:
  """(batch_size, grad_accum_steps): `sequences` per optimizer step at every length,
  in the fewest micro-batches of at most `micro_tokens` tokens (0: one micro-batch).

  grad_accum_steps divides the batch (config validation requires it), so the
  step averages exactly `sequences` documents whatever the length.
  """
  if sequences < 1:
    raise BudgetError(f'--sequences_per_step={sequences}: give a positive number of '
                      'sequences per optimizer step (16 or more for a fair comparison).')
  if not micro_tokens:
    return sequences, 1
  for accum in range(1, sequences + 1):
    if sequences % accum == 0 and (sequences // accum) * length <= micro_tokens:
      return sequences, accum
  raise BudgetError(f'--micro_tokens={micro_tokens} is shorter than one sequence of length '
                    f'{length}: raise it to at least {length}.')


# Attention budget -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Matched:
  """A kind's settings under a budget, and what they cost."""
  kind: str
  settings: dict  # {budget_param: value}, what the run overrides ({} for full)
  keys_per_query: int
  flops_per_token: Optional[float] = None  # --match=flops only


def keys_per_query(kind: str, settings: Mapping, length: int, causal: bool) -> int:
  from longjax import attention  # pylint: disable=g-import-not-at-top  (imports JAX)
  spec = attention.spec(kind)
  return spec.keys_per_query(spec.settings(settings), length, causal)


def _candidates(param: str, upper: int) -> range:
  from longjax import attention  # pylint: disable=g-import-not-at-top
  rule = attention.PARAMS[param]
  step = 2 if rule.even else 1
  start = int(rule.minimum) + (int(rule.minimum) % 2 if rule.even else 0)
  return range(start, max(start, upper) + 1, step)


def match_keys(kind: str, settings: Mapping, length: int, causal: bool, budget: int) -> Matched:
  """The largest value of the kind's budget_param whose keys per query <= budget.

  keys_per_query is not monotone in every parameter (a causal chunk's last
  query sees length % c keys), so every value up to the budget is tried, the
  most keys under the budget winning (ties: the larger value).
  """
  from longjax import attention  # pylint: disable=g-import-not-at-top
  spec = attention.spec(kind)
  if spec.budget_param is None:
    return Matched(kind, {}, keys_per_query(kind, settings, length, causal))
  best = None
  for value in _candidates(spec.budget_param, min(budget, length)):
    keys = keys_per_query(kind, {**settings, spec.budget_param: value}, length, causal)
    if keys <= budget and (best is None or keys >= best[0]):
      best = (keys, value)
  if best is None:
    smallest = _candidates(spec.budget_param, 0)[0]
    fewest = keys_per_query(kind, {**settings, spec.budget_param: smallest}, length, causal)
    raise BudgetError(_too_small(kind, spec.budget_param, smallest, f'{fewest} keys per query',
                                 f'--budget={budget} keys', length))
  return Matched(kind, {spec.budget_param: best[1]}, best[0])


def _too_small(kind, param, smallest, cost, budget, length) -> str:
  hint = {'transient_global': ' (its length / summary_block summaries alone may exceed it: '
                              'raise --set model.attention.summary_block)',
          'global_local': ' (its num_global globals count too)'}.get(kind, '')
  return (f'{kind} at length {length}: even {param}={smallest} costs {cost}, more than '
          f'{budget}{hint}; raise --budget or leave {kind} out of --kinds.')


FlopsFn = Callable[[str, Mapping, int, bool], float]


def match_flops(kind: str, settings: Mapping, length: int, causal: bool, budget: int,
                flops: FlopsFn) -> Matched:
  """The largest value of budget_param whose layer FLOPs per token at `length` are at
  most those of full attention over `budget` keys (flops(kind, settings, length,
  causal) -> FLOPs per token). The blocked kernels' FLOPs grow with their tile,
  so the value is found by bisection."""
  from longjax import attention  # pylint: disable=g-import-not-at-top
  spec = attention.spec(kind)
  target = flops('full', settings, budget, causal)
  cost = lambda value: flops(kind, {**settings, spec.budget_param: value}, length, causal)
  if spec.budget_param is None:
    return Matched(kind, {}, keys_per_query(kind, settings, length, causal),
                   flops(kind, settings, length, causal))
  values = _candidates(spec.budget_param, min(budget, length))
  if cost(values[0]) > target:
    raise BudgetError(_too_small(kind, spec.budget_param, values[0],
                                 f'{cost(values[0]):.4g} FLOPs per token',
                                 f'full attention over --budget={budget} keys '
                                 f'({target:.4g})', length))
  low, high = 0, len(values) - 1  # cost(values[low]) <= target
  while low < high:
    middle = (low + high + 1) // 2
    if cost(values[middle]) <= target:
      low = middle
    else:
      high = middle - 1
  value = values[low]
  chosen = {spec.budget_param: value}
  return Matched(kind, chosen, keys_per_query(kind, {**settings, **chosen}, length, causal),
                 cost(value))


def layer_flops(model: Mapping) -> FlopsFn:
  """flops(kind, attention settings, length, causal): forward FLOPs per token of one
  self-attention layer of `model` (a config's model block) — its projections, the
  kernel, TGlobal's summaries and Longformer's global projections — from XLA's cost
  analysis of the lowered layer (nothing is compiled or run). Cached."""

  @functools.lru_cache(maxsize=None)
  def cached(kind: str, settings: tuple, length: int, causal: bool) -> float:
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from longjax.models.attention import SelfAttention  # pylint: disable=g-import-not-at-top
    from longjax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
    block = dict(model)
    block['attention'] = {**dict(model.get('attention', {})), **dict(settings), 'kind': kind,
                          'layer_pattern': ()}
    block['max_len'] = max(int(block.get('max_len', 0)), length)
    config = ModelConfig.from_config(block)
    layer = nnx.eval_shape(lambda: SelfAttention(config, kind, causal=causal,
                                                 rngs=nnx.Rngs(0)))
    graph, state = nnx.split(layer)
    positions = jnp.arange(length)[None]

    def forward(state, x):
      return nnx.merge(graph, state)(x, positions=positions)[0]

    from longjax.attention import _blocks  # pylint: disable=g-import-not-at-top
    x = jax.ShapeDtypeStruct((1, length, config.emb_dim), jnp.dtype(config.dtype))
    with _blocks.one_chunk():  # XLA counts a loop's body once, not once per trip
      analysis = jax.jit(forward).lower(state, x).cost_analysis()
    if isinstance(analysis, (list, tuple)):
      analysis = analysis[0]
    return float(analysis['flops']) / length

  def flops(kind: str, settings: Mapping, length: int, causal: bool) -> float:
    return cached(kind, tuple(sorted(dict(settings).items())), int(length), bool(causal))

  return flops


def matched_settings(kinds, settings: Mapping, lengths, *, causal: bool, match: str,
                     budget: int, flops: Optional[FlopsFn] = None) -> dict:
  """{(kind, length): Matched} for every kind and length of a sweep."""
  if budget < 1:
    raise BudgetError(f'--budget={budget}: give the keys per query to match, e.g. --budget=256.')
  out = {}
  for kind in kinds:
    for length in lengths:
      if match == 'keys':
        out[kind, length] = match_keys(kind, settings, length, causal, budget)
      elif match == 'flops':
        out[kind, length] = match_flops(kind, settings, length, causal, budget, flops)
      else:
        raise BudgetError(f'--match={match}: use keys or flops.')
  return out


# A sweep's protocol ------------------------------------------------------------------

# How experiments.compare judges that a run trained to the end (compare.converged).
CRITERION = ('eval loss flat: (max - min) / min of the eval losses in the last 20% of steps '
             '<= 1%, from at least 2 evals')


@dataclasses.dataclass(frozen=True)
class Protocol:
  """Per-run overrides ({(kind, length): ['field=value', ...]}) and what the sweep
  holds fixed, as sweep.json records it."""
  overrides: dict
  description: dict


def protocol(configs: Mapping, lengths, *, overrides=(), tokens_per_batch: int = 0,
             min_sequences: int = 16, sequences_per_step: int = 0, micro_tokens: int = 0,
             match: str = '', budget: int = 0, flops: Optional[FlopsFn] = None) -> Protocol:
  """What every (kind, length) run of one task config sets, so that lengths differ
  only in context and kinds only in their attention (configs: {kind: its loaded
  ConfigDict, with the sweep's --set overrides}). Raises BudgetError."""
  given = {o.split('=', 1)[0] for o in overrides}
  if tokens_per_batch and sequences_per_step:
    raise BudgetError('give --tokens_per_batch (tokens per step fixed) or '
                      '--sequences_per_step (documents per step fixed), not both.')
  if micro_tokens and not sequences_per_step:
    raise BudgetError('--micro_tokens splits --sequences_per_step into micro-batches; give '
                      '--sequences_per_step too.')
  if (tokens_per_batch or sequences_per_step) and given & {'batch_size', 'grad_accum_steps'}:
    raise BudgetError('--set batch_size / grad_accum_steps conflict with --tokens_per_batch and '
                      '--sequences_per_step, which set them per length; drop the --set.')
  if bool(match) != bool(budget):
    raise BudgetError('--match and --budget go together: e.g. --match=keys --budget=256.')
  per_run = {(kind, length): [] for kind in configs for length in lengths}
  first = next(iter(configs.values()))
  if sequences_per_step:
    shapes = {n: step_shape(sequences_per_step, n, micro_tokens) for n in lengths}
    steps = (f'documents per step fixed: {sequences_per_step} sequences per optimizer step at '
             'every length')
  elif tokens_per_batch:
    shapes = {n: (batch_for(tokens_per_batch, n, min_sequences), 1) for n in lengths}
    steps = (f'tokens per step fixed: {tokens_per_batch}, at least {min_sequences} sequences '
             'per step at every length')
  else:
    shapes = {n: (int(first.batch_size), int(first.grad_accum_steps)) for n in lengths}
    steps = f'the config\'s batch_size ({first.batch_size} sequences per step) at every length'
  for (kind, length), extra in per_run.items():
    if sequences_per_step or tokens_per_batch:
      batch, accum = shapes[length]
      extra += [f'batch_size={batch}', f'grad_accum_steps={accum}']
  description = dict(
      documents_per_step=steps,
      batch_size={n: shapes[n][0] for n in lengths},
      grad_accum_steps={n: shapes[n][1] for n in lengths},
      match='none: every kind at its config\'s settings', settings={},
      num_train_steps=int(first.num_train_steps), criterion=CRITERION)
  if match:
    description['match'] = (f'keys per query <= {budget} (KindSpec.keys_per_query)'
                            if match == 'keys' else
                            f'attention layer forward FLOPs per token <= full attention over '
                            f'{budget} keys (XLA cost analysis)')
    for kind, config in configs.items():
      from longjax import attention  # pylint: disable=g-import-not-at-top
      param = attention.spec(kind).budget_param
      if param and f'model.attention.{param}' in given:
        raise BudgetError(f'--set model.attention.{param} conflicts with --match={match}, '
                          f'which sets {kind}\'s {param} per length; drop the --set.')
      model = config.model.to_dict()
      causal = model.get('arch', 'lm') == 'lm'  # an encoder's kind is bidirectional
      found = matched_settings([kind], model['attention'], lengths, causal=causal, match=match,
                               budget=budget, flops=flops or layer_flops(model))
      for (_, length), matched in found.items():
        per_run[kind, length] += [f'model.attention.{p}={v}' for p, v in matched.settings.items()]
        description['settings'].setdefault(kind, {})[length] = dict(
            matched.settings, keys_per_query=matched.keys_per_query,
            **({'flops_per_token': matched.flops_per_token} if matched.flops_per_token else {}))
  return Protocol(per_run, description)
