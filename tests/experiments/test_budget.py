"""What a sweep holds fixed: documents per step, and each kind's attention budget.

References: the papers' budgets written out (a window of 2r + 1 keys, plus g
globals, ...), the arithmetic of attention FLOPs (4 h d per key and query for
QK^T and PV), and exhaustive checks of the chosen values' neighbours.
"""
import pytest

from experiments import budget
from longjax import attention

MODEL = dict(arch='lm', num_layers=1, emb_dim=64, num_heads=4, num_kv_heads=4, mlp_dim=128,
             vocab_size=64, max_len=128, dtype='float32', param_dtype='float32',
             attention=dict(radius=16, num_global=4, summary_block=16, level0_block=16,
                            chunk_size=16, max_span=16, span_ramp=4.0))
SETTINGS = MODEL['attention']


@pytest.mark.parametrize('length, micro_tokens, expected', [
    (128, 0, (16, 1)), (4096, 0, (16, 1)),
    (128, 4096, (16, 1)), (1024, 4096, (16, 4)), (4096, 4096, (16, 16)),
    (1024, 3000, (16, 8)),  # 2 x 1024 <= 3000 and 8 divides 16
])
def test_step_shape_holds_sequences_per_step(length, micro_tokens, expected):
  batch, accum = budget.step_shape(16, length, micro_tokens)
  assert (batch, accum) == expected
  assert batch % accum == 0 and (not micro_tokens or batch // accum * length <= micro_tokens)


def test_step_shape_and_batch_for_refuse_what_cannot_hold():
  with pytest.raises(budget.BudgetError, match='--micro_tokens=100 is shorter than one sequence'):
    budget.step_shape(16, 128, 100)
  with pytest.raises(budget.BudgetError, match='fewer than --min_sequences=16'):
    budget.batch_for(8192, 1024)
  assert budget.batch_for(8192, 512) == 16 and budget.batch_for(8192, 1024, min_sequences=8) == 8


@pytest.mark.parametrize('causal', [False, True])
def test_match_keys_gives_the_papers_budgets(causal):
  k, g = 128, SETTINGS['num_global']
  matched = {kind: budget.match_keys(kind, SETTINGS, 1024, causal, k).settings
             for kind in attention.KINDS}
  window = (k - 1) // 2 if not causal else k - 1          # 2r + 1 <= k, or r + 1 <= k
  window_g = (k - 1 - g) // 2 if not causal else k - 1 - g
  assert matched['full'] == {}
  assert matched['local'] == {'radius': window}
  assert matched['adaptive_span'] == {'max_span': window}
  assert matched['global_local'] == {'radius': window_g}
  assert matched['chunked'] == {'chunk_size': k}
  summaries = 1024 // 16 if not causal else 1023 // 16
  tglobal = (k - 1 - summaries) // 2 if not causal else k - 1 - summaries
  assert matched['transient_global'] == {'radius': tglobal}


@pytest.mark.parametrize('kind', ['hierarchical', 'multiresolution'])
def test_match_keys_takes_the_most_keys_under_the_budget(kind):
  spec = attention.spec(kind)
  found = budget.match_keys(kind, SETTINGS, 2048, False, 200)
  assert found.keys_per_query <= 200
  every = [spec.keys_per_query(dict(SETTINGS, level0_block=b), 2048, False)
           for b in range(2, 202, 2)]
  assert found.keys_per_query == max(keys for keys in every if keys <= 200)


def test_layer_flops_follow_the_attention_arithmetic():
  flops = budget.layer_flops(MODEL)
  per_key = 4 * MODEL['emb_dim']  # QK^T and PV: 2 flops each per key, query and feature
  # Full attention: each extra key of context costs per_key per token, plus the
  # softmax's few flops per score.
  extra = (flops('full', SETTINGS, 512, True) - flops('full', SETTINGS, 256, True)) / 256
  assert per_key <= extra <= 1.1 * per_key
  # The blocked window costs per token what its tiles hold, at any length: XLA's
  # cost analysis counts a loop once, so the layer is traced unchunked.
  short, long = (flops('local', SETTINGS, n, True) for n in (1024, 1 << 16))
  assert long == pytest.approx(short, rel=1e-3)


def test_match_flops_is_the_largest_value_under_full_attention_over_the_budget():
  flops = budget.layer_flops(MODEL)
  target = flops('full', SETTINGS, 128, True)
  for kind in ('local', 'transient_global', 'hierarchical'):
    found = budget.match_flops(kind, SETTINGS, 1024, True, 128, flops)
    (param, value), = found.settings.items()
    step = 2 if attention.PARAMS[param].even else 1
    assert found.flops_per_token <= target
    assert flops(kind, dict(SETTINGS, **{param: value + step}), 1024, True) > target
  with pytest.raises(budget.BudgetError, match='transient_global at length 1024: even radius=1'):
    budget.match_flops('transient_global', dict(SETTINGS, summary_block=2), 1024, True, 64, flops)
