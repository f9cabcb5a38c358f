"""experiments.bench.compile_kernels: the training step's kernels sorted by origin."""

from __future__ import annotations

import pytest

from cbam_jax import models
from experiments.bench import compile_kernels
from experiments.bench.benchmark import kernel_count


def test_every_kernel_of_a_cbam_step_gets_one_origin_and_each_branch_has_some():
  text, seconds = compile_kernels.compiled_step('resnet_tiny', 'cbam', batch=2, image_size=16)
  origins = compile_kernels.kernel_origins(text)
  assert seconds > 0
  assert set(origins) <= set(compile_kernels.ORIGINS)
  assert sum(origins.values()) == kernel_count(text)
  for branch in ('channel', 'spatial'):
    for direction in ('forward', 'backward'):
      assert origins[f'attention: {branch}, {direction}'] > 0
  assert origins['optimizer update'] > 0
  # One module per residual block.
  model = models.create_model('resnet_tiny')
  assert compile_kernels.attention_modules(text) == sum(model.stage_sizes)


def test_a_plain_step_has_no_attention_kernels():
  text, _ = compile_kernels.compiled_step('resnet_tiny', None, batch=2, image_size=16)
  origins = compile_kernels.kernel_origins(text)
  assert not any(origin.startswith('attention') for origin in origins)
  assert compile_kernels.attention_modules(text) == 0


@pytest.mark.parametrize('argv, message', [
    (['--model', 'resnet21'], "unknown model 'resnet21' in --model"),
    (['--attention', 'cbma'], "unknown attention 'cbma' in --attention"),
])
def test_bad_names_are_refused_in_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    compile_kernels.main(argv)
  assert exit_info.value.code != 0
  assert message in capsys.readouterr().err


def test_the_initialisation_is_counted_and_attention_adds_to_it():
  plain, plain_s = compile_kernels.compiled_init('resnet_tiny', None, image_size=16)
  with_cbam, _ = compile_kernels.compiled_init('resnet_tiny', 'cbam', image_size=16)
  assert plain_s > 0
  assert with_cbam > plain > 0
