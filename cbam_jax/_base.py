"""What every attention module shares, in both skins (linen and NNX): layout handling,
field and shape checks, initialisers, and the two base classes.

A linen member subclasses :class:`AttentionModule` and implements ``refine(x, train)`` on
channels-last ``(B, *spatial, C)`` features; an NNX member subclasses
:class:`NnxAttentionModule` and implements ``refine(x)``. Both validate the input, move
``channel_axis`` to the end and back, so every member accepts NCHW-style layouts too.
A member's file (``cbam_jax/attention/<name>.py``) holds both; docs/extending.md shows how.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer, PrecisionLike

from cbam_jax import _validation
from cbam_jax import functional as F

Array = jax.Array
Activation = Callable[[Array], Array]

default_kernel_init = nn.initializers.lecun_normal()
# PyTorch's default for Linear and Conv: kaiming_uniform(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')
# One object per default, so that a linen field and its NNX keyword share the same default.
default_bias_init = nn.initializers.zeros_init()
ones_init = nn.initializers.ones_init()
zeros_init = default_bias_init

ALL_SPATIAL_DIMS = (1, 2, 3)
# The fields a composite member (CBAM, scSE, light CBAM) passes to both of its branches.
SHARED_FIELDS = ('dtype', 'param_dtype', 'precision', 'kernel_init', 'bias_init', 'gate')


def refine_along_axis(what: str, x: Array, channel_axis: int,
                      refine: Callable[[Array], Array],
                      supported_spatial_dims: Sequence[int] = ALL_SPATIAL_DIMS, *,
                      signals: bool = False) -> Array:
  """Checks ``x``, applies the channels-last ``refine`` along ``channel_axis``, moves back.

  A rank-3 ``x`` that looks like one image without its batch axis is refused unless
  ``signals`` says it is a batch of 1-D signals
  (:func:`cbam_jax._validation.check_not_one_image`); members without 1-D support refuse
  every rank-3 input anyway (:func:`check_spatial_dims`, which names ``x[None]``).
  """
  _validation.check_features(x, batched=True, channel_axis=channel_axis)
  if not signals and 1 in supported_spatial_dims:
    _validation.check_not_one_image(what, x, channel_axis)
  check_spatial_dims(what, x, tuple(supported_spatial_dims))
  out = refine(jnp.moveaxis(x, channel_axis, -1))
  return jnp.moveaxis(out, -1, channel_axis)


def blend_identity(x: Array, refined: Array, identity_scale: Array) -> Array:
  """``x + identity_scale * (refined - x)`` of channels-last ``x``, in float32, cast back
  to ``x.dtype``: ``x`` bit for bit where the per-channel ``identity_scale`` is 0 (and
  ``refined`` is finite), ``refined`` where it is 1. The ``identity_init`` blend
  (docs/attention_family.md, "Identity at insertion")."""
  x32 = x.astype(jnp.float32)
  scale = identity_scale.astype(jnp.float32)
  return (x32 + scale * (refined.astype(jnp.float32) - x32)).astype(x.dtype)


class AttentionModule(nn.Module):
  """Base class: ``module(x, train=False)`` maps ``(B, *spatial, C)`` to the same shape/dtype.

  Attributes:
    channel_axis: the channel axis of the input (``-1`` NHWC, ``1`` NCHW).
    dtype: compute dtype of the convolutions and dense layers; ``None`` promotes the input
      and the parameters. Pooling, normalisation statistics and gates are float32 always.
    param_dtype: dtype of the parameters.
    precision: passed to every dot and convolution.
    kernel_init: initialiser of every dense and convolution kernel.
    bias_init: initialiser of every dense and convolution bias.
    identity_init: return ``x + identity_scale * (refine(x) - x)`` with a per-channel
      parameter ``identity_scale`` ``(C,)`` initialised at zeros, so that the fresh module
      is the identity (for insertion into a trained network) and training moves it away.
      ``False`` (the default): no such parameter, the member's own numbers.
  """

  channel_axis: int = -1
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = default_bias_init
  identity_init: bool = False

  # Spatial ranks the math is defined for; members that need an image override this.
  supported_spatial_dims: ClassVar[tuple[int, ...]] = ALL_SPATIAL_DIMS

  def __init_subclass__(cls, **kwargs: Any) -> None:
    super().__init_subclass__(**kwargs)  # Flax makes cls a dataclass with its own __init__.
    check_fields_at_init(cls)

  def refine(self, x: Array, train: bool) -> Array:
    """Channels-last ``(B, *spatial, C)`` -> refined features in ``x.dtype``."""
    raise NotImplementedError

  def __call__(self, x: Array, train: bool = False, *, signals: bool = False) -> Array:
    """Refines ``x`` (``(B, *spatial, C)`` along ``channel_axis``); same shape and dtype.

    A rank-3 ``x`` that looks like ONE image without its batch axis (``(32, 32, 3)``:
    equal axes longer than 4, then 1, 3 or 4 channels) is refused; ``signals=True`` says
    it is a batch of 1-D signals ``(B, L, C)``.
    """

    def refine(inp: Array) -> Array:
      refined = self.refine(inp, train)
      if not self.identity_init:
        return refined
      check_stored_shape(self, ('identity_scale',), inp.shape[-1:], inp)
      # Through the scope: Module.param works only in setup or the one @nn.compact method
      # a class may have, which is the member's (its refine or setup declares the rest).
      identity_scale = self.scope.param(  # type: ignore[union-attr]  # Bound: being called.
          'identity_scale', zeros_init, inp.shape[-1:], self.param_dtype)
      return blend_identity(inp, refined, identity_scale)

    return refine_along_axis(type(self).__name__, x, self.channel_axis, refine,
                             self.supported_spatial_dims, signals=signals)


_ModuleT = TypeVar('_ModuleT')  # A linen or an NNX module class.


def check_fields_at_init(cls: type[_ModuleT]) -> type[_ModuleT]:
  """Makes a Flax module's ``__init__`` name the closest field of a misspelt one.

  Python's own TypeError names the bad keyword but not the good one. Applied to every
  attention module (:class:`AttentionModule`, :class:`NnxAttentionModule`) and, as a class
  decorator, to the backbones (linen: the dataclass fields; NNX: the ``__init__``
  keywords); returns ``cls``.
  """
  if not issubclass(cls, nn.Module):  # NNX: __init__ names every field.
    cls.__init__ = _named_unknown_fields(cls.__init__)  # type: ignore[method-assign]
    return cls
  dataclass_init = cls.__init__
  declared = tuple(f.name for f in dataclasses.fields(cls) if f.init)

  @functools.wraps(dataclass_init)
  def checked_init(self, *args: Any, **fields: Any) -> None:
    unknown = set(fields) - set(declared)
    if unknown:
      raise TypeError(unknown_fields_message(type(self).__name__, unknown, declared))
    dataclass_init(self, *args, **fields)

  cls.__init__ = checked_init  # type: ignore[method-assign]  # The wrapping is the point.
  return cls


def unknown_fields_message(what: str, unknown: Iterable[str], declared: Iterable[str]) -> str:
  """``what got unexpected field(s) [...]``, with the closest declared name for each."""
  declared = sorted(set(declared) - {'parent', 'name'})
  unknown = sorted(unknown)
  close = {name: difflib.get_close_matches(name, declared, n=1) for name in unknown}
  hints = '; '.join(f'{name!r}: did you mean {match[0]!r}?'
                    for name, match in close.items() if match)
  return (f'{what} got unexpected field(s) {unknown}' + (f' ({hints})' if hints else '')
          + f'; its fields are {declared}.')


def check_has_batch(module: nn.Module, x: Array) -> None:
  """:func:`cbam_jax._validation.check_has_batch` for a linen module with a spatial
  ``conv_kernel`` param and a ``kernel_size`` field: the param, once initialised, or a
  per-dim ``kernel_size`` fixes the spatial rank."""
  dims: int | None
  if module.has_variable('params', 'conv_kernel'):
    dims = module.get_variable('params', 'conv_kernel').ndim - 2
  else:
    dims = _validation.kernel_spatial_dims(module.kernel_size)
  _validation.check_has_batch(type(module).__name__, x, dims)


def check_spatial_dims(what: str, x: Array, supported: tuple[int, ...]) -> None:
  num_spatial = x.ndim - 2
  if num_spatial not in supported:
    dims = ' or '.join(f'{d}-D' for d in supported)
    layout = '(B, H, W, C)' if supported == (2,) else '(B, *spatial, C)'
    # One rank short is either one example without its batch axis or a batch of smaller
    # inputs: both readings are named.
    unbatched = (' If it is one example without a batch axis, add one with x[None].'
                 if num_spatial + 1 in supported else '')
    raise ValueError(
        f'{what} is defined for {dims} feature maps {layout}; got shape {tuple(x.shape)} '
        f'with {num_spatial} spatial dimension(s).{unbatched} For 1-D or 3-D inputs use a '
        "member that supports them, e.g. 'cbam', 'se', 'eca', 'bam', 'scse', 'simam' or "
        "'lcbam'.")


def spatial_pool(x: Array, kind: str) -> Array:
  """``(B, *spatial, C)`` -> ``(B, C)`` float32 global pooling of every example.

  ``x`` was checked at the module boundary and ``kind`` is one of ``F.POOL_TYPES``.
  """
  return jax.vmap(functools.partial(F._global_pool, kind=kind))(x)


def channel_map_shape(channel_map: Array, x: Array) -> Array:
  """``(B, C)`` -> ``(B, 1, ..., 1, C)`` so that it broadcasts against ``x``."""
  return channel_map.reshape(x.shape[:1] + (1,) * (x.ndim - 2) + x.shape[-1:])


def batch_norm(train: bool, momentum: float, epsilon: float, param_dtype: Dtype, name: str,
               scale_init: Initializer = ones_init) -> nn.BatchNorm:
  """A float32 linen BatchNorm over every axis but the last (statistics feed gates directly).

  ``momentum`` follows Flax: PyTorch's ``momentum=m`` is ``1 - m`` here. The variance is
  the two-pass ``mean((x - mean)**2)``: Flax's default ``E[x^2] - E[x]^2`` loses ~1e-4
  on small batches of large logits. :func:`cbam_jax.nnx.batch_norm` is the NNX twin.
  """
  return nn.BatchNorm(use_running_average=not train, **batch_norm_fields(
      momentum, epsilon, param_dtype, scale_init), name=name)


def batch_norm_fields(momentum: float, epsilon: float, param_dtype: Dtype,
                      scale_init: Initializer = ones_init) -> dict[str, Any]:
  """The BatchNorm settings every attention norm uses, for ``nn.`` and ``nnx.BatchNorm``."""
  return dict(momentum=momentum, epsilon=epsilon, dtype=jnp.float32, param_dtype=param_dtype,
              scale_init=scale_init, use_fast_variance=False)


def check_positive(what: str, value: float) -> None:
  if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
    raise ValueError(f'{what} must be a positive number, got {value!r}.')


def check_positive_int(what: str, value: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'{what} must be a positive int, got {value!r}.')


def check_param_shape(what: str, path: Sequence[str], stored: Sequence[int] | None,
                      expected: Sequence[int], x: Array) -> None:
  """A clear error (instead of a shape error deep inside) when ``x`` does not fit the
  parameter at ``path`` (shape ``stored``; ``None`` while initialising)."""
  if stored is not None and tuple(stored) != tuple(expected):
    raise ValueError(
        f'{what} was initialised for other input: parameter '
        f'{"/".join(path)} has shape {tuple(stored)} but input of shape '
        f'{tuple(x.shape)} (channels last) needs {tuple(expected)}. Re-initialise the module '
        'for this input, or check channel_axis.')


def check_stored_shape(module: nn.Module, path: tuple[str, ...], expected: tuple[int, ...],
                       x: Array) -> None:
  """:func:`check_param_shape` for a linen module; ``path`` leads to a param in ``'params'``."""
  stored: Any = module.variables.get('params', {})
  for key in path:
    if key not in stored:
      return  # Initialising.
    stored = stored[key]
  check_param_shape(type(module).__name__, path, stored.shape, expected, x)


def check_spatial_kernel_shape(what: str, stored: Sequence[int] | None,
                               kernel_size: Sequence[int], in_channels: int, x: Array) -> None:
  """The spatial conv kernel ``stored`` must be ``(*kernel_size, in_channels, 1)`` for ``x``."""
  needed = (*kernel_size, in_channels, 1)
  if stored is not None and tuple(stored) != needed:
    raise ValueError(
        f'{what} was initialised with a conv kernel of shape {tuple(stored)} '
        f'({len(stored) - 2} spatial dimensions) but got {x.ndim - 2}-D input of shape '
        f'{tuple(x.shape)} needing {needed}. Re-initialise the module for '
        'this input rank, or check kernel_size and channel_axis.')


# The NNX skin. Member files define their NNX classes on these; nothing here imports
# cbam_jax.nnx, so that a member's one file serves both skins without an import circle.

# Keywords of an NNX member's __init__ that are not fields (not stored as attributes).
_NNX_NON_FIELDS = frozenset({'self', '__class__', 'in_features', 'num_spatial_dims', 'rngs'})


def nnx_field_names(cls: type[nnx.Module]) -> tuple[str, ...]:
  """The fields of an NNX member: its ``__init__``'s keywords but ``in_features``,
  ``num_spatial_dims`` and ``rngs``; the same names as its linen class's fields."""
  return tuple(name for name in inspect.signature(cls.__init__).parameters
               if name not in _NNX_NON_FIELDS)


