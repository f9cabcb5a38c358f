"""The spatial-attention convolution: 2 input channels, 1 output, a small odd kernel.

Conv libraries are tuned for many channels; with 2 in and 1 out they leave most of the
machine idle. ``'xla'`` is the reference (``lax.conv_general_dilated``); ``'shift'``
computes the same sum as ``prod(kernel_size) * 2`` shifted multiply-adds over whole
planes, which vectorises well on CPU.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ('auto', 'xla', 'shift')


def _conv_xla(pooled, kernel, precision):
  num_spatial = pooled.ndim - 1
  spatial = ''.join('DHW'[3 - num_spatial:])
  dimension_numbers = (f'N{spatial}C', f'{spatial}IO', f'N{spatial}C')
  out = lax.conv_general_dilated(
      pooled[None], kernel, window_strides=(1,) * num_spatial, padding='SAME',
      dimension_numbers=dimension_numbers, precision=precision)
  return out[0, ..., 0]


def _conv_shift(pooled, kernel, precision):
  del precision  # Elementwise products: exact in the compute dtype.
  kernel_size = kernel.shape[:-2]
  pads = [(k // 2, k // 2) for k in kernel_size] + [(0, 0)]
  padded = jnp.pad(pooled, pads)
  out_shape = pooled.shape[:-1]
  out = jnp.zeros(out_shape, pooled.dtype)
  for offset in itertools.product(*(range(k) for k in kernel_size)):
    window = padded[tuple(slice(o, o + n) for o, n in zip(offset, out_shape, strict=True))]
    out = out + window[..., 0] * kernel[offset + (0, 0)] + window[..., 1] * kernel[
        offset + (1, 0)]
  return out


def spatial_conv(pooled: jax.Array, kernel: jax.Array, *, precision: Any = None,
                 impl: str = 'auto') -> jax.Array:
  """Same-padded, stride-1 convolution of one pooled example.

  Args:
    pooled: ``(*spatial, 2)``.
    kernel: ``(*kernel_size, 2, 1)``, odd sizes.
    precision: passed to ``lax.conv_general_dilated``.
    impl: ``'xla'``, ``'shift'`` or ``'auto'`` (chosen per backend).

  Returns:
    ``(*spatial,)`` in the promoted dtype of the inputs.
  """
  from cbam_jax._validation import check_choice
  check_choice('spatial conv impl', impl, IMPLS)
  if impl == 'auto':
    impl = 'shift' if jax.default_backend() == 'cpu' else 'xla'
  if impl == 'xla':
    return _conv_xla(pooled, kernel, precision)
  return _conv_shift(pooled, kernel, precision)
