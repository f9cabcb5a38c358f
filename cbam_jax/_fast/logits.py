"""Batched spatial-attention logits with a CPU-friendly memory layout.

:func:`cbam_jax.functional.spatial_logits` handles one example; vmapped over a batch it
keeps the two pooled maps interleaved, ``(B, *spatial, 2)``, so every shifted window of the
``'shift'`` convolution is a strided gather. Here the channel mean and max of the whole
batch are stacked channel-major, ``(2, B, *spatial)``, the layout
:func:`cbam_jax._fast.spatial_conv.spatial_conv_planes` is fast on. With ``impl='xla'`` this is
exactly ``jax.vmap(spatial_logits)``, the reference. The pooling uses
:func:`cbam_jax._fast.pool.mean_max`, whose backward avoids a slow XLA:CPU tie count.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax.typing import Dtype, PrecisionLike

from cbam_jax import functional
from cbam_jax._fast.pool import mean_max
from cbam_jax._fast.spatial_conv import _spatial_conv_planes, resolve_impl

__all__ = ['batched_spatial_logits', 'channel_pool_planes']


def channel_pool_planes(x: jax.Array) -> jax.Array:
  """Channel mean and max of a batch, channel-major.

  Args:
    x: ``(B, *spatial, C)``.

  Returns:
    ``(2, B, *spatial)`` float32: ``[0]`` the mean, ``[1]`` the max (the order of
    :func:`cbam_jax.functional.channel_pool`).
  """
  return jnp.stack(mean_max(x.astype(jnp.float32), (-1,)))


def batched_spatial_logits(
    params: Mapping[str, jax.Array],
    x: jax.Array,
    *,
    dtype: Dtype | None = None,
    precision: PrecisionLike = None,
    impl: str = 'auto',
) -> jax.Array:
  """``jax.vmap(functional.spatial_logits)`` with pooled maps laid out as planes.

  Args:
    params: ``conv_kernel (*k, 2, 1)`` and optional ``conv_bias (1,)``.
    x: ``(B, *spatial, C)`` channels-last batch, 1 to 3 spatial dims. Unchecked: the
      module calling this (its boundary) has checked ``x`` and the kernel against it.
    dtype: compute dtype of the convolution; ``None`` promotes the pooled maps (float32)
      with the kernel.
    precision: passed to the ``'xla'`` convolution.
    impl: ``'auto'``, ``'xla'`` or ``'shift'``; resolved here, once.

  Returns:
    ``(B, *spatial)`` float32 logits, before any normalisation or gate.
  """
  impl = resolve_impl(impl)
  kernel = params['conv_kernel']
  if impl == 'xla':
    return jax.vmap(lambda example: functional._spatial_logits(
        params, example, dtype=dtype, precision=precision, impl='xla'))(x)
  planes = channel_pool_planes(x)
  if dtype is None:
    dtype = jnp.result_type(planes, kernel)
  logits = _spatial_conv_planes(planes.astype(dtype), kernel.astype(dtype),
                                precision=precision, impl=impl)
  if 'conv_bias' in params:
    logits = logits + params['conv_bias'].astype(dtype)[0]
  return logits.astype(jnp.float32)
