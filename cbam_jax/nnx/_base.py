"""The NNX skin's shared pieces: fields taken from the linen twin, the base class, params,
BatchNorm and sown maps.

Every NNX module has a linen twin (``linen_twin``) whose dataclass fields are the NNX
module's keyword fields, with the same defaults: one declaration of each option, and an
unknown field fails in both APIs alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
from flax import nnx

from cbam_jax._base import (
    ALL_SPATIAL_DIMS,
    Initializer,
    batch_norm_fields,
    refine_along_axis,
    unknown_fields_message,
)

Array = jax.Array

_ONES = nn.initializers.ones_init()


def resolve_fields(linen_cls: type[nn.Module], fields: Mapping[str, Any]) -> dict[str, Any]:
  """Every field of ``linen_cls`` (but ``parent``/``name``): ``fields``' value or the default.

  Sequences become tuples (NNX keeps non-array attributes as static, hashable data).
  """
  declared = {f.name: f for f in dataclasses.fields(linen_cls)
              if f.name not in ('parent', 'name')}
  unknown = sorted(set(fields) - set(declared))
  if unknown:
    raise TypeError(unknown_fields_message(linen_cls.__name__, unknown, declared))
  resolved = {}
  for name, field in declared.items():
    if name in fields:
      value = fields[name]
    elif field.default is not dataclasses.MISSING:
      value = field.default
    else:
      value = field.default_factory()  # type: ignore[misc]
    resolved[name] = tuple(value) if isinstance(value, list) else value
  return resolved


def sow_map(module: nnx.Module, name: str, value: Array) -> None:
  """Records an attention map as ``nnx.Intermediate`` while ``nnx.capture`` collects them.

  Flax 0.12 deprecates ``sow`` outside ``nnx.capture`` (there it would also store the map
  in the module's state, one more every call); so maps are recorded only under capture:
  ``y, maps = nnx.capture(model, nnx.Intermediate)(x)``.
  """
  if hasattr(module, '__captures__'):
    module.sow(nnx.Intermediate, name, value)


def batch_norm(num_features: int, momentum: float, epsilon: float, param_dtype: Any,
               rngs: nnx.Rngs, scale_init: Initializer = _ONES) -> nnx.BatchNorm:
  """The NNX twin of :func:`cbam_jax._base.batch_norm` (same settings); training mode."""
  return nnx.BatchNorm(num_features, use_running_average=False,
                       **batch_norm_fields(momentum, epsilon, param_dtype, scale_init),
                       rngs=rngs)


def declare(module: nnx.Module, shapes: Mapping[str, tuple[str, tuple[int, ...]]],
            rngs: nnx.Rngs) -> None:
  """Creates ``module.<name> = nnx.Param(...)`` for each ``name -> (kind, shape)`` of a
  ``*_param_shapes`` function, with ``module.kernel_init`` or ``module.bias_init``."""
  inits = {'kernel': module.kernel_init, 'bias': module.bias_init}
  for name, (kind, shape) in shapes.items():
    setattr(module, name, nnx.Param(inits[kind](rngs.params(), shape, module.param_dtype)))


def values(module: nnx.Module, names: Sequence[str]) -> dict[str, Array]:
  """``{name: array}`` of those ``names`` the module has as parameters."""
  return {name: getattr(module, name)[...] for name in names
          if isinstance(getattr(module, name, None), nnx.Variable)}


def stored_shape(module: nnx.Module, *path: str) -> tuple[int, ...]:
  target: Any = module
  for key in path:
    target = getattr(target, key)
  return tuple(target.shape)


class AttentionModule(nnx.Module):
  """Base class: ``module(x)`` maps ``(B, *spatial, C)`` to the same shape and dtype.

  Construct with ``in_features`` (``C``), ``rngs`` and the linen twin's fields. Modules start
  in training mode (BatchNorm on batch statistics, as ``nnx.BatchNorm`` does); switch with
  ``model.eval()`` / ``model.train()``.
  """

  linen_twin: ClassVar[type[nn.Module]]
  supported_spatial_dims: ClassVar[tuple[int, ...]] = ALL_SPATIAL_DIMS

  def _set_fields(self, in_features: int, fields: Mapping[str, Any]) -> None:
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
      raise ValueError(f'{type(self).__name__} needs in_features, the channel count, as a '
                       f'positive int; got {in_features!r}.')
    self.in_features = in_features
    for name, value in resolve_fields(self.linen_twin, fields).items():
      setattr(self, name, value)

  def field_values(self, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(self, name) for name in names}

  def refine(self, x: Array) -> Array:
    """Channels-last ``(B, *spatial, C)`` -> refined features in ``x.dtype``."""
    raise NotImplementedError

  def __call__(self, x: Array) -> Array:
    """Refines ``x`` (``(B, *spatial, C)`` along ``channel_axis``); same shape and dtype."""
    return refine_along_axis(type(self).__name__, x, self.channel_axis, self.refine,
                             self.supported_spatial_dims)


def num_spatial_dims_for(kernel_size: Any, num_spatial_dims: int | None) -> int:
  """The input rank the spatial parameters are built for: given, or ``len(kernel_size)``,
  or 2 (images)."""
  if num_spatial_dims is not None:
    return num_spatial_dims
  return len(kernel_size) if isinstance(kernel_size, Sequence) else 2


Factory = Callable[..., nnx.Module]


def nnx_twin(linen_cls: Any) -> type[nnx.Module] | None:
  """The NNX class whose ``linen_twin`` is ``linen_cls``, or ``None``."""
  import cbam_jax.nnx.attention  # noqa: F401  (defines every AttentionModule subclass)

  pending = list(AttentionModule.__subclasses__())
  while pending:
    cls = pending.pop()
    if getattr(cls, 'linen_twin', None) is linen_cls:
      return cls
    pending.extend(cls.__subclasses__())
  return None
