"""Mean and max pooling in one call, with a backward pass XLA:CPU runs fast.

The gradient JAX derives for ``jnp.max`` spreads the cotangent evenly over tied maxima: it
compares the input with the broadcast maximum, counts the matches with a second reduction
and divides. XLA fuses the recomputed maximum into that count reduction, which on CPU made
the backward of a channel max over ``(128, 32, 32, 16)`` ~40x slower than one pass over
the data. :func:`mean_max` has the numbers, ties included, of
``(jnp.mean(x, axes), jnp.max(x, axes))`` and their autodiff gradients, computed as:

* last (minor) axis, CBAM's channel pool: the forward is the plain ``mean``/``max``; the
  backward reads the maximum from its own buffer (:func:`cbam_jax._fast.boundary.computed_once`)
  rather than recomputing and broadcasting it, and counts ties with a matrix-vector
  product;
* other axes: the maximum and its tie count come from ONE variadic reduction in the
  forward pass. Over leading axes (the channel branch's global pool) this measured no
  faster than autodiff here, so CBAM's channel branch keeps the reference code.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from cbam_jax._fast.boundary import computed_once

__all__ = ['mean_max']


def _max_and_count(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """The maximum over ``axes`` and how many entries reach it, in one reduction."""

  def combine(a, b):
    (a_max, a_count), (b_max, b_count) = a, b
    new_max = jnp.maximum(a_max, b_max)
    count = (jnp.where(a_max == new_max, a_count, 0) + jnp.where(b_max == new_max, b_count, 0))
    return new_max, count

  init = (jnp.array(-jnp.inf, x.dtype), jnp.array(0, jnp.int32))
  return lax.reduce((x, jnp.ones(x.shape, jnp.int32)), init, combine, axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _mean_max(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  return jnp.mean(x, axis=axes), jnp.max(x, axis=axes)


def _mean_max_fwd(x, axes):
  if axes == (x.ndim - 1,):
    maximum = jnp.max(x, axis=axes)
    return (jnp.mean(x, axis=axes), maximum), (x, maximum, None)
  maximum, count = _max_and_count(x, axes)
  return (jnp.mean(x, axis=axes), maximum), (x, maximum, count)


def _mean_max_bwd(axes, residuals, cotangents):
  x, maximum, count = residuals
  grad_mean, grad_max = cotangents
  size = 1
  for axis in axes:
    size *= x.shape[axis]
  if axes == (x.ndim - 1,):
    # Otherwise XLA recomputes the max here and writes it broadcast to x's full shape
    # (4.2 ms -> 0.85 ms for this backward at (128, 32, 32, 16)). The tie count is a
    # matrix-vector product (exact: small integers in float32), which XLA:CPU runs at
    # memory speed, unlike a fused reduction.
    # No flattening to 2-D: reshapes that merge an explicitly sharded batch axis fail.
    maximum = computed_once(lambda m: m, maximum)
    at_max = x == maximum[..., None]
    count = jnp.dot(at_max.astype(jnp.float32), jnp.ones((x.shape[-1],), jnp.float32))
    grad = (grad_mean / size)[..., None] + jnp.where(at_max, (grad_max / count)[..., None], 0)
    return (grad.astype(x.dtype),)
  expand = lambda v: jnp.expand_dims(v, axes)
  at_max = x == expand(maximum)
  # Same expressions as JAX's rules: mean -> g / n; max -> g * indicator / count.
  grad = expand(grad_mean / size) + jnp.where(at_max, expand(grad_max / count), 0)
  return (grad.astype(x.dtype),)


_mean_max.defvjp(_mean_max_fwd, _mean_max_bwd)


def mean_max(x: jax.Array, axes: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """``(jnp.mean(x, axes), jnp.max(x, axes))`` with a single-pass backward.

  Args:
    x: floating-point array.
    axes: the axes to reduce (negative allowed).

  Returns:
    Mean and maximum, each of ``x``'s shape without ``axes``, in ``x``'s dtype.
  """
  axes = tuple(sorted(axis % x.ndim for axis in axes))
  return _mean_max(x, axes)
