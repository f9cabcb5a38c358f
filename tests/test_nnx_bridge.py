"""CBAM from ``flax.nnx`` through ``nnx.bridge.ToNNX``: same numbers as the linen apply."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cbam_jax import CBAM


class ConvCBAM(nnx.Module):
  """An NNX block with a linen CBAM inside: conv -> CBAM."""

  def __init__(self, in_features: int, features: int, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(in_features, features, (3, 3), rngs=rngs)
    self.attention = nnx.bridge.ToNNX(
        CBAM(reduction_ratio=2, kernel_size=3, spatial_norm=True), rngs=rngs)

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    # Training updates CBAM's BatchNorm statistics, so that collection must be mutable;
    # ToNNX writes the updates back into the module and returns the output alone.
    mutable = ['batch_stats'] if train else False
    return self.attention(self.conv(x), train=train, mutable=mutable)


def linen_variables(bridged: nnx.Module) -> dict:
  """The bridged module's state as the linen ``{'params', 'batch_stats'}`` tree."""
  return {'params': nnx.to_pure_dict(nnx.state(bridged, nnx.Param)),
          'batch_stats': nnx.to_pure_dict(nnx.state(bridged, nnx.BatchStat))}


def images(shape=(2, 6, 6, 3), seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), shape)


def test_to_nnx_matches_linen_apply():
  x = images((2, 6, 6, 8))
  cbam = CBAM(reduction_ratio=2, kernel_size=3, spatial_norm=True)
  model = nnx.bridge.ToNNX(cbam, rngs=nnx.Rngs(0)).lazy_init(x)
  variables = linen_variables(model)
  chex.assert_trees_all_equal_shapes(variables, jax.eval_shape(cbam.init, jax.random.key(0), x))
  # Jitted: one program each instead of a compilation per op.
  out = nnx.jit(lambda model, x: model(x))(model, x)
  np.testing.assert_array_equal(out, jax.jit(cbam.apply)(variables, x))


def test_inside_an_nnx_module_with_jit_and_training():
  x = images()
  model = ConvCBAM(3, 8, rngs=nnx.Rngs(0))
  nnx.bridge.lazy_init(model, x)
  cbam = CBAM(reduction_ratio=2, kernel_size=3, spatial_norm=True)

  @nnx.jit
  def forward(model, x):
    return model(x)

  variables = linen_variables(model.attention)
  expected = jax.jit(cbam.apply)(variables, model.conv(x))
  np.testing.assert_allclose(forward(model, x), expected, rtol=1e-6, atol=1e-6)

  # A training call moves the running statistics exactly as linen's mutable apply does.
  expected_out, expected_state = jax.jit(functools.partial(
      cbam.apply, train=True, mutable=['batch_stats']))(variables, model.conv(x))
  out = nnx.jit(lambda model, x: model(x, train=True))(model, x)
  np.testing.assert_allclose(out, expected_out, rtol=1e-6, atol=1e-6)
  new_stats = nnx.to_pure_dict(nnx.state(model.attention, nnx.BatchStat))
  chex.assert_trees_all_close(new_stats, expected_state['batch_stats'], rtol=1e-6)
  assert not np.allclose(new_stats['spatial']['norm']['mean'],
                         variables['batch_stats']['spatial']['norm']['mean'])


def test_gradients_flow_through_the_bridge():
  x = images(seed=1)
  model = ConvCBAM(3, 8, rngs=nnx.Rngs(1))
  nnx.bridge.lazy_init(model, x)

  def loss(model):
    return jnp.mean(model(x) ** 2)

  grads = nnx.jit(nnx.grad(loss))(model)
  kernel_grad = grads['attention']['spatial']['conv_kernel'].get_value()
  assert kernel_grad.shape == (3, 3, 2, 1)
  assert float(jnp.max(jnp.abs(kernel_grad))) > 0
