"""MaterializedInputConv: nn.Conv's numbers and parameters, with its input materialised."""

from __future__ import annotations

import functools
from unittest import mock

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbam_jax import conv as conv_module
from cbam_jax import models
from cbam_jax.conv import MaterializedInputConv

KEY = jax.random.key(0, impl='rbg')


def _loss(conv_module, params, x, scale):
  # An elementwise producer and consumer around the conv: what XLA would fuse into the
  # kernel-gradient transpose, and what the materialised input must not change.
  y = conv_module.apply({'params': params}, jax.nn.relu(x * scale + 0.1))
  return jnp.sum(jnp.tanh(y) ** 2)


@pytest.mark.parametrize('materialize, kernel, strides, use_bias', [
    (None, (3, 3), 1, False),
    (True, (3, 3), 2, True),
    (True, (1, 1), 1, False),
    (False, (3, 3), 1, True),
])
def test_outputs_and_gradients_equal_nn_conv(variant, materialize, kernel, strides, use_bias):
  fields = dict(features=5, kernel_size=kernel, strides=strides, use_bias=use_bias,
                padding='SAME')
  reference = nn.Conv(**fields)
  fast = MaterializedInputConv(materialize_input=materialize, **fields)
  x = jax.random.normal(jax.random.key(1), (3, 9, 7, 4))
  scale = jnp.linspace(0.5, 1.5, 4)
  params = reference.init(KEY, x)['params']
  chex.assert_trees_all_equal_shapes_and_dtypes(params, fast.init(KEY, x)['params'])

  value_and_grads = lambda module: variant(jax.value_and_grad(
      functools.partial(_loss, module), argnums=(0, 1, 2)))(params, x, scale)
  expected, got = value_and_grads(reference), value_and_grads(fast)
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)


def test_gradients_of_gradients_equal_nn_conv():
  fields = dict(features=3, kernel_size=(3, 3), padding='SAME')
  reference, fast = nn.Conv(**fields), MaterializedInputConv(materialize_input=True, **fields)
  x = jax.random.normal(jax.random.key(2), (2, 6, 6, 2))
  scale = jnp.array([0.7, 1.3])
  params = reference.init(KEY, x)['params']

  def grad_norm(module, x):
    grads = jax.grad(functools.partial(_loss, module), argnums=0)(params, x, scale)
    return sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))

  chex.assert_trees_all_close(jax.jit(jax.grad(functools.partial(grad_norm, fast)))(x),
                              jax.grad(functools.partial(grad_norm, reference))(x),
                              rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('materialize, has_loop', [(None, True), (True, True), (False, False)])
def test_materialises_through_a_loop_on_cpu_only_when_asked(materialize, has_loop):
  assert jax.default_backend() == 'cpu'
  module = MaterializedInputConv(2, (3, 3), materialize_input=materialize)
  x = jnp.ones((1, 5, 5, 2))
  params = module.init(KEY, x)
  text = jax.jit(module.apply).lower(params, x).as_text()
  assert ('stablehlo.while' in text) == has_loop


def test_default_leaves_accelerators_alone():
  # On GPU/TPU the loop would cost a host round trip per conv: None means plain nn.Conv.
  module = MaterializedInputConv(2, (3, 3))
  x = jnp.ones((1, 5, 5, 2))
  params = module.init(KEY, x)
  with mock.patch.object(conv_module, 'boundary_pays_off', return_value=False):
    text = jax.jit(module.apply).lower(params, x).as_text()
  assert 'stablehlo.while' not in text


def test_bad_materialize_input_is_rejected():
  module = MaterializedInputConv(2, (3, 3), materialize_input='yes')
  with pytest.raises(TypeError, match='materialize_input must be None'):
    module.init(KEY, jnp.ones((1, 5, 5, 2)))


def test_bfloat16():
  module = MaterializedInputConv(4, (3, 3), dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(3), (2, 6, 6, 3)).astype(jnp.bfloat16)
  variables = module.init(KEY, x)
  out = jax.jit(module.apply)(variables, x)
  assert out.dtype == jnp.bfloat16
  expected = nn.Conv(4, (3, 3), dtype=jnp.bfloat16).apply(variables, x)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))


@pytest.mark.slow
def test_resnet_uses_it_with_nn_conv_numbers():
  assert models.ResNet.conv is MaterializedInputConv
  model = models.ResNetTiny(attention='se', num_classes=3)
  reference = models.ResNetTiny(attention='se', num_classes=3, conv=nn.Conv)
  x = jax.random.normal(jax.random.key(4), (4, 8, 8, 3))
  variables = reference.init(KEY, x)
  chex.assert_trees_all_equal_structs(variables, model.init(KEY, x))

  def loss(module, params):
    logits, _ = module.apply({**variables, 'params': params}, x, train=True,
                             mutable=['batch_stats'])
    return jnp.mean(logits ** 2)

  chex.assert_trees_all_close(
      jax.jit(jax.value_and_grad(functools.partial(loss, model)))(variables['params']),
      jax.jit(jax.value_and_grad(functools.partial(loss, reference)))(variables['params']),
      rtol=1e-5, atol=1e-6)


def test_capture_intermediates_records_one_call_like_nn_conv():
  x = jnp.ones((1, 4, 4, 2))
  for module in (MaterializedInputConv(3, (3, 3)), nn.Conv(3, (3, 3))):
    variables = module.init(KEY, x)
    out, state = module.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
    (captured,) = state['intermediates']['__call__']
    np.testing.assert_array_equal(captured, out)