class NnxModule(nnx.Module):
  """An NNX class defined beside its linen twin, as ``Nnx<Name>``: ``__name__`` (in
  messages and reprs) is ``<Name>``, the name ``cbam_jax.nnx`` exports it under, so both
  skins say the same; ``__qualname__`` keeps the prefix (pickling finds the class)."""

  def __init_subclass__(cls, **kwargs: Any) -> None:
    super().__init_subclass__(**kwargs)
    if cls.__name__.startswith('Nnx'):
      cls.__name__ = cls.__name__[len('Nnx'):]


class NnxAttentionModule(NnxModule):
  """NNX base class: ``module(x)`` maps ``(B, *spatial, C)`` to the same shape and dtype.

  A subclass's ``__init__(self, in_features, *, <every field, typed and defaulted>, rngs)``
  names every field as :class:`flax.nnx.Linear` does and starts with
  ``self.set_fields(in_features, locals())`` (which also declares ``identity_scale`` under
  ``identity_init``). Modules start in training mode (BatchNorm on batch statistics, as
  ``nnx.BatchNorm`` does); switch with ``model.eval()`` / ``model.train()``. Attention
  maps are recorded with :func:`sow_map`.
  """

  supported_spatial_dims: ClassVar[tuple[int, ...]] = ALL_SPATIAL_DIMS

  # What set_fields stores: the fields every member has (and its identity_scale). A member
  # declares those of its own fields its methods read, for type checkers.
  in_features: int
  channel_axis: int
  identity_init: bool
  dtype: Dtype | None
  param_dtype: Dtype
  precision: PrecisionLike
  kernel_init: Initializer
  bias_init: Initializer
  identity_scale: nnx.Param[Array]

  if TYPE_CHECKING:
    # Every subclass's constructor (the class docstring), as the registry calls it.
    def __init__(self, in_features: int, *, rngs: nnx.Rngs | None = None,
                 **fields: Any) -> None: ...

  def __init_subclass__(cls, **kwargs: Any) -> None:
    super().__init_subclass__(**kwargs)
    if '__init__' in vars(cls):  # Wrapped on purpose, as check_fields_at_init does.
      cls.__init__ = _named_unknown_fields(cls.__init__)  # type: ignore[method-assign]

  def set_fields(self, in_features: int, fields: Mapping[str, Any]) -> None:
    """Stores ``in_features`` and ``fields`` (``locals()`` of ``__init__``: its non-field
    keywords are skipped) as attributes; lists become tuples (NNX keeps non-array
    attributes as static, hashable data)."""
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
      raise ValueError(f'{type(self).__name__} needs in_features, the channel count, as a '
                       f'positive int; got {in_features!r}.')
    self.in_features = in_features
    for name, value in fields.items():
      if name not in _NNX_NON_FIELDS:
        setattr(self, name, tuple(value) if isinstance(value, list) else value)
    if self.identity_init:  # Zeros need no key; the linen twin declares it alike.
      self.identity_scale = nnx.Param(
          zeros_init(None, (in_features,), self.param_dtype))  # type: ignore[arg-type]

  def field_values(self, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(self, name) for name in names}

  def refine(self, x: Array) -> Array:
    """Channels-last ``(B, *spatial, C)`` -> refined features in ``x.dtype``."""
    raise NotImplementedError

  def __call__(self, x: Array, *, signals: bool = False) -> Array:
    """Refines ``x`` (``(B, *spatial, C)`` along ``channel_axis``); same shape and dtype.
    ``signals=True``: a rank-3 ``x`` is a batch of 1-D signals even where it looks like
    one image (as in :class:`AttentionModule`)."""

    def refine(inp: Array) -> Array:
      refined = self.refine(inp)
      if not self.identity_init:
        return refined
      _validation.check_channels(inp, self.in_features, type(self).__name__)
      return blend_identity(inp, refined, self.identity_scale[...])

    return refine_along_axis(type(self).__name__, x, self.channel_axis, refine,
                             self.supported_spatial_dims, signals=signals)


