"""Backbones with attention: one registry for both skins (linen and NNX).

A backbone family is one file of this package (``resnet.py``): its linen and NNX networks,
its named sizes and one :func:`register_backbone` call. The registry is the spine that
everything else reads: :func:`create_model` (linen), :func:`cbam_jax.nnx.create_model`
(NNX), :func:`available_models`, :mod:`cbam_jax.saving` (a family's declared
:class:`Field`\\ s are its model description) and the trainer. Adding a family touches
neither saving nor the trainer; see docs/extending.md.

Example::

  model = create_model('resnet50', attention='cbam', num_classes=1000)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])

The contract of a family's networks: linen ``model(x, train=False)`` and NNX ``model(x)``
map NHWC images ``(B, H, W, C)`` to float32 logits ``(B, num_classes)``; the NNX network is
built as ``nnx_cls(in_features=C, rngs=rngs, **fields)`` from the linen network's fields
(less :attr:`Backbone.linen_only`) and has the linen network's parameter and BatchNorm
statistic trees, path for path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from cbam_jax import _validation
from cbam_jax._fast.boundary import reference_paths

# How a description (cbam_jax.saving) stores a field: 'value' a JSON value as is, 'tuple' a
# list read back as a tuple, 'mapping' a dict read back as a FrozenDict (or null), 'dtype'
# a dtype name, 'attention' an attention spec (null, a registry name or a class and
# fields), 'choice' one of the names of Field.choices.
FIELD_KINDS = ('value', 'tuple', 'mapping', 'dtype', 'attention', 'choice')


@dataclasses.dataclass(frozen=True)
class Field:
  """One field of a family's model description.

  Attributes:
    kind: how it is written to JSON, one of :data:`FIELD_KINDS`.
    attr: the network's field it stores, when its name differs from the description key
      (ResNet's ``'block'`` stores ``block_cls``).
    choices: for ``kind='choice'``: description name -> value.
  """

  kind: str = 'value'
  attr: str | None = None
  choices: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.kind not in FIELD_KINDS:
      raise ValueError(f'Field kind {self.kind!r} is unknown; use one of '
                       f'{", ".join(FIELD_KINDS)}.')
    if (self.kind == 'choice') != bool(self.choices):
      raise ValueError("A Field has choices exactly when its kind is 'choice'.")


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A registered backbone family.

  Attributes:
    family: the family's name (``'resnet'``), written to model descriptions.
    linen: the linen network class; its dataclass fields are the family's fields.
    nnx: the NNX network class, ``nnx(in_features=..., rngs=..., **fields)``.
    fields: description key -> :class:`Field` of every field a description stores (the
      data). Every other field of ``linen`` is code (layer factories, initialisers): a
      description holds only networks that leave it at its default.
    sizes: model name -> the fields that make it (``'resnet50'``: stage sizes and block);
      the names :func:`create_model` takes.
    linen_only: fields of ``linen`` that the NNX network does not take (its own layers).
    head: the name of the classifier ``Dense`` whose size is ``num_classes`` (what
      ``cbam_jax.saving.load(num_classes=...)`` replaces), or ``None``.
    head_init: ``head_init(model, features, key)`` -> fresh ``params`` of ``head`` for
      ``model`` (the network with its new ``num_classes``) on ``features`` inputs.
    in_features: ``in_features(params)`` -> the image channels linen ``params`` were made
      for (default: the input channels of the stem conv ``conv1``).
  """

  family: str
  linen: type[nn.Module]
  nnx: type[Any]
  fields: Mapping[str, Field]
  sizes: Mapping[str, Mapping[str, Any]]
  linen_only: tuple[str, ...] = ()
  head: str | None = 'fc'
  head_init: Callable[..., Any] | None = None
  in_features: Callable[[Mapping[str, Any]], int] = (
      lambda params: int(params['conv1']['kernel'].shape[-2]))

  def create(self, name: str | None = None, **fields: Any) -> nn.Module:
    """The linen network of size ``name`` (or none: the class defaults) with ``fields``."""
    return self.linen(**{**self.size_fields(name), **fields})

  def size_fields(self, name: str | None) -> dict[str, Any]:
    return {} if name is None else dict(self.sizes[name])


_BACKBONES: dict[str, Backbone] = {}   # family -> backbone
_SIZES: dict[str, str] = {}            # model name -> family


def register_backbone(backbone: Backbone) -> Backbone:
  """Adds ``backbone``'s family and model names to the registry (and returns it).

  Raises:
    ValueError: the family or one of its model names is taken, or a :class:`Field` names
      a field its linen network does not have.
  """
  if backbone.family in _BACKBONES:
    raise ValueError(f'A backbone family {backbone.family!r} is already registered; '
                     'unregister_backbone it first or pick another name.')
  taken = sorted(set(backbone.sizes) & set(_SIZES))
  if taken:
    raise ValueError(f'Model name(s) {", ".join(taken)} are already registered (family '
                     f'{_SIZES[taken[0]]!r}); pick other names.')
  declared = {f.name for f in dataclasses.fields(backbone.linen)}
  unknown = sorted({field.attr or key for key, field in backbone.fields.items()} - declared)
  if unknown:
    raise ValueError(f'{backbone.linen.__name__} has no field(s) {", ".join(unknown)} that '
                     f'the {backbone.family!r} description declares.')
  _BACKBONES[backbone.family] = backbone
  _SIZES.update(dict.fromkeys(backbone.sizes, backbone.family))
  return backbone


def unregister_backbone(family: str) -> None:
  """Removes a family and its model names (e.g. a backbone a test registered)."""
  backbone = get_backbone(family)
  del _BACKBONES[family]
  for name in backbone.sizes:
    del _SIZES[name]


def get_backbone(family: str) -> Backbone:
  """The registered family ``family``; a clear error otherwise."""
  try:
    return _BACKBONES[family]
  except (KeyError, TypeError):
    raise ValueError(f'Unknown backbone {family!r}. Registered: '
                     f'{", ".join(_BACKBONES)}.') from None


def available_backbones() -> tuple[str, ...]:
  """The registered families."""
  return tuple(_BACKBONES)


def backbone_of(model: Any) -> Backbone | None:
  """The family whose linen or NNX network ``model`` is, or ``None``."""
  for backbone in _BACKBONES.values():
    if isinstance(model, (backbone.linen, backbone.nnx)):
      return backbone
  return None


def available_models() -> tuple[str, ...]:
  """Names accepted by :func:`create_model` (every family's sizes)."""
  return tuple(_SIZES)


def backbone_for_model(name: str) -> Backbone:
  """The family of the model called ``name``; a clear error otherwise."""
  try:
    return _BACKBONES[_SIZES[name]]
  except (KeyError, TypeError):
    raise ValueError(
        f'Unknown model {name!r}.{_validation.did_you_mean(name, _SIZES)} Valid names: '
        f'{", ".join(_SIZES)}.') from None


def create_model(name: str, **fields: Any) -> nn.Module:
  """The linen model called ``name`` (e.g. ``'resnet50'``) with ``fields`` overriding its
  size's and the network's defaults.

  CIFAR models (``resnet20`` ... ``resnet110``, ``cifar_resnet18``, ``resnet_tiny``)
  default to ``num_classes=10``; ImageNet ones to 1000.
  """
  model = backbone_for_model(name).create(name, **fields)
  for what in ('attention', 'stage_attention'):  # An unknown name fails here, not at init.
    if hasattr(model, what):  # Only the spec is checked: a family need not have the dtypes.
      resolve_attention(getattr(model, what), what=what, dtype=None, param_dtype=None)
  return model


def create_nnx_model(name: str, *, rngs: Any, in_features: int = 3, **fields: Any) -> Any:
  """The NNX model called ``name`` (:func:`cbam_jax.nnx.create_model`): the network of
  :func:`create_model`, built natively in NNX for ``in_features`` image channels."""
  from flax import nnx

  if not isinstance(rngs, nnx.Rngs):
    raise TypeError(f'create_model({name!r}) needs rngs=nnx.Rngs(seed) to initialise its '
                    f'parameters; got rngs={rngs!r}.')
  backbone = backbone_for_model(name)
  return backbone.nnx(in_features=in_features, rngs=rngs,
                      **{**backbone.size_fields(name), **fields})


def count_params(variables: Mapping[str, Any]) -> int:
  """Number of scalars in the ``'params'`` collection (arrays or ``jax.ShapeDtypeStruct``s).

  BatchNorm statistics (``batch_stats``) are not parameters and are not counted.
  """
  if not isinstance(variables, Mapping) or 'params' not in variables:
    raise ValueError(
        'count_params expects variables with a \'params\' collection, e.g. the result of '
        'model.init(...) or jax.eval_shape(model.init, ...); wrap a bare parameter tree '
        'as {\'params\': params}.')
  leaves = jax.tree_util.tree_leaves(variables['params'])
  return sum(math.prod(jnp.shape(leaf)) for leaf in leaves)


def count_nnx_params(model: Any) -> int:
  """Number of scalars in an NNX model's ``nnx.Param`` variables (BatchNorm stats excluded)
  (:func:`cbam_jax.nnx.count_params`)."""
  from flax import nnx

  return sum(leaf.size for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))


