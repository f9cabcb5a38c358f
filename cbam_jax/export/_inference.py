"""The inference function both exporters trace: a model in evaluation mode, weights bound.

Linen: ``model.apply(variables, x, train=False)`` (``train`` only where ``__call__`` takes
it); NNX: a copy of the model switched to ``eval()`` (the caller's model keeps its mode),
split into graph and state and merged back inside the function.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class ExportError(ValueError):
  """A model, input or operation that cannot be exported (the message says which, and why)."""


def inference_function(model: Any, variables: Mapping[str, Any] | None
                       ) -> Callable[[jax.Array], Any]:
  """``x -> model(x)`` in evaluation mode with the weights bound as constants.

  Raises:
    ExportError: ``model`` is neither a linen nor an NNX module, or ``variables`` do not
      fit its API (a linen model needs them, an NNX model holds its own).
  """
  if isinstance(model, nnx.Module):
    if variables is not None:
      raise ExportError('An NNX model holds its own weights; pass variables=None.')
    eval_model = nnx.merge(*nnx.split(model))  # A copy: the caller's model keeps its mode.
    eval_model.eval()
    graphdef, state = nnx.split(eval_model)

    def nnx_inference(x):
      return nnx.merge(graphdef, state)(x)
    return nnx_inference
  if isinstance(model, nn.Module):
    if not isinstance(variables, Mapping) or 'params' not in variables:
      raise ExportError("A linen model needs its variables, a mapping with 'params' (and "
                        "'batch_stats' where it has BatchNorm), e.g. from model.init(...).")
    call_parameters = inspect.signature(type(model).__call__).parameters
    kwargs = {'train': False} if 'train' in call_parameters else {}

    def linen_inference(x):
      return model.apply(variables, x, **kwargs)
    return linen_inference
  raise ExportError(f'Expected a flax.linen or flax.nnx module, got {type(model).__name__}.')


def input_spec(example: Any, batch_polymorphic: bool) -> jax.ShapeDtypeStruct:
  """The traced input: ``example``'s shape and dtype, its batch dim symbolic (``'b'``)."""
  if not hasattr(example, 'shape') or not hasattr(example, 'dtype'):
    raise ExportError(f'example must be an array (or jax.ShapeDtypeStruct) of the input '
                      f'shape and dtype, got {type(example).__name__}.')
  shape = tuple(example.shape)
  if not shape:
    raise ExportError('example must have a batch dimension first; got a scalar.')
  dtype = jnp.dtype(example.dtype)
  if batch_polymorphic:
    batch, = jax.export.symbolic_shape('b')
    shape = (batch, *shape[1:])
  return jax.ShapeDtypeStruct(shape, dtype)


def as_numpy(tree: Any) -> Any:
  return jax.tree_util.tree_map(np.asarray, tree)