def _named_unknown_fields(init: Callable[..., None]) -> Callable[..., None]:
  """``init`` that names the closest field of a misspelt keyword (Python's own TypeError
  names only the bad one), as :func:`check_fields_at_init` does for linen."""
  declared = tuple(inspect.signature(init).parameters)

  @functools.wraps(init)
  def checked_init(self, *args: Any, **fields: Any) -> None:
    unknown = set(fields) - set(declared)
    if unknown:
      raise TypeError(unknown_fields_message(
          type(self).__name__, unknown, set(declared) - _NNX_NON_FIELDS))
    init(self, *args, **fields)

  return checked_init


def sow_map(module: nnx.Module, name: str, value: Array) -> None:
  """Records an attention map as ``nnx.Intermediate`` while ``nnx.capture`` collects them.

  Flax 0.12 deprecates ``sow`` outside ``nnx.capture`` (there it would also store the map
  in the module's state, one more every call); so maps are recorded only under capture:
  ``y, maps = nnx.capture(model, nnx.Intermediate)(x)``.
  """
  if hasattr(module, '__captures__'):
    module.sow(nnx.Intermediate, name, value)


def nnx_batch_norm(num_features: int, momentum: float, epsilon: float, param_dtype: Dtype,
                   rngs: nnx.Rngs, scale_init: Initializer = ones_init) -> nnx.BatchNorm:
  """The NNX twin of :func:`batch_norm` (same settings); training mode."""
  return nnx.BatchNorm(num_features, use_running_average=False,
                       **batch_norm_fields(momentum, epsilon, param_dtype, scale_init),
                       rngs=rngs)