def summary(model: nn.Module, input_shape: Sequence[int], *, depth: int | None = None,
            dtype: Dtype = jnp.float32, width: int = 160) -> str:
  """A per-module table (shapes, parameter counts) of ``model`` on zeros of ``input_shape``.

  Built by ``nn.tabulate`` in eval mode, as plain text ``width`` columns wide; ``depth``
  limits the nesting shown.
  """
  if len(tuple(input_shape)) != 4:
    raise ValueError(f'input_shape must be (B, H, W, C), got {tuple(input_shape)!r}.')
  table = nn.tabulate(model, jax.random.key(0), depth=depth, compute_flops=False,
                      console_kwargs={'force_terminal': False, 'width': width})
  return table(jnp.zeros(tuple(input_shape), dtype), train=False)


def _eval_forward(model: Any, input_shape: Sequence[int], dtype: Dtype
                  ) -> tuple[Callable[..., Any], tuple[Any, ...]]:
  """``(forward, args)``: ``forward(*args)`` is ``model``'s eval-mode logits on abstract
  images of ``input_shape`` (parameters traced, never computed, for linen models)."""
  if len(tuple(input_shape)) != 4:
    raise ValueError(f'input_shape must be (B, H, W, C), got {tuple(input_shape)!r}.')
  images = jax.ShapeDtypeStruct(tuple(input_shape), dtype)
  if isinstance(model, nn.Module):
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    return (lambda v, x: model.apply(v, x, train=False)), (variables, images)
  from flax import nnx

  if not isinstance(model, nnx.Module):
    raise TypeError(f'Expected a linen or NNX model, got {type(model).__name__}.')
  graphdef, state = nnx.split(model)

  def forward(state, x):
    copy = nnx.merge(graphdef, state)  # Switched to eval mode without touching ``model``.
    copy.eval()
    return copy(x)

  return forward, (state, images)


