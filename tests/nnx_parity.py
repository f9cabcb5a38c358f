"""Helpers for the NNX tests: linen and NNX steps on the same weights, compared leaf by leaf."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from cbam_jax.nnx import transfer

# float32: 1e-6 of each array's scale (linen and NNX programs may fuse and sum in other
# orders, e.g. a conv's kernel gradient over a batch).
TOLERANCE = 1e-6


def assert_close(actual, expected, what: str = ''):
  expected = np.asarray(expected)
  scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=0, atol=TOLERANCE * scale,
                             err_msg=what)


def randomized(variables, seed: int = 0):
  """Random weights and BatchNorm statistics (positive variances) of the same structure;
  ``variables`` may be abstract (``jax.eval_shape(module.init, ...)``)."""
  flat = traverse_util.flatten_dict(jax.tree_util.tree_map(
      lambda leaf: np.zeros(leaf.shape, leaf.dtype), dict(variables)))
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in flat.items():
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    if path[-1] == 'var':
      out[path] = (0.5 + np.abs(noise)).astype(leaf.dtype)
    else:
      out[path] = (leaf + 0.3 * noise).astype(leaf.dtype)
  return jax.tree_util.tree_map(jnp.asarray, traverse_util.unflatten_dict(out))


def linen_step(module, variables, x, weights, train: bool, **call):
  """Output, updated batch_stats, and gradients (params, x) of ``sum(y * weights)``."""

  def loss(params, x):
    y, updates = module.apply({**variables, 'params': params}, x, train=train,
                              mutable=['batch_stats'], **call)
    return jnp.sum(y * weights), (y, updates.get('batch_stats', {}))

  grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
  (grad_params, grad_x), (y, stats) = jax.jit(grad)(variables.get('params', {}), x)
  return y, stats, grad_params, grad_x


def nnx_step(model, x, weights):
  """The same for an NNX module (BatchNorm mode set on the model)."""

  @nnx.jit
  def step(model, x):
    def loss(model, x):
      y = model(x)
      return jnp.sum(y * weights), y
    return nnx.grad(loss, argnums=(0, 1), has_aux=True)(model, x)

  (grad_model, grad_x), y = step(model, x)
  return y, transfer.to_linen(model)['batch_stats'], nnx.to_pure_dict(grad_model), grad_x


def assert_trees_close(actual, expected, what: str):
  flat_a = traverse_util.flatten_dict(dict(actual)) if actual else {}
  flat_e = traverse_util.flatten_dict(dict(expected)) if expected else {}
  assert sorted(flat_a) == sorted(flat_e), f'{what}: {sorted(flat_a)} != {sorted(flat_e)}'
  for path in flat_e:
    assert_close(flat_a[path], flat_e[path], f'{what} {path}')


def assert_same_step(linen_module, model, variables, x, train: bool, seed: int = 0, **call):
  """NNX ``model`` (holding ``variables``) and ``linen_module`` agree in outputs, updated
  statistics and gradients with respect to the parameters and the input."""
  if train:
    model.train()
  else:
    model.eval()
  shape = jax.eval_shape(lambda v, x: linen_module.apply(v, x, train=False, **call),
                         variables, x).shape
  weights = jax.random.normal(jax.random.key(seed + 7), shape)
  y, stats, grad_params, grad_x = linen_step(linen_module, variables, x, weights, train, **call)
  y_nnx, stats_nnx, grad_nnx, grad_x_nnx = nnx_step(model, x, weights)
  assert_close(y_nnx, y, 'output')
  assert_close(grad_x_nnx, grad_x, 'input gradient')
  assert_trees_close(grad_nnx, grad_params, 'gradients')
  expected_stats = stats if train else variables.get('batch_stats', {})
  assert_trees_close(stats_nnx, expected_stats, 'batch_stats')