# name -> ('kernel' | 'bias', shape): which initialiser and shape each parameter gets.
ParamShapes = dict[str, tuple[str, tuple[int, ...]]]


def declare_linen(module: nn.Module, shapes: ParamShapes) -> dict[str, Array]:
  """``{name: module.param(name, ...)}`` for each ``name -> (kind, shape)``, with the
  module's ``kernel_init`` or ``bias_init``."""
  inits = {'kernel': module.kernel_init, 'bias': module.bias_init}
  return {name: module.param(name, inits[kind], shape, module.param_dtype)
          for name, (kind, shape) in shapes.items()}


class NnxParamOwner(Protocol):
  """What :func:`declare_nnx` reads of a module: its initialisers and parameter dtype."""

  kernel_init: Initializer
  bias_init: Initializer
  param_dtype: Dtype


def declare_nnx(module: NnxParamOwner, shapes: ParamShapes, rngs: nnx.Rngs) -> None:
  """``module.<name> = nnx.Param(...)`` for each ``name -> (kind, shape)``: the NNX twin of
  :func:`declare_linen` (same initialisers, same order of keys)."""
  inits = {'kernel': module.kernel_init, 'bias': module.bias_init}
  for name, (kind, shape) in shapes.items():
    setattr(module, name, nnx.Param(inits[kind](rngs.params(), shape, module.param_dtype)))


def nnx_values(module: nnx.Module, names: Sequence[str]) -> dict[str, Array]:
  """``{name: array}`` of those ``names`` the module has as parameters."""
  return {name: getattr(module, name)[...] for name in names
          if isinstance(getattr(module, name, None), nnx.Variable)}


def num_spatial_dims_for(kernel_size: Any, num_spatial_dims: int | None) -> int:
  """The input rank an NNX member's spatial parameters are built for: given, or
  ``len(kernel_size)``, or 2 (images)."""
  if num_spatial_dims is not None:
    return num_spatial_dims
  return len(kernel_size) if isinstance(kernel_size, Sequence) else 2
