"""Trace-time input checks shared by the functional core and the modules of both skins.

It imports nothing from cbam_jax, so that every layer can import it.

Shapes and dtypes are static under ``jit``, so every check here runs once per trace and
costs nothing at run time. Each raises ``ValueError`` or ``TypeError`` naming the problem
and the fix.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable, Sequence

import jax.numpy as jnp

MAX_SPATIAL_DIMS = 3
# The global pools of cbam_jax.functional.global_pool (re-exported there).
POOL_TYPES = ('avg', 'max', 'lp', 'lse')


def did_you_mean(name: object, valid: Iterable[str]) -> str:
  """``' Did you mean 'x'?'`` for the valid name closest to a misspelt ``name`` (case aside:
  ``'CBAM'`` -> ``'cbam'``), else ''."""
  if not isinstance(name, str):
    return ''
  by_lower = {choice.lower(): choice for choice in valid}
  close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
  return f' Did you mean {by_lower[close[0]]!r}?' if close else ''


def check_choice(what: str, value: object, valid: Sequence[str]) -> None:
  if value not in valid:
    raise ValueError(f'Unknown {what} {value!r};{did_you_mean(value, valid)} use one of '
                     f'{tuple(valid)}.')


def check_pool_types(pool_types: Sequence[str]) -> None:
  if isinstance(pool_types, str) or not pool_types:
    raise ValueError(
        f'pool_types must be a non-empty sequence such as (\'avg\', \'max\'), got '
        f'{pool_types!r}.')
  for kind in pool_types:
    check_choice('pool type', kind, POOL_TYPES)


def check_features(x, *, batched: bool, channel_axis: int = -1) -> None:
  """Checks rank, dtype and a non-empty extent of ``(B?, *spatial, C)`` features."""
  shape = getattr(x, 'shape', None)
  if shape is None:
    raise TypeError(f'Expected an array, got {type(x).__name__}.')
  lead = 1 if batched else 0
  layout = '(B, *spatial, C)' if batched else '(*spatial, C)'
  rank = len(shape)
  if not lead + 1 <= rank - 1 <= lead + MAX_SPATIAL_DIMS:
    if batched:
      hint = (' For a single example, add a batch axis (x[None]) or use '
              'cbam_jax.functional with jax.vmap.' if rank >= 2 else '')
    else:
      hint = (' cbam_jax.functional works on ONE example; map it over a batch with '
              'jax.vmap.' if rank == MAX_SPATIAL_DIMS + 2 else '')
    raise ValueError(
        f'Expected features of layout {layout} with 1 to {MAX_SPATIAL_DIMS} spatial '
        f'dimensions, i.e. rank {lead + 2} to {lead + 1 + MAX_SPATIAL_DIMS}; got shape '
        f'{tuple(shape)} (rank {rank}).{hint}')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f'Attention needs floating-point features, got dtype {x.dtype}. Convert first, '
        f'e.g. x.astype(jnp.float32) (and scale integer images to [0, 1]).')
  if any(d == 0 for d in shape):
    raise ValueError(
        f'Features of shape {tuple(shape)} have an empty axis; pooling needs at least '
        'one position and one channel. Check the input size against the network\'s '
        'downsampling.')
  if batched:
    check_channel_axis(channel_axis, rank)


def check_channel_axis(channel_axis: int, rank: int) -> None:
  """The channel axis of ``(B, ...)`` features must exist and must not be the batch axis."""
  if (isinstance(channel_axis, bool) or not isinstance(channel_axis, numbers.Integral)
      or not -rank <= channel_axis < rank or channel_axis % rank == 0):
    raise ValueError(
        f'channel_axis={channel_axis!r} is not a channel axis of rank-{rank} batched '
        f'features; use an int in 1..{rank - 1} or -{rank - 1}..-1 (axis 0 is the batch): '
        '-1 for channels last (NHWC), 1 for channels first (NCHW).')


def check_channels(x, expected: int, what: str) -> None:
  if x.shape[-1] != expected:
    raise ValueError(
        f'{what} was initialised for {expected} channels but got {x.shape[-1]} '
        f'(input shape {tuple(x.shape)}). Re-initialise the module for this input, or '
        'check channel_axis.')


def check_kernel_size(kernel_size) -> None:
  sizes = kernel_size if isinstance(kernel_size, Sequence) else (kernel_size,)
  if not sizes:
    raise ValueError('kernel_size must be an int or a non-empty sequence of ints, got ().')
  for k in sizes:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= 0 or k % 2 == 0:
      raise ValueError(
          f'kernel_size must be a positive odd integer so that the map keeps the input\'s '
          f'size with symmetric padding; got {kernel_size!r}. Use e.g. 7 (the paper) or 3.')


def kernel_spatial_dims(kernel_size) -> int | None:
  """How many spatial dims a ``kernel_size`` fixes: one per entry; ``None`` for an int."""
  return len(kernel_size) if isinstance(kernel_size, Sequence) else None


def check_has_batch(what: str, x, example_spatial_dims: int | None) -> None:
  """A module given one unbatched example: ``x`` has the rank of ONE example of the
  ``example_spatial_dims``-D input that the module's kernel (its size or its parameter)
  fixes, e.g. an ``(H, W, C)`` image to a module with a 2-D kernel. ``None``: not fixed
  (then ``(B, L, C)`` is a legitimate batch of 1-D signals)."""
  if example_spatial_dims is not None and x.ndim == example_spatial_dims + 1:
    raise ValueError(
        f'{what} got shape {tuple(x.shape)}: modules take a batch, (B, *spatial, C), and '
        f'this one is for {example_spatial_dims}-D inputs; add a batch axis with x[None] '
        '(or map cbam_jax.functional over examples with jax.vmap). If it is a batch of '
        f'{example_spatial_dims - 1}-D inputs, build the module for that rank.')


# Channel counts of images (grey, RGB, RGBA). A shape is taken for images in the wrong
# layout only where both spatial axes are longer than the largest of them.
IMAGE_CHANNELS = (1, 3, 4)


def check_not_one_image(what: str, x, channel_axis: int) -> None:
  """A module given ONE image without its batch axis, e.g. ``(32, 32, 3)``, would run it as
  a batch of 32 one-dimensional signals. Refused when ``x`` is channels-last ``(H, W, C)``
  with ``H == W`` longer than 4 and 1, 3 or 4 channels. A genuine batch of 1-D signals
  matches only when its batch size equals its length and it has 1, 3 or 4 channels; the
  caller says so with ``signals=True`` (which skips this check). Channels-first modules
  are not checked: there ``(C, H, W)`` would match every batch of 1, 3 or 4 signals whose
  channel count equals its length, and batches that small are common."""
  if x.ndim != 3 or channel_axis % x.ndim != x.ndim - 1:
    return
  height, width, channels = x.shape
  if channels in IMAGE_CHANNELS and height == width > max(IMAGE_CHANNELS):
    raise ValueError(
        f'{what} got shape {tuple(x.shape)}, which looks like ONE image (H, W, C) without a '
        f'batch axis; modules take a batch, (B, *spatial, C), and would run it as {height} '
        f'1-D signals of length {width}. Add a batch axis with x[None], or call the module '
        'with signals=True if it is a batch of 1-D signals.')


def check_spatial_kernel(kernel, x, *, batched: bool) -> None:
  """The spatial conv kernel ``(*k, 2, 1)`` must have one kernel dim per spatial dim of
  ``x``, ``(B, *spatial, C)`` if ``batched`` else ``(*spatial, C)``. One rank off is named
  as what it most likely is (a batch given to the one-example core, or an example without
  its batch axis) and as a kernel of the wrong rank."""
  num_spatial = x.ndim - (2 if batched else 1)
  kernel_dims = kernel.ndim - 2
  if kernel.ndim != num_spatial + 2 or kernel.shape[-2:] != (2, 1):
    rank = (f'the spatial conv kernel must have shape (*kernel_size, 2, 1) with '
            f'{num_spatial} kernel dimensions for {num_spatial}-D input; got '
            f'{tuple(kernel.shape)}. Re-initialise the module for this input rank.')
    likely = ''
    if kernel.shape[-2:] == (2, 1) and not batched and kernel_dims == num_spatial - 1:
      likely = (
          f'cbam_jax.functional works on ONE example, (*spatial, C); got shape '
          f'{tuple(x.shape)}, which for this conv kernel looks like a batch of '
          f'{kernel_dims}-D examples: map over the batch with jax.vmap, e.g. '
          'jax.vmap(lambda example: F.cbam(channel_params, spatial_params, example))(x), '
          f'or use the modules (cbam_jax.CBAM), which take batches. If it is one '
          f'{num_spatial}-D example, ')
    elif kernel.shape[-2:] == (2, 1) and batched and kernel_dims == num_spatial + 1:
      likely = (
          f'Got shape {tuple(x.shape)}: modules take a batch, (B, *spatial, C), and this '
          f'conv kernel is for {kernel_dims}-D inputs; add a batch axis with x[None]. If it '
          f'is a batch of {num_spatial}-D inputs, ')
    raise ValueError(likely + rank if likely else rank[0].upper() + rank[1:])
  check_kernel_size(tuple(int(k) for k in kernel.shape[:-2]))


def spatial_kernel_size(kernel_size, num_spatial: int) -> tuple[int, ...]:
  """Checks ``kernel_size`` (an int or one per spatial dim) and returns one int per dim."""
  check_kernel_size(kernel_size)
  sizes = (tuple(int(k) for k in kernel_size) if isinstance(kernel_size, Sequence)
           else (int(kernel_size),) * num_spatial)
  if len(sizes) != num_spatial:
    raise ValueError(
        f'kernel_size {kernel_size!r} has {len(sizes)} entries but the input has '
        f'{num_spatial} spatial dimensions; pass an int or one size per dimension.')
  return sizes