def flops(model: Any, input_shape: Sequence[int], *, dtype: Dtype = jnp.float32) -> float:
  """XLA's count of floating-point operations of one eval-mode forward pass (linen or NNX)
  on a batch of ``input_shape`` ``(B, H, W, C)``.

  From ``jax.jit(forward).lower(...).cost_analysis()``: XLA's analysis of the lowered
  program, before optimisation; nothing is compiled or run. XLA counts a multiply-add as 2
  FLOPs, counts elementwise operations (BatchNorm, ReLU, attention gates, pooling) too, and
  skips a convolution's taps that fall on its zero padding. Papers' "GFLOPs" (the CBAM
  paper's among them) are multiply-accumulates of convolutions and dense layers, padding
  taps included: that is :func:`macs`.
  """
  forward, args = _eval_forward(model, input_shape, dtype)
  cost = jax.jit(forward).lower(*args).cost_analysis()
  if isinstance(cost, Sequence):  # One entry per device program in some JAX versions.
    cost = cost[0]
  if not cost or 'flops' not in cost:
    raise RuntimeError(f'XLA gave no cost analysis for this program on {jax.default_backend()}; '
                       'count multiply-accumulates with macs() instead.')
  return float(cost['flops'])


def macs(model: Any, input_shape: Sequence[int], *, dtype: Dtype = jnp.float32) -> int:
  """Multiply-accumulates of the convolutions and matrix products (``Dense``) of one
  eval-mode forward pass (linen or NNX) on a batch of ``input_shape`` ``(B, H, W, C)``.

  The convention of papers' "GFLOPs" (the CBAM paper's Table 4; thop, ptflops and fvcore
  count the same way): a convolution costs its output size times its kernel's taps and input
  channels per group, padding taps included; elementwise operations, pooling and
  normalisation are free. Read from the forward's jaxpr (traced, nothing is computed), traced
  on the accelerator paths on every backend: on CPU CBAM's spatial conv otherwise runs as
  shifted elementwise multiply-adds, which a count of convs would miss (a module built with
  ``conv_impl='shift'`` still is missed). For ``GMACs`` divide by 1e9 and by the batch size.
  """
  forward, args = _eval_forward(model, input_shape, dtype)
  with reference_paths():
    jaxpr = jax.make_jaxpr(forward)(*args).jaxpr
  return _jaxpr_macs(jaxpr)


