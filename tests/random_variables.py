"""Random model variables for tests (shared by tests/ and tests/experiments/)."""

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(model, x, seed=0):
  """Random variables of ``model.init``'s structure for input ``x``, without compiling
  ``model.init`` (slow): normal(0, 0.3) everywhere, BatchNorm scales near 1 (so the
  zero-initialised spatial gates vary) and running variances 1."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['var']"):  # BatchNorm running variance: positive.
      return np.ones(leaf.shape, leaf.dtype)
    values = 0.3 * rng.standard_normal(leaf.shape)
    if name.endswith("['scale']"):
      values += 1.0
    return jnp.asarray(values, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)
