"""What every backbone family may share, in both skins: the layer factories, stages of
blocks with stage attention between them, the classifier head, PyTorch-style padding, the
option-A shortcut, torchvision's initialisers and the image check."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer

from cbam_jax import _validation
from cbam_jax.conv import NnxMaterializedInputConv
from cbam_jax.models._attention import network_attention

Array = jax.Array
ModuleDef = Any

# Kaiming normal with fan_out, as torchvision and the official CBAM code initialise convs.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# Official CBAM code: kaiming_normal(fc.weight), i.e. fan_in, and a zero bias.
head_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


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


# Channel counts of images: an axis 1 of this size before two larger axes is NCHW.
_IMAGE_CHANNELS = _validation.IMAGE_CHANNELS


def check_images(x: Array, network: str = 'ResNet', *, channels_last: bool = False) -> None:
  """NHWC floating-point images, or a one-line error saying how to get them.

  NCHW is assumed, unless ``channels_last``, when axis 1 has 1, 3 or 4 entries (grey, RGB,
  RGBA) and axes 2 and 3 both have more than 4 (e.g. ``(2, 3, 224, 224)``): read as NHWC
  that would be 3-pixel-high images of 224 channels.
  """
  shape = getattr(x, 'shape', None)
  if shape is None or len(shape) != 4:
    raise ValueError(
        f'{network} expects NHWC images of shape (B, H, W, C); got '
        f'{None if shape is None else tuple(shape)}. Add a batch axis with x[None] or '
        'transpose NCHW input with x.transpose(0, 2, 3, 1).')
  if (not channels_last and shape[1] in _IMAGE_CHANNELS
      and min(shape[2], shape[3]) > max(_IMAGE_CHANNELS)):
    raise ValueError(
        f'{network} expects NHWC images (B, H, W, C); {tuple(shape)} looks channels-first '
        f'(NCHW, {shape[1]} channels). Transpose with x.transpose(0, 2, 3, 1), or apply with '
        f'channels_last=True if these are {shape[1]}-pixel-high images of {shape[3]} channels.')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f'{network} expects floating-point images, got {x.dtype}; convert with '
                    'x.astype(jnp.float32) (and scale integer images to [0, 1]).')


def layer_factories(conv: ModuleDef, norm: ModuleDef, *, use_running_average: bool,
                    dtype: Dtype, param_dtype: Dtype, kernel_init: Initializer,
                    rngs: nnx.Rngs | None = None) -> tuple[ModuleDef, ModuleDef]:
  """``conv`` and ``norm`` completed as every backbone uses them: convs without bias (a
  BatchNorm follows), BatchNorm with PyTorch's eps 1e-5 and momentum 0.1 (Flax 0.9). Linen
  factories, or NNX ones with ``rngs``."""
  nnx_rngs = {} if rngs is None else {'rngs': rngs}
  conv = functools.partial(conv, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                           kernel_init=kernel_init, **nnx_rngs)
  norm = functools.partial(norm, use_running_average=use_running_average, momentum=0.9,
                           epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, **nnx_rngs)
  return conv, norm


def linen_factories(module: nn.Module, train: bool
                    ) -> tuple[ModuleDef, ModuleDef, Callable[..., Any] | None,
                               Callable[..., Any] | None]:
  """A linen backbone's ``(conv, norm, attention, stage_attention)`` factories from its
  fields (``conv``, ``norm``, ``dtype``, ``param_dtype``, ``kernel_init``, ``attention``,
  ``stage_attention``, ``attention_fields``, ``zero_init_spatial_gate``)."""
  m: Any = module
  conv, norm = layer_factories(m.conv, m.norm, use_running_average=not train, dtype=m.dtype,
                               param_dtype=m.param_dtype, kernel_init=m.kernel_init)
  attention, stage_attention = network_attention(
      'linen', m.attention, m.stage_attention, m.attention_fields, dtype=m.dtype,
      param_dtype=m.param_dtype, zero_init_spatial_gate=m.zero_init_spatial_gate)
  return conv, norm, attention, stage_attention


def nnx_factories(attention: Any, stage_attention: Any, attention_fields: Any, *,
                  zero_init_spatial_gate: bool, dtype: Dtype, param_dtype: Dtype,
                  kernel_init: Initializer, rngs: nnx.Rngs
                  ) -> tuple[ModuleDef, ModuleDef, Callable[..., Any] | None,
                             Callable[..., Any] | None]:
  """An NNX backbone's ``(conv, norm, attention, stage_attention)`` factories from its
  constructor's arguments: :class:`cbam_jax.conv.NnxMaterializedInputConv` and ``nnx.BatchNorm`` (in
  training mode until ``model.eval()``), the NNX twin of :func:`linen_factories`."""
  conv, norm = layer_factories(NnxMaterializedInputConv, nnx.BatchNorm,
                               use_running_average=False, dtype=dtype,
                               param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
  attention, stage_attention = network_attention(
      'nnx', attention, stage_attention, attention_fields, dtype=dtype,
      param_dtype=param_dtype, zero_init_spatial_gate=zero_init_spatial_gate)
  return conv, norm, attention, stage_attention


def stages_at_downsampling(strides: Sequence[int]) -> list[list[int]]:
  """The indices of blocks with these ``strides``, grouped into stages: the first block and
  every stride-2 block start a stage (BAM's boundary: stage attention goes before each
  downsampling)."""
  stages: list[list[int]] = []
  for index, stride in enumerate(strides):
    if not stages or stride == 2:
      stages.append([])
    stages[-1].append(index)
  return stages


def apply_stages(x: Array, stages: Sequence[Sequence[Callable[[], nn.Module]]],
                 stage_attention: Callable[..., nn.Module] | None, train: bool) -> Array:
  """A linen network's body: every stage's blocks (factories of named modules, each called
  ``block(x, train=train)``), and ``stage_attention`` (``stage_attention{k}``) after every
  stage but the last. Call from a compact method: the modules are the caller's."""
  for stage, blocks in enumerate(stages, 1):
    for block in blocks:
      x = block()(x, train=train)
    if stage_attention is not None and stage < len(stages):
      x = stage_attention(name=f'stage_attention{stage}')(x, train=train)
  return x