def _jaxpr_macs(jaxpr: Any) -> int:
  from jax.extend import core

  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'conv_general_dilated':
      out, kernel = eqn.outvars[0].aval, eqn.invars[1].aval
      # rhs_spec: (output features, input features per group, *spatial) axes of the kernel.
      rhs_spec = eqn.params['dimension_numbers'].rhs_spec
      total += math.prod(out.shape) * math.prod(kernel.shape[d] for d in rhs_spec[1:])
    elif eqn.primitive.name == 'dot_general':
      (lhs_contracting, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval
      total += (math.prod(eqn.outvars[0].aval.shape)
                * math.prod(lhs.shape[d] for d in lhs_contracting))
    for param in eqn.params.values():  # Calls (jit, custom_vjp, remat) hold sub-jaxprs.
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        if isinstance(sub, core.ClosedJaxpr):
          total += _jaxpr_macs(sub.jaxpr)
        elif isinstance(sub, core.Jaxpr):
          total += _jaxpr_macs(sub)
  return total


# The families: each file registers itself on import (after the registry above exists).
from cbam_jax.models._attention import resolve_attention  # noqa: E402
from cbam_jax.models.insertion import add_attention  # noqa: E402
from cbam_jax.models.resnet import (  # noqa: E402
    BasicBlock,
    Bottleneck,
    CifarResNet18,
    ResNet,
    ResNet18,
    ResNet20,
    ResNet32,
    ResNet34,
    ResNet44,
    ResNet50,
    ResNet56,
    ResNet101,
    ResNet110,
    ResNet152,
    ResNetTiny,
)
from cbam_jax.models.wide_resnet import WideResNet  # noqa: E402

# isort: split
# Registered after ResNet, so that available_models() lists the ResNets first.
from cbam_jax.models.mobilenet_v1 import MobileNetV1  # noqa: E402
from cbam_jax.models.mobilenet_v2 import MobileNetV2  # noqa: E402

__all__ = [
    'FIELD_KINDS', 'Backbone', 'Field', 'add_attention', 'available_backbones',
    'available_models',
    'backbone_for_model', 'backbone_of', 'count_nnx_params', 'count_params', 'create_model',
    'create_nnx_model', 'flops', 'get_backbone', 'macs', 'register_backbone',
    'resolve_attention', 'summary', 'unregister_backbone',
    'BasicBlock', 'Bottleneck', 'ResNet', 'ResNet18', 'ResNet34', 'ResNet50', 'ResNet101',
    'ResNet152', 'ResNet20', 'ResNet32', 'ResNet44', 'ResNet56', 'ResNet110', 'CifarResNet18',
    'ResNetTiny', 'WideResNet', 'MobileNetV1', 'MobileNetV2',
]
