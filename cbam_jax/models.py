"""ResNets with attention in every residual block, in the style of Flax's examples/imagenet.

One :class:`ResNet` module; the named sizes are ``functools.partial``s of it:

* ImageNet (7x7/2 stem + 3x3/2 max-pool): ``ResNet18/34/50/101/152``, torchvision layout
  (projection shortcut = 1x1 conv with stride + BatchNorm; bottleneck stride on the 3x3 conv
  as in the official CBAM code and torchvision v1.5).
* CIFAR (32x32, He et al. 2016, 3 stages of 16/32/64 channels, option-A zero-padding
  shortcuts): ``ResNet20/32/44/56/110``.
* ``CifarResNet18``: the official CBAM code's CIFAR network (3x3/1 stem, no max-pool,
  64-128-256-512 basic blocks, projection shortcuts).
* ``ResNetTiny``: two 8/16-channel stages, for tests.

Attention (``attention=``) sits in EVERY residual block, on the residual branch after the
last BatchNorm, before the shortcut addition and the final ReLU (the official placement).
``stage_attention=`` places a module after every stage but the last (BAM's placement).

Module names mirror the torchvision / official PyTorch keys: ``conv1``, ``bn1``,
``layer{stage}_{index}`` (1-based stages) with ``conv1, bn1, conv2, bn2[, conv3, bn3],
downsample_conv, downsample_bn, attention``; ``stage_attention{stage}``; ``fc``.

Example::

  model = create_model('resnet50', attention='cbam', num_classes=1000)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
  _, state = model.apply(variables, images, mutable=['intermediates'])
  state['intermediates']['layer1_0']['attention']['spatial']['spatial_map']  # ((B, 56, 56),)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cbam_jax import _base, _validation
from cbam_jax import attention as attention_registry
from cbam_jax.attention import presets
from cbam_jax.conv import MaterializedInputConv

Array = jax.Array
Dtype = Any
ModuleDef = Any
# None | registry name | module factory (a Module class or a functools.partial of one).
AttentionSpec = str | Callable[..., nn.Module] | None

# Kaiming normal with fan_out, as torchvision and the official CBAM code initialise convs.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# Official CBAM code: kaiming_normal(fc.weight), i.e. fan_in, and a zero bias.
head_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')

STEMS = ('imagenet', 'cifar')
SHORTCUTS = ('projection', 'pad')

__all__ = [
    'BLOCKS', 'BasicBlock', 'Bottleneck', 'ResNet', 'ResNet18', 'ResNet34', 'ResNet50', 'ResNet101',
    'ResNet152', 'ResNet20', 'ResNet32', 'ResNet44', 'ResNet56', 'ResNet110', 'CifarResNet18',
    'ResNetTiny', 'available_models', 'count_params', 'create_model', 'resolve_attention',
    'summary',
]


def same_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  # Symmetric k // 2 padding like PyTorch's Conv2d(padding=k // 2). Flax's 'SAME' pads
  # (0, 1) for stride 2 on even sizes, which would break weight conversion parity.
  return ((kernel_size // 2, kernel_size // 2),) * 2


def pad_shortcut(x: Array, features: int, strides: int) -> Array:
  """He et al. option A: subsample by ``strides`` and zero-pad channels up to ``features``.

  Channels are padded equally on both sides (extra one after), as in the widely used
  PyTorch CIFAR reference (akamaster/pytorch_resnet_cifar10).
  """
  x = x[:, ::strides, ::strides, :]
  extra = features - x.shape[-1]
  if extra < 0:
    raise ValueError(
        f"shortcut='pad' cannot reduce channels ({x.shape[-1]} -> {features}); use "
        "shortcut='projection'.")
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


_pad_shortcut = pad_shortcut  # The name tests/test_models.py reads.


class ResidualBlock(nn.Module):
  """The fields of every residual block: the layer factories the ResNet completes, the
  stride of its first strided conv, the attention on its residual branch (a factory, or
  ``None``), the shortcut kind and zero-init of its last BatchNorm scale."""

  features: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable[[Array], Array]
  strides: int = 1
  attention: Callable[..., nn.Module] | None = None
  shortcut: str = 'projection'
  zero_init_residual: bool = False


class BasicBlock(ResidualBlock):
  """Two 3x3 convs (ResNet18/34, CIFAR ResNets); output has ``features`` channels.

  Input ``(B, H, W, C_in)`` -> ``(B, ceil(H / strides), ceil(W / strides), features)``.
  """

  expansion = 1

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    y = self.conv(self.features, (3, 3), self.strides, padding=same_padding(3), name='conv1')(x)
    y = self.act(self.norm(name='bn1')(y))
    y = self.conv(self.features, (3, 3), padding=same_padding(3), name='conv2')(y)
    y = self.norm(name='bn2', **last_norm_kwargs(self.zero_init_residual))(y)
    return _attend_and_add(self, x, y, self.features, train)


class Bottleneck(ResidualBlock):
  """1x1 -> 3x3 (stride) -> 1x1 convs; output has ``4 * features`` channels.

  Input ``(B, H, W, C_in)`` -> ``(B, ceil(H / strides), ceil(W / strides), 4 * features)``.
  """

  expansion = 4

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    y = self.conv(self.features, (1, 1), name='conv1')(x)
    y = self.act(self.norm(name='bn1')(y))
    y = self.conv(self.features, (3, 3), self.strides, padding=same_padding(3), name='conv2')(y)
    y = self.act(self.norm(name='bn2')(y))
    y = self.conv(self.features * self.expansion, (1, 1), name='conv3')(y)
    y = self.norm(name='bn3', **last_norm_kwargs(self.zero_init_residual))(y)
    return _attend_and_add(self, x, y, self.features * self.expansion, train)


def last_norm_kwargs(zero_init_residual: bool) -> dict[str, Any]:
  # Zero-init of the last BN scale makes every block start as the identity (Goyal et al.).
  return {'scale_init': nn.initializers.zeros_init()} if zero_init_residual else {}


def _attend_and_add(block: ResidualBlock, x: Array, y: Array, features: int,
                    train: bool) -> Array:
  """A block's tail: attention on the residual branch ``y`` (after its last BatchNorm, as
  in the official CBAM code), then ``act(shortcut(x) + y)``."""
  if block.attention is not None:
    y = block.attention(name='attention')(y, train=train)
  return block.act(_shortcut(block, x, features, block.strides) + y)


def _shortcut(block: ResidualBlock, x: Array, features: int, strides: int) -> Array:
  """Identity, or (when the shape changes) a projection or option-A zero padding."""
  if strides == 1 and x.shape[-1] == features:
    return x
  if block.shortcut == 'pad':
    return pad_shortcut(x, features, strides)
  x = block.conv(features, (1, 1), strides, name='downsample_conv')(x)
  return block.norm(name='downsample_bn')(x)


def _factory_class(factory: Callable[..., Any]) -> Any:
  while isinstance(factory, functools.partial):
    factory = factory.func
  return factory


def _with_supported_fields(factory: Callable[..., nn.Module],
                           fields: Mapping[str, Any]) -> Callable[..., nn.Module]:
  """``factory`` with those ``fields`` it declares and a partial has not already set."""
  cls = _factory_class(factory)
  preset = factory.keywords if isinstance(factory, functools.partial) else {}
  if isinstance(cls, type) and dataclasses.is_dataclass(cls):
    declared = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in fields.items() if k in declared and k not in preset}
  else:  # A plain function: pass everything it has not been given yet.
    fields = {k: v for k, v in fields.items() if k not in preset}
  return functools.partial(factory, **fields) if fields else factory


# The models' configuration of the registry's modules: the official CBAM code's.
MODEL_PRESET = 'official'


def preset_fields(name: str, zero_init_spatial_gate: bool, preset: str = MODEL_PRESET
                  ) -> dict[str, Any]:
  """The fields the models give the attention registered as ``name``: ``preset``'s, with
  the spatial BatchNorm scale zero-initialised only when ``zero_init_spatial_gate``."""
  fields = presets.fields(preset, name)
  if 'norm_scale_init' in fields and not zero_init_spatial_gate:
    fields['norm_scale_init'] = nn.initializers.ones_init()
  return fields


def resolve_attention(spec: AttentionSpec, *, dtype: Dtype, param_dtype: Dtype,
                      zero_init_spatial_gate: bool = True,
                      what: str = 'attention') -> Callable[..., nn.Module] | None:
  """A factory ``f(name=...)`` for ``spec``, with the model's dtypes filled in.

  Args:
    spec: ``None``; a name from :func:`cbam_jax.attention.available` (``'cbam'`` and
      ``'spatial'`` get the official configuration: spatial BatchNorm, scale zero-initialised
      when ``zero_init_spatial_gate``); or a module class / ``functools.partial``, used as
      given apart from ``dtype``/``param_dtype`` where the factory declares but does not
      already set them.
  """
  if spec is None:
    return None
  if isinstance(spec, str):
    factory = attention_registry.resolve(spec)
    fields = preset_fields(spec, zero_init_spatial_gate)
  elif callable(spec):
    factory, fields = spec, {}
  else:
    raise TypeError(
        f'{what} must be None, a name ({", ".join(attention_registry.available())}) or a '
        f'module factory such as functools.partial(CBAM, ...); got {type(spec).__name__}.')
  return _with_supported_fields(factory, {**fields, 'dtype': dtype, 'param_dtype': param_dtype})


@_base.check_fields_at_init
class ResNet(nn.Module):
  """ResNet v1 with optional attention in every block (and after stages).

  Attributes:
    stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet18.
    block_cls: :class:`BasicBlock` or :class:`Bottleneck`.
    num_filters: width of the first stage; stage ``i`` has ``num_filters * 2**i``.
    stem: ``'imagenet'`` (7x7/2 conv + 3x3/2 max-pool) or ``'cifar'`` (3x3/1 conv).
    num_classes: logits of the Dense head ``fc``.
    attention: ``None``, a registry name (``'cbam'``, ``'se'``, ``'channel'``,
      ``'spatial'``, ... see :func:`cbam_jax.attention.available`) or a module factory
      (class or ``functools.partial``), called ``factory(name=...)(y, train=train)``.
      ``'cbam'`` is the official configuration: ``CBAM(reduction_ratio=16, mlp_bias=True,
      spatial_norm=True)`` (spatial BatchNorm eps 1e-5, Flax momentum 0.99).
    stage_attention: same kinds, placed after stages ``1 .. n-1`` (BAM's placement); it
      sees the stage's channel count. Names ``stage_attention{stage}``.
    zero_init_spatial_gate: with ``'cbam'``/``'spatial'``, initialise the spatial
      BatchNorm scale to 0 so every spatial gate starts at sigmoid(0) = 0.5, as the
      official ResNet does. Factories are used as given.
    attention_fields: fields for the ``attention`` module (not ``stage_attention``), merged
      over the registry's configuration, e.g. ``{'reduction_ratio': 4}``; JSON-able, so it
      is saved with checkpoints (a ``flax.core.FrozenDict`` keeps the module hashable). A
      field the module does not take fails at ``init``.
    zero_init_residual: initialise the last BatchNorm scale of every block to 0.
    shortcut: ``'projection'`` (1x1 conv + BN when the shape changes) or ``'pad'`` (He et
      al. option A: subsample and zero-pad channels; parameter-free).
    dtype: compute dtype (e.g. ``jnp.bfloat16``); logits are always float32.
    param_dtype: parameter dtype.
    conv, norm, act: layer factories (partials are completed with the settings above).
      The default conv is :class:`cbam_jax.conv.MaterializedInputConv`: ``nn.Conv``'s
      numbers and parameters, with a training step about 0.8x as long on CPU.
    kernel_init: conv kernel initialiser (kaiming normal, fan_out).
  """

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_filters: int = 64
  stem: str = 'imagenet'
  num_classes: int = 1000
  attention: AttentionSpec = None
  stage_attention: AttentionSpec = None
  zero_init_spatial_gate: bool = True
  attention_fields: Mapping[str, Any] | None = None
  zero_init_residual: bool = False
  shortcut: str = 'projection'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv: ModuleDef = MaterializedInputConv
  norm: ModuleDef = nn.BatchNorm
  act: Callable[[Array], Array] = nn.relu
  kernel_init: Callable[..., Array] = conv_kernel_init

  @nn.compact
  def __call__(self, x: Array, train: bool = False, *, channels_last: bool = False) -> Array:
    """Logits ``(B, num_classes)`` float32 of NHWC images ``x`` ``(B, H, W, C)``.

    In train mode BatchNorm uses batch statistics and updates ``batch_stats`` (apply with
    ``mutable=['batch_stats']``); attention maps are sown into ``intermediates``. Images
    that look channels-first (see :func:`check_images`) are refused unless
    ``channels_last=True`` says they are NHWC.
    """
    self._check(x, channels_last)
    conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype, kernel_init=self.kernel_init)
    # Flax momentum 0.9 = PyTorch momentum 0.1.
    norm = functools.partial(self.norm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype)
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                  zero_init_spatial_gate=self.zero_init_spatial_gate)
    attention = resolve_attention(self.attention, **dtypes)
    if attention is not None and self.attention_fields:
      attention = functools.partial(attention, **self.attention_fields)
    stage_attention = resolve_attention(self.stage_attention, what='stage_attention', **dtypes)

    if self.stem == 'imagenet':
      x = conv(self.num_filters, (7, 7), (2, 2), padding=same_padding(7), name='conv1')(x)
      x = self.act(norm(name='bn1')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=same_padding(3))  # -inf padding.
    else:
      x = conv(self.num_filters, (3, 3), padding=same_padding(3), name='conv1')(x)
      x = self.act(norm(name='bn1')(x))

    for stage, num_blocks in enumerate(self.stage_sizes):
      for index in range(num_blocks):
        x = self.block_cls(
            features=self.num_filters * 2**stage,
            strides=2 if stage > 0 and index == 0 else 1,
            conv=conv, norm=norm, act=self.act, attention=attention,
            shortcut=self.shortcut, zero_init_residual=self.zero_init_residual,
            name=f'layer{stage + 1}_{index}')(x, train=train)
      if stage_attention is not None and stage < len(self.stage_sizes) - 1:
        x = stage_attention(name=f'stage_attention{stage + 1}')(x, train=train)

    # Global average pooling and the head in float32: cheap, and logits stay accurate.
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype,
                 kernel_init=head_kernel_init, name='fc')(x)
    return x.astype(jnp.float32)

  def _check(self, x: Array, channels_last: bool = False) -> None:
    check_resnet_fields(self.stem, self.shortcut, self.stage_sizes)
    check_images(x, channels_last=channels_last)


def check_resnet_fields(stem: str, shortcut: str, stage_sizes: Sequence[int]) -> None:
  _validation.check_choice('stem', stem, STEMS)
  _validation.check_choice('shortcut', shortcut, SHORTCUTS)
  if not stage_sizes or any(int(n) < 1 for n in stage_sizes):
    raise ValueError(f'stage_sizes must be positive block counts, got {stage_sizes!r}.')


# Channel counts of images: an axis 1 of this size before two larger axes is NCHW.
_IMAGE_CHANNELS = (1, 3, 4)


def check_images(x: Array, *, channels_last: bool = False) -> None:
  """Refuses what is not a batch of NHWC float images, or looks like NCHW images.

  NCHW is assumed, unless ``channels_last``, when axis 1 has 1, 3 or 4 entries (grey, RGB,
  RGBA) and axes 2 and 3 both have more than 4 (e.g. ``(2, 3, 224, 224)``): read as NHWC
  that would be 3-pixel-high images of 224 channels.
  """
  shape = getattr(x, 'shape', None)
  if shape is None or len(shape) != 4:
    raise ValueError(
        f'ResNet expects NHWC images of shape (B, H, W, C); got '
        f'{None if shape is None else tuple(shape)}. Add a batch axis with x[None] or '
        'transpose NCHW input with x.transpose(0, 2, 3, 1).')
  if (not channels_last and shape[1] in _IMAGE_CHANNELS
      and min(shape[2], shape[3]) > max(_IMAGE_CHANNELS)):
    raise ValueError(
        f'ResNet expects NHWC images (B, H, W, C); {tuple(shape)} looks channels-first '
        f'(NCHW, {shape[1]} channels). Transpose with x.transpose(0, 2, 3, 1), or apply with '
        f'channels_last=True if these are {shape[1]}-pixel-high images of {shape[3]} channels.')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f'ResNet expects floating-point images, got {x.dtype}; convert with '
                    'x.astype(jnp.float32) (and scale integer images to [0, 1]).')


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck)

_cifar = functools.partial(ResNet, block_cls=BasicBlock, num_filters=16, stem='cifar',
                           shortcut='pad', num_classes=10)
ResNet20 = functools.partial(_cifar, stage_sizes=(3, 3, 3))
ResNet32 = functools.partial(_cifar, stage_sizes=(5, 5, 5))
ResNet44 = functools.partial(_cifar, stage_sizes=(7, 7, 7))
ResNet56 = functools.partial(_cifar, stage_sizes=(9, 9, 9))
ResNet110 = functools.partial(_cifar, stage_sizes=(18, 18, 18))

CifarResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock,
                                  stem='cifar', num_classes=10)
ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1), block_cls=BasicBlock, num_filters=8,
                               stem='cifar', num_classes=10)

# The block types by the name a model description (cbam_jax.saving) gives them.
BLOCKS: dict[str, type[nn.Module]] = {'basic': BasicBlock, 'bottleneck': Bottleneck}

_MODELS: dict[str, Callable[..., ResNet]] = {
    'resnet18': ResNet18, 'resnet34': ResNet34, 'resnet50': ResNet50,
    'resnet101': ResNet101, 'resnet152': ResNet152,
    'resnet20': ResNet20, 'resnet32': ResNet32, 'resnet44': ResNet44,
    'resnet56': ResNet56, 'resnet110': ResNet110,
    'cifar_resnet18': CifarResNet18, 'resnet_tiny': ResNetTiny,
}


def available_models() -> tuple[str, ...]:
  """Names accepted by :func:`create_model`."""
  return tuple(_MODELS)


def model_factory(name: str) -> Callable[..., ResNet]:
  """The ``functools.partial`` of :class:`ResNet` called ``name``; a clear error otherwise."""
  try:
    return _MODELS[name]
  except (KeyError, TypeError):
    raise ValueError(
        f'Unknown model {name!r}. Valid names: {", ".join(_MODELS)}.') from None


def create_model(name: str, **fields: Any) -> ResNet:
  """The model called ``name`` (e.g. ``'resnet50'``) with ``fields`` overriding defaults.

  CIFAR models (``resnet20`` ... ``resnet110``, ``cifar_resnet18``, ``resnet_tiny``)
  default to ``num_classes=10``; ImageNet ones to 1000.
  """
  model = model_factory(name)(**fields)
  for what in ('attention', 'stage_attention'):  # An unknown name fails here, not at init.
    resolve_attention(getattr(model, what), what=what, dtype=model.dtype,
                      param_dtype=model.param_dtype)
  return model


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
