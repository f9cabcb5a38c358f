"""The CIFAR Wide ResNets (cbam_jax/models/wide_resnet.py) beyond the conformance suite of
tests/test_backbones.py: reference counts of other WRN-d-k, the block's wiring, dropout, bad
fields, and one step of the trainer's own train step."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from nnx_parity import assert_close, randomized

import cbam_jax.nnx as cbam_nnx
from cbam_jax import models
from cbam_jax.nnx import transfer

# WRN-10-1 on 8x8 images: the smallest Wide ResNet (one block per stage, 16-32-64 channels).
TINY = dict(depth=10, widen_factor=1)


def _images(batch: int = 2, size: int = 8, seed: int = 1) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


def _count(**fields) -> int:
  model = models.create_model('wrn28_10', **fields)
  return models.count_params(jax.eval_shape(model.init, jax.random.key(0), _images(1, 32)))


def test_other_depths_and_widths_match_reference_counts():
  # osmr/imgclsmob's CIFAR-10 table (README): wrn16_10 17,116,634; the WRN-22-8 and WRN-40-2
  # counts of WRN reproductions from the authors' code (17,158,106 and 2,243,546; the WRN
  # paper prints 17.2M and 2.2M).
  assert _count(depth=16, widen_factor=10) == 17_116_634
  assert _count(depth=22, widen_factor=8) == 17_158_106
  assert _count(depth=40, widen_factor=2) == 2_243_546


class _Zero(nn.Module):
  """An 'attention' that zeroes the residual branch: a block then returns its shortcut."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return jnp.zeros_like(x)


def test_attention_is_on_the_residual_branch_and_the_projection_sees_the_activated_input():
  # WRN-16-2: layer1_0 goes 16 -> 32 channels (projection), layer1_1 is an identity block;
  # with the branch zeroed, each block returns exactly its shortcut.
  model = models.create_model('wrn16_8', depth=16, widen_factor=2, attention=_Zero)
  x = _images()
  variables = randomized(jax.eval_shape(model.init, jax.random.key(0), x), seed=2)
  inter = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=True,
                                           mutable=['intermediates'])[1])(variables, x)
  inter = inter['intermediates']
  stem = inter['conv1']['__call__'][0]
  block = variables['params']['layer1_0']
  stats = variables['batch_stats']['layer1_0']['bn1']
  activated = jax.nn.relu((stem - stats['mean']) / jnp.sqrt(stats['var'] + 1e-5)
                          * block['bn1']['scale'] + block['bn1']['bias'])
  projected = jax.lax.conv_general_dilated(
      activated, block['downsample_conv']['kernel'], (1, 1), 'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  assert_close(inter['layer1_0']['__call__'][0], projected, 'projection shortcut')
  np.testing.assert_array_equal(inter['layer1_1']['__call__'][0],
                                inter['layer1_0']['__call__'][0])


def test_stage_attention_after_the_first_two_stages():
  model = models.create_model('wrn16_8', **TINY, stage_attention='se')
  params = jax.eval_shape(model.init, jax.random.key(0), _images())['params']
  assert {'stage_attention1', 'stage_attention2'} <= set(params)
  assert 'stage_attention3' not in params
  nnx_model = nnx.eval_shape(lambda: cbam_nnx.create_model(
      'wrn16_8', **TINY, stage_attention='se', rngs=nnx.Rngs(0)))
  assert cbam_nnx.count_params(nnx_model) == models.count_params({'params': params})


def test_dropout_in_training_only():
  model = models.create_model('wrn16_8', **TINY, dropout_rate=0.3)
  x = _images()
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)
  # No Dropout without a rate, and none holds variables: the trees do not change.
  assert abstract == jax.eval_shape(models.create_model('wrn16_8', **TINY).init,
                                    jax.random.key(0), x)
  variables = randomized(abstract, seed=3)
  train = jax.jit(lambda key: model.apply(variables, x, train=True, mutable=['batch_stats'],
                                          rngs={'dropout': key})[0])
  assert not np.allclose(train(jax.random.key(1)), train(jax.random.key(2)))
  expected = jax.jit(lambda: model.apply(variables, x))()
  # NNX: off after eval() (and then linen's numbers), from the call's rngs in training.
  nnx_model = transfer.from_linen(model, variables)
  step = nnx.jit(lambda m, key: m(x, rngs=nnx.Rngs(dropout=key)))
  nnx_model.eval()
  assert_close(step(nnx_model, jax.random.key(1)), expected, 'NNX eval')
  nnx_model.train()
  assert not np.allclose(step(nnx_model, jax.random.key(1)), step(nnx_model, jax.random.key(2)))


@pytest.mark.parametrize('fields,message', [
    (dict(depth=12), 'depth must be 6n \\+ 4'),
    (dict(depth=4), 'depth must be 6n \\+ 4'),
    (dict(widen_factor=0), 'widen_factor must be an integer >= 1'),
    (dict(widen_factor=1.5), 'widen_factor must be an integer >= 1'),
    (dict(dropout_rate=1.0), r'dropout_rate must be in \[0, 1\)'),
])
def test_bad_fields(fields, message):
  model = models.create_model('wrn16_8', **fields)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(model.init, jax.random.key(0), _images())
  with pytest.raises(ValueError, match=message):
    cbam_nnx.create_model('wrn16_8', rngs=nnx.Rngs(0), **fields)


def test_misspelt_and_linen_only_fields():
  with pytest.raises(TypeError, match="'widen_factr': did you mean 'widen_factor'"):
    models.create_model('wrn16_8', widen_factr=2)
  with pytest.raises(TypeError, match=r"unexpected field\(s\) \['conv'\]"):
    cbam_nnx.create_model('wrn16_8', conv=nn.Conv, rngs=nnx.Rngs(0))
