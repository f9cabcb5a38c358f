"""A drop-in ``nn.Conv`` that trains faster on XLA:CPU.

A conv's kernel gradient contracts over the batch, so XLA:CPU first transposes the conv's
input from ``(N, H, W, C)`` to ``(C, H, W, N)``. XLA fuses the elementwise ops that produce
that input (BatchNorm, ReLU, the residual sum, a CBAM gate) into the transpose, which then
recomputes them element by element in a cache-hostile order instead of reading the values
the forward pass already wrote (several times as long as a plain transpose, in per-op
profiles of the ResNet-20 step). :class:`MaterializedInputConv` hands the
conv its input through :func:`cbam_jax._fast.boundary.computed_once`, a fusion boundary, so
the transpose is a plain one. Where one input feeds several convs (a block's first conv and its
projection shortcut), XLA keeps a single copy. The numbers are those of ``nn.Conv``; only
the schedule changes.

Measured with ``python -m experiments.bench.benchmark --only models`` (2-core CPU, side by side
with ``nn.Conv``): see docs/performance.md.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from cbam_jax._fast.boundary import boundary_pays_off, computed_once

__all__ = ['MaterializedInputConv', 'NnxMaterializedInputConv', 'materializes_input']


def materializes_input(materialize_input: bool | None = None) -> bool:
  """Whether a :class:`MaterializedInputConv` with this ``materialize_input`` materialises
  its input on the default backend. ``None``: on CPU only; elsewhere it is ``nn.Conv``.

  Raises:
    TypeError: ``materialize_input`` is not ``None``, ``True`` or ``False``.
  """
  if not (materialize_input is None or isinstance(materialize_input, bool)):
    raise TypeError(f'materialize_input must be None (CPU only), True or False, got '
                    f'{materialize_input!r}.')
  return boundary_pays_off() if materialize_input is None else materialize_input


class MaterializedInputConv(nn.Conv):
  """``nn.Conv`` whose input is read from its own buffer, never recomputed, on CPU.

  Same fields, parameters and numbers as ``nn.Conv``, plus:

  Attributes:
    materialize_input: ``None`` (default) materialises on the CPU backend only: on an
      accelerator the fusion boundary (a one-trip loop) would cost a host round trip per
      conv and the GPU/TPU compilers do not have the slow transpose. ``True``/``False``
      force it on or off.
  """

  materialize_input: bool | None = None

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    if materializes_input(self.materialize_input):
      inputs = computed_once(lambda value: value, inputs)
    # nn.Conv's own method, not the Flax-wrapped one, so that capture_intermediates records
    # this call once (as for nn.Conv), not twice.
    return _CONV_CALL(self, inputs)


_CONV_CALL = getattr(nn.Conv.__call__, '__wrapped__', nn.Conv.__call__)


class NnxMaterializedInputConv(nnx.Conv):
  """The NNX twin of :class:`MaterializedInputConv` (``cbam_jax.nnx.MaterializedInputConv``):
  ``nnx.Conv`` (same arguments, parameters and numbers) plus ``materialize_input``:
  ``None`` (default) materialises on the CPU backend only; ``True``/``False`` force it."""

  def __init__(self, *args: Any, materialize_input: bool | None = None, **kwargs: Any):
    materializes_input(materialize_input)  # Checks the value.
    super().__init__(*args, **kwargs)
    self.materialize_input = materialize_input

  def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
    if materializes_input(self.materialize_input):
      inputs = computed_once(lambda value: value, inputs)
    return super().__call__(inputs, out_sharding=out_sharding)
