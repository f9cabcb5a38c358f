"""A fusion boundary that XLA:CPU keeps.

XLA fuses an elementwise producer into each of its consumers, recomputing it in every one.
That is right for cheap producers and badly wrong for the spatial conv's correlations
(``prod(kernel_size) * C_in`` multiply-adds per element) or a broadcast maximum compared
against every input element. ``lax.optimization_barrier`` would stop it, but XLA:CPU's
pipeline removes barriers before fusion; a loop body is a boundary it keeps. Each loop costs
~40 ms of XLA:CPU compile time (its condition, counter and initial buffer are kernels of
their own), so it goes only where XLA would otherwise recompute: not after a reduction,
which XLA:CPU never fuses into its consumers.

Only CPU paths use it (the ``'shift'`` spatial conv and its pools, and
:class:`cbam_jax.conv.MaterializedInputConv`), each switched on by :func:`boundary_pays_off`:
on an accelerator each loop trip would cost a device-to-host copy of the loop condition.
Inside :func:`reference_paths` it is off on every backend.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ['boundary_pays_off', 'computed_once', 'reference_paths', 'replicated_if_explicit']

_REFERENCE_PATHS = contextvars.ContextVar('cbam_jax_reference_paths', default=False)


def boundary_pays_off() -> bool:
  """Whether :func:`computed_once` is worth its loop: on the CPU backend only, and not
  inside :func:`reference_paths`."""
  return jax.default_backend() == 'cpu' and not _REFERENCE_PATHS.get()


@contextlib.contextmanager
def reference_paths() -> Iterator[None]:
  """Models traced inside take the accelerator paths on every backend: the ``'auto'``
  spatial conv is ``lax.conv`` (not the CPU's shifted multiply-adds) and convs read their
  input as ``nn.Conv`` does. Same numbers; what :func:`cbam_jax.models.macs` traces, so that
  its count of convs and matrix products is the network's, whatever the backend."""
  token = _REFERENCE_PATHS.set(True)
  try:
    yield
  finally:
    _REFERENCE_PATHS.reset(token)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def computed_once(fn, *args):
  """``fn(*args)``, written to its own buffer that consumers read instead of recomputing.

  ``fn`` runs in the body of a loop that runs once; the trip count depends on the data
  (twice when the last argument's first element, or under explicit sharding the sum of its
  first elements per shard, is NaN; with the same result) so that XLA cannot unroll and
  inline it. The spatial conv's
  correlations: official CBAM forward+backward at ``(128, 32, 32, 16)`` 11.8 ms -> 6.2 ms on CPU.

  Differentiating it differentiates ``fn`` directly (the custom JVP), so gradients of
  gradients work although JAX cannot reverse a loop with a data-dependent trip count.

  Args:
    fn: a pure function of ``args``.
    *args: arrays; the last one is probed for NaN.

  Returns:
    ``fn(*args)``.
  """
  trips = 1 + jnp.isnan(_probe(args[-1])).astype(jnp.int32)
  out = jax.eval_shape(fn, *args)
  # Under explicit sharding the loop carry must have the body's sharding.
  sharding = getattr(out, 'sharding', None)
  init = jnp.zeros(out.shape, out.dtype,
                   out_sharding=sharding if _is_explicit(sharding) else None)

  def body(carry):
    step, _ = carry
    return step + 1, fn(*args)

  return lax.while_loop(lambda carry: carry[0] < trips, body, (jnp.int32(0), init))[1]


def replicated_if_explicit(x: jax.Array) -> jax.sharding.PartitionSpec | None:
  """``P()`` when ``x`` is explicitly sharded (a reduction over it must say where its
  result lives), else ``None``: the ``out_sharding`` of a sum over ``x``'s sharded axes."""
  return jax.sharding.PartitionSpec() if _is_explicit(jax.typeof(x).sharding) else None


def _is_explicit(sharding) -> bool:
  spec = getattr(sharding, 'spec', None)
  return spec is not None and any(axis is not None for axis in spec)


def _probe(x: jax.Array) -> jax.Array:
  """A scalar of ``x`` that XLA cannot know at compile time, cheap under any sharding.

  The first element, except that dimensions explicitly sharded over a mesh (where a
  single element cannot be sliced out) are kept whole and summed: a few values and a
  scalar all-reduce.
  """
  sharding = getattr(jax.typeof(x), 'sharding', None)
  spec = tuple(getattr(sharding, 'spec', None) or ()) if _is_explicit(sharding) else ()
  spec += (None,) * (x.ndim - len(spec))
  corner = x[tuple(slice(None) if axis is not None else 0 for axis in spec)]
  return jnp.sum(corner) if corner.ndim else corner


@computed_once.defjvp
def computed_once_jvp(fn, primals, tangents):
  return computed_once(fn, *primals), jax.jvp(fn, primals, tangents)[1]
