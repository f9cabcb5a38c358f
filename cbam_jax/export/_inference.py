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


# The spatial conv's implementation field and the value that gives one plain conv op; and
# the conv-input fusion boundary's field and the value that turns it off. Same numbers.
_PLAIN_CONV = {'conv_impl': 'xla', 'materialize_input': False}


def _set_plain_conv(module: Any, setattr_fn: Callable[[Any, str, Any], None]) -> None:
  """Sets the ``_PLAIN_CONV`` fields of a cbam_jax module (a user's module may have a field
  of the same name that means something else)."""
  if type(module).__module__.startswith('cbam_jax.'):
    for name, value in _PLAIN_CONV.items():
      if hasattr(module, name):
        setattr_fn(module, name, value)


def _plain_conv_interceptor(next_fun, args, kwargs, context):
  """Sets every cbam_jax module's ``_PLAIN_CONV`` fields as it is called (each call of
  ``apply`` binds fresh module instances, so the caller's model is left as it is)."""
  _set_plain_conv(context.module, object.__setattr__)
  return next_fun(*args, **kwargs)


def inference_function(model: Any, variables: Mapping[str, Any] | None, *,
                       plain_conv: bool = False) -> Callable[[jax.Array], Any]:
  """``x -> model(x)`` in evaluation mode with the weights bound as constants.

  ``plain_conv``: every cbam_jax module's spatial conv is ``lax.conv``
  (``conv_impl='xla'``) and no conv input is materialised through a fusion boundary
  (``materialize_input=False``): the same numbers, one conv op instead of the CPU fast
  path's shifted multiply-adds and one-trip loops.

  Raises:
    ExportError: ``model`` is neither a linen nor an NNX module, or ``variables`` do not
      fit its API (a linen model needs them, an NNX model holds its own).
  """
  if isinstance(model, nnx.Module):
    if variables is not None:
      raise ExportError('An NNX model holds its own weights; pass variables=None.')
    eval_model = nnx.merge(*nnx.split(model))  # A copy: the caller's model keeps its mode.
    eval_model.eval()
    if plain_conv:
      for _, module in nnx.iter_modules(eval_model):
        _set_plain_conv(module, setattr)
    graphdef, state = nnx.split(eval_model)

    def nnx_inference(x):
      return nnx.merge(graphdef, state)(x)
    return nnx_inference
  if isinstance(model, nn.Module):
    if not isinstance(variables, Mapping) or 'params' not in variables:
      raise ExportError("A linen model needs its variables, a mapping with 'params' (and "
                        "'batch_stats' where it has BatchNorm), e.g. from model.init(...).")
    call_parameters = inspect.signature(type(model).__call__).parameters
    kwargs: dict[str, Any] = {'train': False} if 'train' in call_parameters else {}

    def linen_inference(x):
      if plain_conv:
        with nn.intercept_methods(_plain_conv_interceptor):
          return model.apply(variables, x, **kwargs)
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
