"""The NNX twin of :class:`cbam_jax.conv.MaterializedInputConv`: ``nnx.Conv`` whose input
is read from its own buffer on CPU (see :mod:`cbam_jax.conv` for why)."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from cbam_jax._fast.boundary import computed_once
from cbam_jax.conv import materializes_input

__all__ = ['MaterializedInputConv']


class MaterializedInputConv(nnx.Conv):
  """``nnx.Conv`` (same arguments, parameters and numbers) plus ``materialize_input``:
  ``None`` (default) materialises on the CPU backend only; ``True``/``False`` force it."""

  def __init__(self, *args: Any, materialize_input: bool | None = None, **kwargs: Any):
    materializes_input(materialize_input)  # Checks the value.
    super().__init__(*args, **kwargs)
    self.materialize_input = materialize_input

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if materializes_input(self.materialize_input):
      inputs = computed_once(lambda value: value, inputs)
    return super().__call__(inputs)