def add_stages(network: nnx.Module, channels: int,
               stages: Sequence[Sequence[tuple[str, Callable[[int], Any]]]],
               stage_attention: Callable[..., nnx.Module] | None, rngs: nnx.Rngs
               ) -> tuple[tuple[str, ...], int]:
  """An NNX network's body, as :func:`apply_stages`: each ``(name, block)`` of every stage
  becomes ``network.<name> = block(in_features)`` (a module with ``out_features``), and
  ``stage_attention`` ``stage_attention{k}`` follows every stage but the last. Returns the
  names in call order (the network's ``block_names``) and the channels out."""
  names = []
  for stage, blocks in enumerate(stages, 1):
    for name, make_block in blocks:
      block = make_block(channels)
      setattr(network, name, block)
      names.append(name)
      channels = block.out_features
    if stage_attention is not None and stage < len(stages):
      setattr(network, f'stage_attention{stage}', stage_attention(channels, rngs=rngs))
      names.append(f'stage_attention{stage}')
  return tuple(names), channels


def classifier_head(x: Array, num_classes: int, param_dtype: Dtype, kernel_init: Initializer,
                    *, dropout_rate: float = 0.0, train: bool = False) -> Array:
  """Float32 logits ``(B, num_classes)`` of a linen network's features ``(B, H, W, C)``:
  global average pooling, dropout (in training, rate above 0) and the Dense head ``fc``, all
  in float32 (cheap, and logits stay accurate). Call from a compact method."""
  x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
  if dropout_rate > 0:
    x = nn.Dropout(dropout_rate, deterministic=not train)(x)
  x = nn.Dense(num_classes, dtype=jnp.float32, param_dtype=param_dtype,
               kernel_init=kernel_init, name='fc')(x)
  return x.astype(jnp.float32)


def nnx_classifier_head(in_features: int, num_classes: int, param_dtype: Dtype,
                        kernel_init: Initializer, rngs: nnx.Rngs) -> nnx.Linear:
  """The NNX twin of :func:`classifier_head`'s ``fc`` (called by :func:`nnx_logits`)."""
  return nnx.Linear(in_features, num_classes, dtype=jnp.float32, param_dtype=param_dtype,
                    kernel_init=kernel_init, rngs=rngs)


def nnx_logits(x: Array, fc: nnx.Linear, dropout: nnx.Dropout | None = None) -> Array:
  """:func:`classifier_head` in NNX, with the network's ``fc`` and ``dropout``."""
  x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
  if dropout is not None:
    x = dropout(x)
  return fc(x).astype(jnp.float32)


def dense_head_init(kernel_init: Initializer) -> Callable[[Any, int, Array], dict[str, Any]]:
  """A :attr:`cbam_jax.models.Backbone.head_init`: fresh ``fc`` parameters as
  :func:`classifier_head` with ``kernel_init`` initialises them, for ``model`` (its
  ``num_classes`` and ``param_dtype``) on ``features`` inputs."""

  def head_init(model: Any, features: int, key: Array) -> dict[str, Any]:
    head = nn.Dense(model.num_classes, param_dtype=model.param_dtype, kernel_init=kernel_init)
    return head.init(key, jnp.zeros((1, features)))['params']

  return head_init
