"""The model fields checkpoints need (RoPE scaling, norm epsilon): bad values name the field."""
import pytest


@pytest.mark.parametrize('overrides, error', [
    (dict(rope_scaling='ntk'), "model.rope_scaling: 'ntk' is not one of"),
    (dict(rope_scaling='linear', rope_scaling_factor=0.5), 'model.rope_scaling_factor: must be >= 1'),
    (dict(rope_scaling='llama3', rope_low_freq_factor=4.0, rope_high_freq_factor=1.0),
     'model.rope_low_freq_factor: llama3 scaling needs'),
    (dict(rope_scaling='dynamic', rope_scaling_factor=2.0, rope_original_max_len=0),
     'model.rope_original_max_len: dynamic scaling needs the pretrained length'),
    (dict(norm_eps=0.0), 'model.norm_eps: must be > 0'),
])
def test_bad_model_fields_name_the_field(overrides, error):
  from longjax.models import testing  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=error):
    testing.tiny_model_config('full', **overrides)


def test_a_bad_local_rope_base_names_the_field():
  from longjax.models import testing  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='model.rope_local_max_wavelength: must be > 0, or -1'):
    testing.tiny_model_config('local', rope_local_max_wavelength=0.0)
