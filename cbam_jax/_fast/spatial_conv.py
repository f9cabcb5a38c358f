"""The spatial-attention convolution: 2 input channels, 1 output, a small odd kernel.

Conv libraries are tuned for many channels; with 2 in and 1 out they leave most of the
machine idle (XLA:CPU needs ~6 ms for a 7x7 conv over ``(32, 56, 56, 2)``, and ~15 ms
for its gradient). ``'xla'`` is the reference (``lax.conv_general_dilated``). ``'shift'``
computes the same sums differently:

* forward: shifted multiply-adds over whole *planes*. The planes are channel-major,
  ``(2, B, *spatial)``, so every shifted window is a contiguous run along the last axis
  and XLA fuses them into vectorised loops (~15x faster than the conv on CPU): one pass
  for the ``k_last * 2`` taps along the last axis, for every offset of the leading kernel
  dims at once, and one sum over those offsets (:func:`_correlate_planes`);
* backward (a :func:`jax.custom_vjp`): the input gradient is the correlation of the output
  gradient with the flipped kernel (again shifted multiply-adds), and the kernel gradient,
  ``dK[i, j, c] = sum_{b, y, x} P[c, b, y + i, x + j] * g[b, y, x]``, is one matrix
  product over blocks of the last axis (every offset of the leading kernel dims at once),
  whose diagonals hold the sums over the last kernel dim, read by a second, tiny product.
  Autodiff of the forward instead produces ~100 separate full reductions, which XLA:CPU
  runs ~10x slower (and compiles slowly: docs/performance.md, "Compile time").

Each correlation's result is written once (:func:`_correlation`): left to itself, XLA fused
the taps into every consumer (BatchNorm's backward, the gate's per-channel gradient, the next
padding) and recomputed them all there.

Both give the conv's numbers up to float32 rounding (summation order differs; the tests
hold them to 1e-5). The products are formed and accumulated in float32 whatever the input
dtype.

Use :func:`spatial_conv` for one example ``(*spatial, 2)`` and :func:`spatial_conv_planes`
for a batch already laid out as planes ``(2, B, *spatial)``. Both resolve ``impl``
(:func:`resolve_impl`); their unchecked cores :func:`_spatial_conv` and
:func:`_spatial_conv_planes` take an ``impl`` resolved by the caller's boundary
(:func:`cbam_jax.functional.spatial_logits`, :func:`cbam_jax._fast.logits.batched_spatial_logits`).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax.typing import PrecisionLike
from jax import lax

from cbam_jax._fast.boundary import boundary_pays_off, computed_once, replicated_if_explicit
from cbam_jax._validation import check_choice

IMPLS = ('auto', 'xla', 'shift')

# Width of the blocks of the last axis in the kernel-gradient matmuls. Each block costs
# (block + k - 1) * block multiply-adds per row and yields k useful diagonals, so small
# blocks waste less flops, but XLA:CPU runs small matmuls so slowly that whole rows up to
# 64 wide measured fastest (32x56x56: 2.2 ms vs 4.7 ms with 16; 128x32x32: 2.3 vs 4.0).
_KERNEL_GRAD_BLOCK = 64


def resolve_impl(impl: str) -> str:
  """``'auto'`` -> ``'shift'`` on CPU (measured faster), ``'xla'`` elsewhere."""
  check_choice('spatial conv impl', impl, IMPLS)
  if impl == 'auto':
    return 'shift' if boundary_pays_off() else 'xla'
  return impl


def _conv_xla(pooled, kernel, precision):
  num_spatial = pooled.ndim - 1
  spatial = ''.join('DHW'[3 - num_spatial:])
  dimension_numbers = (f'N{spatial}C', f'{spatial}IO', f'N{spatial}C')
  out = lax.conv_general_dilated(
      pooled[None], kernel, window_strides=(1,) * num_spatial, padding='SAME',
      dimension_numbers=dimension_numbers, precision=precision)
  return out[0, ..., 0]


def _pad_same(planes: jax.Array, kernel_size: tuple[int, ...]) -> jax.Array:
  lead = planes.ndim - len(kernel_size)
  return jnp.pad(planes, [(0, 0)] * lead + [(k // 2, k // 2) for k in kernel_size])


def _interleave(pairs) -> tuple:
  """``((a0, b0), (a1, b1), ..)`` -> ``(a0, b0, a1, b1, ..)``: each offset axis next to its
  padded spatial axis."""
  return tuple(itertools.chain.from_iterable(pairs))


def _correlate_planes(planes: jax.Array, kernel: jax.Array) -> jax.Array:
  """Same-padded correlation as shifted multiply-adds, in two fused passes.

  First the taps along the last axis, every offset ``o`` of the leading kernel dims at
  once: ``rows[d, b, o0, p0, o1, p1, .., x] = sum_{j, c} K[o0, o1, .., j, c, d] *
  padded[c, b, p0, p1, .., x + j]``, one broadcast multiply-add per column offset ``j`` and
  input plane ``c``. Then ``out[d, b, s0, s1, .., x] = sum_o rows[d, b, o0, s0 + o0, ..]``,
  one reduction: flattened, the pair ``(o, p)`` is ``o * P + p`` (``P`` the padded size),
  so ``rows[o, s + o]`` sits at ``o * (P + 1) + s``; padded with ``k`` zeros and reshaped
  to ``(k, P + 1)``, the pair puts it under ``(o, s)``. For CBAM's 7x7 that is 14 fused
  multiply-adds and a sum over 7 instead of 98 multiply-adds in one loop: a third less XLA:CPU
  compile time for the module, the same run time (docs/performance.md, "Compile time").

  Args:
    planes: ``(C_in, B, *spatial)`` float32.
    kernel: ``(*k, C_in, C_out)`` float32, odd ``k``.

  Returns:
    ``(C_out, B, *spatial)`` float32.
  """
  kernel_size = kernel.shape[:-2]
  lead_sizes = kernel_size[:-1]
  num_in, num_out = kernel.shape[-2:]
  batch, *spatial = planes.shape[1:]
  width = spatial[-1]
  padded = _pad_same(planes, kernel_size)
  padded_lead = padded.shape[2:-1]
  # Each input plane and each tap's weights split off once, not per tap: every traced op
  # costs tracing, lowering and XLA time.
  inputs = [plane[0] for plane in jnp.split(padded, num_in)]
  taps = kernel_size[-1] * num_in
  weights = jnp.moveaxis(kernel, (-3, -2, -1), (0, 1, 2)).reshape(
      (taps, num_out, 1) + _interleave((k, 1) for k in lead_sizes) + (1,))
  window_shape = (1, batch) + _interleave((1, p) for p in padded_lead) + (width,)
  rows = None
  for weight, (column, in_channel) in zip(
      jnp.split(weights, taps), itertools.product(range(kernel_size[-1]), range(num_in)),
      strict=True):
    term = weight[0] * inputs[in_channel][..., column:column + width].reshape(window_shape)
    rows = term if rows is None else rows + term
  lead_pairs = tuple(zip(lead_sizes, padded_lead, strict=True))
  flat = rows.reshape(  # type: ignore[union-attr]  # No rows is None: a kernel has taps.
      (num_out, batch) + tuple(k * p for k, p in lead_pairs) + (width,))
  flat = jnp.pad(flat, [(0, 0), (0, 0)] + [(0, k) for k in lead_sizes] + [(0, 0)])
  diagonals = flat.reshape(
      (num_out, batch) + _interleave((k, p + 1) for k, p in lead_pairs) +
      (width,))[(slice(None),) * 2 + _interleave((slice(None), slice(n)) for n in spatial[:-1])]
  return jnp.sum(diagonals, axis=tuple(range(2, 2 + 2 * len(lead_sizes), 2)))


def _correlation(planes: jax.Array, kernel: jax.Array) -> jax.Array:
  """:func:`_correlate_planes`, its result written to its own buffer for its consumers.

  With more than one offset in the leading kernel dims the correlation ends in a reduction
  (the sum over those offsets), which XLA:CPU never fuses into a consumer, so no boundary is
  needed (each :func:`computed_once` loop costs ~40 ms of XLA compile). Otherwise (a 1-D
  kernel, or leading sizes of 1) the taps are the output: they go inside
  :func:`computed_once`.
  """
  if np.prod(kernel.shape[:-3], dtype=int) > 1:
    return _correlate_planes(planes, kernel)
  return computed_once(_correlate_planes, planes, kernel)


def _diagonal_band(k_last: int, block: int) -> np.ndarray:
  """``band[r, x, j] = 1`` where ``r == x + j``: contracted with ``products (.., r, x)`` it
  sums the ``j``-th diagonals, ``sum_x products[.., x + j, x]``, for every ``j`` at once."""
  band = np.zeros((block + k_last - 1, block, k_last), np.float32)
  for j in range(k_last):
    band[np.arange(block) + j, np.arange(block), j] = 1
  return band


def _kernel_grad(planes: jax.Array, grad: jax.Array,
                 kernel_size: tuple[int, ...]) -> jax.Array:
  """``dK[*o, c] = sum_{b, s} P[c, b, s + o] * g[b, s]`` with ``P`` the padded planes.

  Two matrix products, whatever the kernel size: every offset ``o`` of the leading kernel
  dims at once (the gradient shifted by each ``o`` and stacked), over blocks of the last
  axis; then the diagonals of each block's product, which hold the sums over the last
  kernel dim, picked by a 0/1 band. Each product or diagonal written as its own op (7
  products and 49 traces for 7x7) cost XLA:CPU ~1 s more to compile per CBAM module and ran
  no faster.

  Args:
    planes: ``(C_in, B, *spatial)`` float32.
    grad: ``(B, *spatial)`` float32 gradient of the output.
    kernel_size: odd sizes, one per spatial dim.

  Returns:
    ``(*kernel_size, C_in)`` float32.
  """
  num_in = planes.shape[0]
  spatial = grad.shape[1:]
  width, k_last = spatial[-1], kernel_size[-1]
  block = max(min(width, _KERNEL_GRAD_BLOCK), k_last - 1)  # The halo must fit a block.
  num_blocks = -(-width // block)
  padded = _pad_same(planes, kernel_size)
  # Blocks of the last axis, each with the k - 1 halo columns its diagonals reach into.
  ext = (num_blocks + 1) * block
  padded = jnp.pad(padded, [(0, 0)] * (padded.ndim - 1) + [(0, ext - padded.shape[-1])])
  main = padded[..., :num_blocks * block].reshape(*padded.shape[:-1], num_blocks, block)
  halo = padded[..., block:].reshape(*padded.shape[:-1], num_blocks, block)[..., :k_last - 1]
  lhs = jnp.concatenate([main, halo], axis=-1)  # (C, B, *lead_padded, nb, block + k - 1)
  grad = jnp.pad(grad, [(0, 0)] * (grad.ndim - 1) + [(0, num_blocks * block - width)])
  grad_blocks = grad.reshape(*grad.shape[:-1], num_blocks, block)  # (B, *lead, nb, block)
  lead_sizes = kernel_size[:-1]
  # shifted[o, b, *p, nb, x] = g[b, *(p - o), nb, x], zero outside: P's rows at p meet the
  # gradient rows they reach with offset o.
  shifted = jnp.stack([
      jnp.pad(grad_blocks, [(0, 0)] + [(o, k - 1 - o) for o, k in zip(
          offset, lead_sizes, strict=True)] + [(0, 0), (0, 0)])
      for offset in itertools.product(*(range(k) for k in lead_sizes))])
  contract = tuple(range(1, lhs.ndim - 1))
  products = lax.dot_general(
      lhs, shifted, ((contract, contract), ((), ())), precision=lax.Precision.HIGHEST,
      # Contracts the batch: under explicit sharding JAX asks where the sum should live.
      out_sharding=replicated_if_explicit(lhs))  # (C, block + k - 1, prod(lead), block)
  diagonals = lax.dot_general(
      products, jnp.asarray(_diagonal_band(k_last, block)), (((1, 3), (0, 1)), ((), ())),
      precision=lax.Precision.HIGHEST)  # (C, prod(lead), k_last)
  return jnp.moveaxis(diagonals, 0, -1).reshape(*lead_sizes, k_last, num_in)


@jax.custom_vjp
def _conv_planes_shift(planes: jax.Array, kernel: jax.Array) -> jax.Array:
  return _correlation(planes, kernel)[0]


def _conv_planes_shift_fwd(planes, kernel):
  # Not _conv_planes_shift itself: forward-mode over this rule (jvp of a gradient) must not
  # meet the custom_vjp.
  return _correlation(planes, kernel)[0], (planes, kernel)


def _conv_planes_shift_bwd(residuals, grad):
  planes, kernel = residuals
  kernel_size = kernel.shape[:-2]
  # Input gradient: correlation with the flipped kernel, 1 plane in, C_in planes out.
  flipped = jnp.swapaxes(jnp.flip(kernel, axis=tuple(range(len(kernel_size)))), -1, -2)
  grad_planes = _correlation(grad[None], flipped)
  grad_kernel = _kernel_grad(planes, grad, kernel_size)[..., None]
  return grad_planes, grad_kernel


_conv_planes_shift.defvjp(_conv_planes_shift_fwd, _conv_planes_shift_bwd)


def spatial_conv_planes(planes: jax.Array, kernel: jax.Array, *, precision: PrecisionLike = None,
                        impl: str = 'auto') -> jax.Array:
  """Same-padded, stride-1 convolution of a batch laid out as channel-major planes.

  Args:
    planes: ``(C_in, B, *spatial)`` with 1 to 3 spatial dims (``C_in = 2`` in CBAM).
    kernel: ``(*kernel_size, C_in, 1)``, odd sizes.
    precision: passed to ``lax.conv_general_dilated`` (``'xla'`` only).
    impl: ``'xla'``, ``'shift'`` or ``'auto'``.

  Returns:
    ``(B, *spatial)`` in the promoted dtype of the inputs.
  """
  return _spatial_conv_planes(planes, kernel, precision=precision, impl=resolve_impl(impl))


def _spatial_conv_planes(planes: jax.Array, kernel: jax.Array, *, precision: PrecisionLike,
                         impl: str) -> jax.Array:
  """:func:`spatial_conv_planes` with ``impl`` resolved: ``'xla'`` or ``'shift'``."""
  out_dtype = jnp.result_type(planes, kernel)
  if impl == 'xla':
    return jax.vmap(functools.partial(_conv_xla, kernel=kernel, precision=precision))(
        jnp.moveaxis(planes, 0, -1)).astype(out_dtype)
  out = _conv_planes_shift(planes.astype(jnp.float32), kernel.astype(jnp.float32))
  return out.astype(out_dtype)


def spatial_conv(pooled: jax.Array, kernel: jax.Array, *, precision: PrecisionLike = None,
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
  return _spatial_conv(pooled, kernel, precision=precision, impl=resolve_impl(impl))


def _spatial_conv(pooled: jax.Array, kernel: jax.Array, *, precision: PrecisionLike,
                  impl: str) -> jax.Array:
  """:func:`spatial_conv` with ``impl`` resolved: ``'xla'`` or ``'shift'``."""
  planes = jnp.moveaxis(pooled, -1, 0)[:, None]
  return _spatial_conv_planes(planes, kernel, precision=precision, impl=impl)[0]
