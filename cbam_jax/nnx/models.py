"""The ResNet zoo of :mod:`cbam_jax.models` as Flax NNX modules.

``create_model('resnet20', attention='cbam', rngs=nnx.Rngs(0))`` builds the same network
as the linen ``create_model``: the same names (``conv1``, ``layer{stage}_{index}``, ...),
parameters, placement of attention and the official CBAM preset for ``attention='cbam'``.
The model starts in training mode; ``model.eval()`` switches BatchNorm to the running
statistics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from cbam_jax import attention as linen_attention
from cbam_jax import models as linen_models
from cbam_jax.nnx import _base
from cbam_jax.nnx.conv import MaterializedInputConv

Array = jax.Array
# None | registry name | f(in_features, *, rngs) -> nnx.Module | a linen attention factory
# (class or partial) of a module with an NNX twin.
AttentionSpec = str | Callable[..., Any] | None

__all__ = ['BasicBlock', 'Bottleneck', 'ResNet', 'available_models', 'create_model',
           'count_params', 'resolve_attention']


def resolve_attention(spec: AttentionSpec, *, dtype: Any, param_dtype: Any,
                      zero_init_spatial_gate: bool = True,
                      what: str = 'attention') -> Callable[..., nnx.Module] | None:
  """A factory ``f(in_features, *, rngs)`` for ``spec``, as the linen
  :func:`cbam_jax.models.resolve_attention` resolves it (same preset, same dtypes): see
  :func:`cbam_jax.attention.resolve_attention` (``skin='nnx'``)."""
  return linen_attention.resolve_attention(
      spec, skin='nnx', dtype=dtype, param_dtype=param_dtype,
      zero_init_spatial_gate=zero_init_spatial_gate, what=what)


class BasicBlock(nnx.Module):
  """Two 3x3 convs; ``features`` output channels (as :class:`cbam_jax.models.BasicBlock`)."""

  expansion = 1

  def __init__(self, in_features: int, features: int, *, strides: int, conv, norm,
               act: Callable[[Array], Array], attention, shortcut: str,
               zero_init_residual: bool, rngs: nnx.Rngs):
    self.act, self.strides, self.shortcut = act, strides, shortcut
    pad = linen_models.same_padding(3)
    self.conv1 = conv(in_features, features, (3, 3), strides, padding=pad)
    self.bn1 = norm(features)
    self.conv2 = conv(features, features, (3, 3), padding=pad)
    self.bn2 = norm(features, **linen_models.last_norm_kwargs(zero_init_residual))
    _attach_attention_and_shortcut(self, in_features, features, conv, norm, attention, rngs)

  def __call__(self, x: Array) -> Array:
    y = self.act(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return _finish(self, x, y)


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (stride) -> 1x1; ``4 * features`` output channels."""

  expansion = 4

  def __init__(self, in_features: int, features: int, *, strides: int, conv, norm,
               act: Callable[[Array], Array], attention, shortcut: str,
               zero_init_residual: bool, rngs: nnx.Rngs):
    self.act, self.strides, self.shortcut = act, strides, shortcut
    out = features * self.expansion
    self.conv1 = conv(in_features, features, (1, 1))
    self.bn1 = norm(features)
    self.conv2 = conv(features, features, (3, 3), strides, padding=linen_models.same_padding(3))
    self.bn2 = norm(features)
    self.conv3 = conv(features, out, (1, 1))
    self.bn3 = norm(out, **linen_models.last_norm_kwargs(zero_init_residual))
    _attach_attention_and_shortcut(self, in_features, out, conv, norm, attention, rngs)

  def __call__(self, x: Array) -> Array:
    y = self.act(self.bn1(self.conv1(x)))
    y = self.act(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return _finish(self, x, y)


def _attach_attention_and_shortcut(block, in_features, out, conv, norm, attention, rngs):
  block.out_features = out
  block.has_attention = attention is not None
  if block.has_attention:
    block.attention = attention(out, rngs=rngs)
  block.identity = block.strides == 1 and in_features == out
  if not block.identity and block.shortcut == 'projection':
    block.downsample_conv = conv(in_features, out, (1, 1), block.strides)
    block.downsample_bn = norm(out)


def _finish(block, x: Array, y: Array) -> Array:
  if block.has_attention:
    y = block.attention(y)
  if block.identity:
    residual = x
  elif block.shortcut == 'pad':
    residual = linen_models.pad_shortcut(x, block.out_features, block.strides)
  else:
    residual = block.downsample_bn(block.downsample_conv(x))
  return block.act(residual + y)


_BLOCKS = {linen_models.BasicBlock: BasicBlock, linen_models.Bottleneck: Bottleneck}


class ResNet(nnx.Module):
  """ResNet v1 with attention in every block; the fields of :class:`cbam_jax.models.ResNet`
  (but ``conv`` and ``norm``, which are ``nnx.Conv`` with a materialised input on CPU and
  ``nnx.BatchNorm``), plus ``in_features`` (image channels, 3) and ``rngs``."""

  def __init__(self, *, in_features: int = 3, rngs: nnx.Rngs, **fields: Any):
    for name in ('conv', 'norm'):
      if name in fields:
        raise TypeError(f'The NNX ResNet has no {name!r} field: it uses nnx.Conv (with a '
                        'materialised input on CPU) and nnx.BatchNorm.')
    f = _base.resolve_fields(linen_models.ResNet, fields)
    linen_models.check_resnet_fields(f['stem'], f['shortcut'], f['stage_sizes'])
    block_cls = _BLOCKS.get(f['block_cls'], f['block_cls'])
    self.stem, self.act, self.num_classes = f['stem'], f['act'], f['num_classes']
    self.stage_sizes = tuple(int(n) for n in f['stage_sizes'])
    conv = functools.partial(MaterializedInputConv, use_bias=False, dtype=f['dtype'],
                             param_dtype=f['param_dtype'], kernel_init=f['kernel_init'],
                             rngs=rngs)
    # Flax momentum 0.9 = PyTorch momentum 0.1, as in linen.
    norm = functools.partial(nnx.BatchNorm, use_running_average=False, momentum=0.9,
                             epsilon=1e-5, dtype=f['dtype'], param_dtype=f['param_dtype'],
                             rngs=rngs)
    dtypes = dict(dtype=f['dtype'], param_dtype=f['param_dtype'],
                  zero_init_spatial_gate=f['zero_init_spatial_gate'])
    attention = resolve_attention(f['attention'], **dtypes)
    stage_attention = resolve_attention(f['stage_attention'], what='stage_attention', **dtypes)

    filters = f['num_filters']
    if self.stem == 'imagenet':
      self.conv1 = conv(in_features, filters, (7, 7), (2, 2),
                        padding=linen_models.same_padding(7))
    else:
      self.conv1 = conv(in_features, filters, (3, 3), padding=linen_models.same_padding(3))
    self.bn1 = norm(filters)
    channels = filters
    names = []
    for stage, num_blocks in enumerate(self.stage_sizes):
      for index in range(num_blocks):
        block = block_cls(
            channels, filters * 2**stage, strides=2 if stage > 0 and index == 0 else 1,
            conv=conv, norm=norm, act=self.act, attention=attention, shortcut=f['shortcut'],
            zero_init_residual=f['zero_init_residual'], rngs=rngs)
        setattr(self, f'layer{stage + 1}_{index}', block)
        names.append(f'layer{stage + 1}_{index}')
        channels = block.out_features
      if stage_attention is not None and stage < len(self.stage_sizes) - 1:
        setattr(self, f'stage_attention{stage + 1}', stage_attention(channels, rngs=rngs))
        names.append(f'stage_attention{stage + 1}')
    self.block_names = tuple(names)
    self.fc = nnx.Linear(channels, self.num_classes, dtype=jnp.float32,
                         param_dtype=f['param_dtype'], kernel_init=linen_models.head_kernel_init,
                         rngs=rngs)

  def __call__(self, x: Array) -> Array:
    """Logits ``(B, num_classes)`` float32 of NHWC images ``x``."""
    linen_models.check_images(x)
    x = self.act(self.bn1(self.conv1(x)))
    if self.stem == 'imagenet':
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=linen_models.same_padding(3))
    for name in self.block_names:
      x = getattr(self, name)(x)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return self.fc(x).astype(jnp.float32)


def available_models() -> tuple[str, ...]:
  """Names accepted by :func:`create_model`: the linen zoo's."""
  return linen_models.available_models()


def create_model(name: str, *, rngs: nnx.Rngs, in_features: int = 3, **fields: Any) -> ResNet:
  """The NNX model called ``name`` (see :func:`cbam_jax.models.create_model`)."""
  factory = linen_models.model_factory(name)
  return ResNet(in_features=in_features, rngs=rngs, **{**factory.keywords, **fields})


def count_params(model: nnx.Module) -> int:
  """Number of scalars in the model's ``nnx.Param`` variables (BatchNorm stats excluded)."""
  return sum(leaf.size for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
