"""PyTorch ResNet weights -> :class:`cbam_jax.models.ResNet` variables.

Three layouts are understood (``source=``):

* ``'official'``: Jongchan/attention-module (``MODELS/model_resnet.py`` + ``cbam.py``),
  ImageNet (7x7 ``conv1``) and CIFAR (3x3 ``conv1``) network types, with or without CBAM.
* ``'timm'``: timm ResNets built with ``block_args=dict(attn_layer='cbam')`` or ``'se'``
  (the attention lives under ``layerS.I.se``).
* ``'torchvision'``: a plain torchvision ResNet; the backbone is loaded and the attention
  modules asked for with ``attention=`` are freshly initialised (reported as new keys).

The architecture (block type, stage sizes, width, stem, classes, attention and its hidden
sizes, MLP bias, spatial BatchNorm and kernel size) is read from the keys and shapes.

Example::

  model, variables = from_pytorch(torch.load(path, weights_only=True)['state_dict'])
  logits = model.apply(variables, images_nhwc)

From the shell, ``python -m cbam_jax.convert IN.pth OUT_DIR --source official`` writes
``OUT_DIR/model.json`` and an orbax checkpoint ``OUT_DIR/variables``; read them back with
:func:`load_converted`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cbam_jax import _validation
from cbam_jax import attention as attention_registry
from cbam_jax import functional as F
from cbam_jax.attention import presets
from cbam_jax.attention.bam import BottleneckAttention
from cbam_jax.attention.se import SqueezeExcitation
from cbam_jax.layers import CBAM, ChannelAttention, SpatialAttention
from cbam_jax.models import BasicBlock, Bottleneck, ResNet, head_kernel_init

__all__ = [
    'APIS', 'SOURCES', 'ConversionReport', 'from_pytorch', 'load_converted',
    'load_state_dict', 'main', 'model_config', 'model_from_config', 'save_converted',
]

SOURCES = ('official', 'timm', 'torchvision')
APIS = ('linen', 'nnx')
FORMAT = 'cbam_jax.convert/1'
MODEL_JSON = 'model.json'
VARIABLES_DIR = 'variables'

_log = logging.getLogger(__name__)
_BLOCK_CLASSES = {'basic': BasicBlock, 'bottleneck': Bottleneck}
_LAYER_KEY = re.compile(r'^layer(\d+)\.(\d+)\.')
# Keys that carry no weights.
_IGNORED_SUFFIXES = ('num_batches_tracked',)


# Attention module classes that a model config (JSON) may name.
_ATTENTION_CLASSES: dict[str, type[nn.Module]] = {
    'CBAM': CBAM, 'ChannelAttention': ChannelAttention, 'SpatialAttention': SpatialAttention,
    'SqueezeExcitation': SqueezeExcitation,
    'BottleneckAttention': BottleneckAttention,
}


@dataclasses.dataclass(frozen=True)
class ConversionReport:
  """What :func:`from_pytorch` did with each key.

  Attributes:
    source: the layout read.
    config: the model's JSON-ready fields (see :func:`model_config`).
    loaded_keys: PyTorch keys that were converted.
    new_keys: Flax variables (``'params/layer1_0/attention/...'``) with no PyTorch
      counterpart in this source, freshly initialised (``'torchvision'`` attention).
    missing_keys: PyTorch keys the model needs but the state dict lacks; their variables
      were freshly initialised (only possible with ``strict=False``).
    unexpected_keys: PyTorch keys that were not used (only possible with ``strict=False``).
  """

  source: str
  config: dict[str, Any]
  loaded_keys: tuple[str, ...]
  new_keys: tuple[str, ...]
  missing_keys: tuple[str, ...]
  unexpected_keys: tuple[str, ...]


# ----------------------------------------------------------------------------------------------
# State dicts.


def _to_numpy(value: Any, key: str) -> np.ndarray:
  if type(value).__module__.split('.')[0] == 'torch':
    import torch  # Only here: converting numpy state dicts must not need torch.

    if not isinstance(value, torch.Tensor):
      raise TypeError(f'State dict entry {key!r} is a {type(value).__name__}, not a tensor.')
    value = value.detach().cpu()
    if value.dtype in (torch.bfloat16, torch.float16):
      value = value.float()  # numpy has no bfloat16; float32 is what we store anyway.
    return value.numpy()
  try:
    return np.asarray(value)
  except Exception as error:  # noqa: BLE001 - re-raised with the key named.
    raise TypeError(
        f'State dict entry {key!r} ({type(value).__name__}) is not an array or tensor.'
    ) from error


def _unwrap(state_dict: Any) -> Mapping[str, Any]:
  """The weights of a state dict or of a training checkpoint ``{'state_dict': ...}``."""
  if not isinstance(state_dict, Mapping):
    raise TypeError(
        f'Expected a state dict (a mapping from names to tensors or arrays), got '
        f'{type(state_dict).__name__}. Pass model.state_dict() or torch.load(path).')
  for wrapper in ('state_dict', 'model', 'model_state_dict'):
    inner = state_dict.get(wrapper)
    if isinstance(inner, Mapping):
      return inner
  return state_dict


def _prepare(state_dict: Any) -> dict[str, np.ndarray]:
  """numpy arrays keyed without a ``module.`` prefix (DataParallel) or counters."""
  arrays = {}
  for key, value in _unwrap(state_dict).items():
    if not isinstance(key, str):
      raise TypeError(f'State dict keys must be strings, got {key!r}.')
    name = key[len('module.'):] if key.startswith('module.') else key
    if name.endswith(_IGNORED_SUFFIXES):
      continue
    if name in arrays:
      raise ValueError(f'State dict has {name!r} both with and without a \'module.\' prefix.')
    arrays[name] = _to_numpy(value, key)
  if not arrays:
    raise ValueError('The state dict holds no weights.')
  return arrays


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """A ``.pth``/``.pt`` file's weights as numpy arrays (needs torch).

  Accepts a bare state dict or a training checkpoint ``{'state_dict': ..., ...}`` as the
  official CBAM releases are; strips ``module.`` prefixes.
  """
  try:
    import torch
  except ImportError as error:
    raise ImportError(
        'Reading PyTorch checkpoints needs torch: pip install \'cbam_jax[torch]\' (on CPU-only '
        'machines: pip install torch --index-url https://download.pytorch.org/whl/cpu).'
    ) from error
  try:
    checkpoint = torch.load(os.fspath(path), map_location='cpu', weights_only=True)
  except FileNotFoundError:
    raise FileNotFoundError(f'No PyTorch checkpoint at {os.fspath(path)!r}.') from None
  return _prepare(checkpoint)


# ----------------------------------------------------------------------------------------------
# Architecture inference.


def _shape(arrays: Mapping[str, np.ndarray], key: str, source: str) -> tuple[int, ...]:
  if key not in arrays:
    raise ValueError(
        f'Cannot infer the architecture: the state dict has no {key!r} (source={source!r}). '
        f'Keys start with: {", ".join(sorted(arrays)[:8])}. Is this a ResNet state dict of '
        f'this source (one of {SOURCES})?')
  return tuple(arrays[key].shape)


def _stage_sizes(arrays: Mapping[str, np.ndarray]) -> tuple[int, ...]:
  blocks: dict[int, set[int]] = {}
  for key in arrays:
    match = _LAYER_KEY.match(key)
    if match:
      blocks.setdefault(int(match[1]), set()).add(int(match[2]))
  if not blocks:
    raise ValueError('Cannot infer the architecture: no \'layer{stage}.{block}.\' keys.')
  stages = sorted(blocks)
  if stages != list(range(1, len(stages) + 1)):
    raise ValueError(f'Residual stages must be layer1..layerN, found layer{stages}.')
  sizes = []
  for stage in stages:
    indices = sorted(blocks[stage])
    if indices != list(range(len(indices))):
      raise ValueError(f'Blocks of layer{stage} must be numbered 0..n-1, found {indices}.')
    sizes.append(len(indices))
  return tuple(sizes)


def _hidden_rule(pairs: Sequence[tuple[int, int]], rules: Sequence[str],
                 what: str) -> tuple[str, float]:
  """The first (rule, reduction ratio) that gives every ``(channels, hidden)`` pair."""
  sizes = {
      'floor': lambda c, r: F.hidden_size(c, r, None, 'floor'),
      'round': lambda c, r: F.hidden_size(c, r, None, 'round'),
      'divisible8': lambda c, r: F.hidden_size(c, r, None, 'round', hidden_divisor=8),
  }
  channels, hidden = max(pairs)
  for ratio in dict.fromkeys((16, channels / hidden)):  # The default first, then the data's.
    for rule in rules:
      if all(sizes[rule](c, ratio) == h for c, h in pairs):
        return rule, int(ratio) if float(ratio).is_integer() else ratio
  raise ValueError(
      f'The {what} hidden sizes {sorted(set(pairs))} (channels, hidden) follow no supported '
      f'rule ({", ".join(rules)} of channels / ratio), so one attention module cannot '
      'describe every block. Build the model yourself and copy the weights by hand.')


def _infer_attention(arrays: Mapping[str, np.ndarray], source: str,
                     stage_sizes: Sequence[int], attention: Any,
                     attention_fields: Mapping[str, Any]) -> Any:
  """The attention spec of ``source``'s state dict (a functools.partial), or ``attention``."""
  blocks = [f'layer{s + 1}.{i}.' for s, n in enumerate(stage_sizes) for i in range(n)]
  if source == 'torchvision':
    if attention == 'auto':
      attention = 'cbam'
    if attention_fields and not callable(attention):
      raise ValueError('attention_fields needs attention= to be a module class; use e.g. '
                       'attention=CBAM, attention_fields={...}.')
    if attention_fields:
      return functools.partial(attention, **attention_fields)
    return attention
  if attention != 'auto':
    raise ValueError(
        f'attention= is read from the weights for source={source!r}; pass it only with '
        'source=\'torchvision\'. Use attention_fields= to set what weights cannot tell '
        '(e.g. pool_types).')

  if source == 'official':
    channel_keys = [b + 'cbam.ChannelGate.mlp.1.weight' for b in blocks]
    spatial_key = 'cbam.SpatialGate.spatial.conv.weight'
    spatial_bias = 'cbam.SpatialGate.spatial.conv.bias'
    mlp_bias_key = 'cbam.ChannelGate.mlp.1.bias'
    squeeze = False
    rules = ('floor',)
  else:
    se_keys = [b + 'se.fc1.weight' for b in blocks]
    channel_keys = [b + 'se.channel.fc1.weight' for b in blocks]
    spatial_key = 'se.spatial.conv.conv.weight'
    spatial_bias = 'se.spatial.conv.conv.bias'
    squeeze = any(k in arrays for k in se_keys)
    if squeeze:
      channel_keys = se_keys
      mlp_bias_key = 'se.fc1.bias'
      rules = ('divisible8', 'floor', 'round')
    else:
      mlp_bias_key = 'se.channel.fc1.bias'
      rules = ('round', 'floor')
  present = [b for b, k in zip(blocks, channel_keys, strict=True) if k in arrays]
  if not present:
    return None  # A plain ResNet.
  if len(present) != len(blocks):
    # Every block gets attention; the blocks without weights show up as missing keys.
    _log.warning('Only %d of %d blocks have attention weights.', len(present), len(blocks))
  pairs = []
  for block, key in zip(blocks, channel_keys, strict=True):
    if block in present:
      shape = arrays[key].shape  # Linear (h, C) or 1x1 conv (h, C, 1, 1).
      pairs.append((int(shape[1]), int(shape[0])))
  rule, ratio = _hidden_rule(pairs, rules, f'{source} attention MLP')
  mlp_bias = any(b + mlp_bias_key in arrays for b in present)

  if squeeze:
    fields: dict[str, Any] = dict(reduction_ratio=ratio, mlp_bias=mlp_bias)
    if rule == 'divisible8':  # timm's SEModule: make_divisible(C / r, 8).
      se_preset = presets.fields('timm', 'se')
      fields.update(hidden_rounding=se_preset['hidden_rounding'],
                    hidden_divisor=se_preset['hidden_divisor'])
    else:
      fields['hidden_rounding'] = rule
    return functools.partial(SqueezeExcitation, **{**fields, **attention_fields})

  spatial = [b + spatial_key for b in blocks if b + spatial_key in arrays]
  fields = dict(reduction_ratio=ratio, hidden_rounding=rule, mlp_bias=mlp_bias,
                use_spatial=bool(spatial))
  if spatial:
    kernel = arrays[spatial[0]].shape
    if len(kernel) != 4 or kernel[:2] != (1, 2):
      raise ValueError(
          f'{spatial[0]} has shape {kernel}; a CBAM spatial conv maps the 2 pooled channels '
          'to 1, i.e. (1, 2, k, k). Light/variant spatial gates are not supported.')
    has_norm = any(b + spatial_key.replace('conv.weight', 'bn.weight') in arrays
                   for b in blocks)
    fields.update(
        kernel_size=int(kernel[2]) if kernel[2] == kernel[3] else (int(kernel[2]),
                                                                   int(kernel[3])),
        spatial_norm=has_norm,
        use_bias=any(b + spatial_bias in arrays for b in blocks),
        # PyTorch momentum m is Flax momentum 1 - m: official BasicConv 0.01, timm 0.1.
        norm_momentum=presets.fields(source, 'cbam')['norm_momentum'],
        norm_epsilon=presets.fields(source, 'cbam')['norm_epsilon'])
  return functools.partial(CBAM, **{**fields, **attention_fields})


def _infer_stage_attention(arrays: Mapping[str, np.ndarray], source: str,
                           num_stages: int) -> Any:
  """Official BAM (``bam{stage}.*`` after every stage but the last), or ``None``."""
  stages = sorted({int(m[1]) for k in arrays if (m := re.match(r'^bam(\d+)\.', k))})
  if not stages:
    return None
  if source != 'official':
    raise ValueError(f'bam{stages[0]}.* keys are the official code\'s BAM; use '
                     'source=\'official\'.')
  if stages != list(range(1, num_stages)):
    raise ValueError(
        f'BAM modules after stages {stages}; cbam_jax places stage attention after every '
        f'stage but the last, i.e. bam1..bam{num_stages - 1} for {num_stages} stages.')
  pairs = []
  for stage in stages:
    shape = _shape(arrays, f'bam{stage}.channel_att.gate_c.gate_c_fc_0.weight', source)
    pairs.append((int(shape[1]), int(shape[0])))
  _, ratio = _hidden_rule(pairs, ('floor',), 'BAM')
  num_dilated = len({m[1] for k in arrays
                     if (m := re.match(r'^bam1\.spatial_att\.gate_s\.gate_s_conv_di_(\d+)\.', k))})
  # Official: 1 + sigmoid(Mc * Ms), no output BatchNorms, PyTorch's default BN momentum 0.1.
  # The dilation (4) is not in the weights.
  return functools.partial(
      BottleneckAttention, reduction_ratio=ratio, hidden_rounding='floor', combine='product',
      output_norm=False, num_dilated_convs=num_dilated, norm_momentum=0.9, norm_epsilon=1e-5)


def _infer_model(arrays: Mapping[str, np.ndarray], source: str, attention: Any,
                 attention_fields: Mapping[str, Any]) -> tuple[ResNet, int]:
  """The ResNet described by ``arrays`` and its number of input channels."""
  if 'conv1.0.weight' in arrays or 'conv1.weight' not in arrays and any(
      k.startswith('conv1.') for k in arrays):
    raise ValueError('Deep stems (timm resnet*c/d/s: conv1.0, conv1.1, ...) are not supported; '
                     'only the single-conv 7x7 (ImageNet) and 3x3 (CIFAR) stems.')
  stem_shape = _shape(arrays, 'conv1.weight', source)
  if len(stem_shape) != 4 or stem_shape[2] != stem_shape[3] or stem_shape[2] not in (3, 7):
    raise ValueError(
        f'conv1.weight has shape {stem_shape}; expected (filters, in_channels, 7, 7) for the '
        'ImageNet stem (7x7/2 conv + max-pool) or (filters, in_channels, 3, 3) for the CIFAR '
        'stem (3x3/1 conv, no pool).')
  stage_sizes = _stage_sizes(arrays)
  block = 'bottleneck' if 'layer1.0.conv3.weight' in arrays else 'basic'
  fc_shape = _shape(arrays, 'fc.weight', source)
  if len(fc_shape) != 2:
    raise ValueError(f'fc.weight has shape {fc_shape}; expected (num_classes, features).')
  model = ResNet(
      stage_sizes=stage_sizes, block_cls=_BLOCK_CLASSES[block], num_filters=int(stem_shape[0]),
      stem='imagenet' if stem_shape[2] == 7 else 'cifar', num_classes=int(fc_shape[0]),
      attention=_infer_attention(arrays, source, stage_sizes, attention, attention_fields),
      stage_attention=_infer_stage_attention(arrays, source, len(stage_sizes)),
      shortcut='projection')
  return model, int(stem_shape[1])


# ----------------------------------------------------------------------------------------------
# Key mapping.


def _conv(w: np.ndarray) -> np.ndarray:
  return w.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O).


def _linear(w: np.ndarray) -> np.ndarray:
  return w.T  # (out, in) -> (in, out).


def _conv1x1_as_dense(w: np.ndarray) -> np.ndarray:
  if w.ndim != 4 or w.shape[2:] != (1, 1):
    return w  # Left as is: the shape check names the key.
  return w[:, :, 0, 0].T


def _swapped_spatial(w: np.ndarray) -> np.ndarray:
  # The official ChannelPool is [max, mean]; ours is [mean, max].
  return _conv(w[:, ::-1])


def _identity(w: np.ndarray) -> np.ndarray:
  return w


_NORM_LEAVES = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
                'var': 'running_var'}

# Attention variables (path below 'attention') -> (PyTorch suffix below the block, transform).
_ATTENTION_KEYS: dict[str, dict[tuple[str, ...], tuple[str, Callable]]] = {
    'official': {
        ('channel', 'fc1_kernel'): ('cbam.ChannelGate.mlp.1.weight', _linear),
        ('channel', 'fc1_bias'): ('cbam.ChannelGate.mlp.1.bias', _identity),
        ('channel', 'fc2_kernel'): ('cbam.ChannelGate.mlp.3.weight', _linear),
        ('channel', 'fc2_bias'): ('cbam.ChannelGate.mlp.3.bias', _identity),
        ('spatial', 'conv_kernel'): ('cbam.SpatialGate.spatial.conv.weight', _swapped_spatial),
        ('spatial', 'conv_bias'): ('cbam.SpatialGate.spatial.conv.bias', _identity),
        **{('spatial', 'norm', leaf): (f'cbam.SpatialGate.spatial.bn.{name}', _identity)
           for leaf, name in _NORM_LEAVES.items()},
    },
    'timm_cbam': {
        ('channel', 'fc1_kernel'): ('se.channel.fc1.weight', _conv1x1_as_dense),
        ('channel', 'fc1_bias'): ('se.channel.fc1.bias', _identity),
        ('channel', 'fc2_kernel'): ('se.channel.fc2.weight', _conv1x1_as_dense),
        ('channel', 'fc2_bias'): ('se.channel.fc2.bias', _identity),
        ('spatial', 'conv_kernel'): ('se.spatial.conv.conv.weight', _conv),
        ('spatial', 'conv_bias'): ('se.spatial.conv.conv.bias', _identity),
        **{('spatial', 'norm', leaf): (f'se.spatial.conv.bn.{name}', _identity)
           for leaf, name in _NORM_LEAVES.items()},
    },
    'timm_se': {
        ('channel', 'fc1_kernel'): ('se.fc1.weight', _conv1x1_as_dense),
        ('channel', 'fc1_bias'): ('se.fc1.bias', _identity),
        ('channel', 'fc2_kernel'): ('se.fc2.weight', _conv1x1_as_dense),
        ('channel', 'fc2_bias'): ('se.fc2.bias', _identity),
    },
    # Official BAM (MODELS/bam.py), below bam{stage}.
    'official_bam': {
        ('channel', 'fc1_kernel'): ('channel_att.gate_c.gate_c_fc_0.weight', _linear),
        ('channel', 'fc1_bias'): ('channel_att.gate_c.gate_c_fc_0.bias', _identity),
        ('channel', 'fc2_kernel'): ('channel_att.gate_c.gate_c_fc_final.weight', _linear),
        ('channel', 'fc2_bias'): ('channel_att.gate_c.gate_c_fc_final.bias', _identity),
        **{('channel', 'norm', leaf): (f'channel_att.gate_c.gate_c_bn_1.{name}', _identity)
           for leaf, name in _NORM_LEAVES.items()},
        **{('spatial', conv, leaf): (f'spatial_att.gate_s.{torch_conv}.{name}', transform)
           for conv, torch_conv in [('reduce_conv', 'gate_s_conv_reduce0'),
                                    ('final_conv', 'gate_s_conv_final'),
                                    *[(f'dilated_conv{i}', f'gate_s_conv_di_{i}')
                                      for i in range(8)]]
           for leaf, name, transform in [('kernel', 'weight', _conv),
                                         ('bias', 'bias', _identity)]},
        **{('spatial', norm, leaf): (f'spatial_att.gate_s.{torch_norm}.{name}', _identity)
           for norm, torch_norm in [('reduce_norm', 'gate_s_bn_reduce0'),
                                    *[(f'dilated_norm{i}', f'gate_s_bn_di_{i}')
                                      for i in range(8)]]
           for leaf, name in _NORM_LEAVES.items()},
    },
}


def _torch_key(path: tuple[str, ...], attention_layout: str | None
               ) -> tuple[str, Callable[[np.ndarray], np.ndarray]] | None:
  """The PyTorch key and layout change of the Flax variable at ``path`` (no collection).

  ``None`` for a variable that has no PyTorch counterpart (fresh attention).
  """
  leaf = path[-1]
  if path[0].startswith('stage_attention'):
    mapped = _ATTENTION_KEYS['official_bam'].get(path[1:])
    if mapped is None:
      raise ValueError(f'No official BAM PyTorch key for {"/".join(path)}.')
    return f'bam{path[0][len("stage_attention"):]}.{mapped[0]}', mapped[1]
  if path[0].startswith('layer'):
    stage, index = path[0][len('layer'):].split('_')
    prefix = f'layer{stage}.{index}.'
    if path[1] == 'attention':
      if attention_layout is None:
        return None
      mapped = _ATTENTION_KEYS[attention_layout].get(path[2:])
      if mapped is None:
        raise ValueError(f'No {attention_layout} PyTorch key for {"/".join(path)}.')
      return prefix + mapped[0], mapped[1]
    module = {'downsample_conv': 'downsample.0',
              'downsample_bn': 'downsample.1'}.get(path[1], path[1])
  else:
    prefix, module = '', path[0]
  if leaf == 'kernel':
    return f'{prefix}{module}.weight', _linear if module == 'fc' else _conv
  if leaf in _NORM_LEAVES:
    name = 'bias' if leaf == 'bias' else _NORM_LEAVES[leaf]
    return f'{prefix}{module}.{name}', _identity
  raise ValueError(f'No PyTorch key for the Flax variable {"/".join(path)}.')


def _attention_layout(source: str, model: ResNet) -> str | None:
  if source == 'torchvision' or model.attention is None:
    return None
  if source == 'official':
    return 'official'
  # The converter builds timm attention as a partial of a registered class.
  return f'timm_{attention_registry.name_of(model.attention)}'


def _source_hint(unexpected: Sequence[str], source: str) -> str:
  if source != 'timm' and any('.se.' in k for k in unexpected):
    return ' The keys look like timm\'s (layerS.I.se.*): try source=\'timm\'.'
  if source != 'official' and any('.cbam.' in k for k in unexpected):
    return ' The keys look like the official CBAM code\'s: try source=\'official\'.'
  return ''


def _listing(keys: Sequence[str], limit: int = 20) -> str:
  shown = ', '.join(keys[:limit])
  return shown + (f', ... ({len(keys) - limit} more)' if len(keys) > limit else '')


def from_pytorch(
    state_dict: Mapping[str, Any],
    source: str = 'official',
    *,
    strict: bool = True,
    attention: Any = 'auto',
    attention_fields: Mapping[str, Any] | None = None,
    rng: int | jax.Array = 0,
    return_report: bool = False,
    api: str = 'linen',
) -> Any:
  """A :class:`cbam_jax.models.ResNet` and its Flax variables from PyTorch weights.

  Args:
    state_dict: names -> torch tensors or numpy arrays (anything ``np.asarray`` accepts),
      optionally wrapped as ``{'state_dict': ...}``; ``module.`` prefixes are stripped and
      ``num_batches_tracked`` ignored.
    source: ``'official'`` (Jongchan/attention-module), ``'timm'`` or ``'torchvision'``.
    strict: raise on missing or unexpected keys. With ``False`` missing variables keep their
      fresh initialisation and unexpected keys are ignored (both are logged and reported).
    attention: ``'auto'`` reads the attention from the weights, except for
      ``'torchvision'`` where it means ``'cbam'`` (the official configuration). With
      ``'torchvision'`` also ``None`` (plain ResNet), a name from
      :func:`cbam_jax.attention.available` or a module factory; it is freshly initialised
      from ``rng``.
    attention_fields: fields the weights cannot tell, e.g. ``{'pool_types': ('avg', 'max',
      'lse')}`` for an official model trained with other pools; with ``'torchvision'``,
      fields for an ``attention=`` class.
    rng: PRNG key, or an int seed of an ``'rbg'`` key, for the variables without
      PyTorch counterpart.
    return_report: also return a :class:`ConversionReport`.
    api: ``'linen'`` or ``'nnx'``.

  Returns:
    With ``api='linen'``: ``(model, variables)`` with ``variables = {'params': ...,
    'batch_stats': ...}`` (float32), for ``model.apply(variables, images_nhwc)``. With
    ``api='nnx'``: the :class:`cbam_jax.nnx.models.ResNet` holding those weights (in
    training mode, as every new NNX module; call ``model.eval()`` for inference). Plus
    the report if asked.

  Raises:
    ValueError: unknown source; architecture that cannot be inferred; with ``strict``,
      missing or unexpected keys (all listed); a shape that does not match.
  """
  _validation.check_choice('source', source, SOURCES)
  _validation.check_choice('api', api, APIS)
  arrays = _prepare(state_dict)
  model, in_channels = _infer_model(arrays, source, attention, dict(attention_fields or {}))
  layout = _attention_layout(source, model)

  # Parameter shapes do not depend on the image size; 8x8 keeps init cheap.
  dummy = jnp.zeros((1, 8, 8, in_channels), jnp.float32)
  # From a seed, an 'rbg' key: its init compiles ~2.5x faster on CPU than threefry's.
  key = jax.random.key(rng, impl='rbg') if isinstance(rng, int) else rng
  abstract = jax.eval_shape(functools.partial(model.init, train=False), key, dummy)
  flat = {tuple(str(getattr(p, 'key', p)) for p in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(dict(abstract))[0]}

  values: dict[tuple[str, ...], np.ndarray] = {}
  new, missing, loaded = [], [], []
  for path, leaf in flat.items():
    mapped = _torch_key(path[1:], layout)
    if mapped is None:
      new.append('/'.join(path))
      continue
    torch_key, transform = mapped
    if torch_key not in arrays:
      missing.append(torch_key)
      continue
    value = transform(arrays[torch_key])
    if value.shape != leaf.shape:
      raise ValueError(
          f'{torch_key} has shape {arrays[torch_key].shape}, which gives {value.shape} for '
          f'{"/".join(path)} but the inferred model needs {leaf.shape}. The state dict does '
          f'not follow the {source!r} layout (or mixes architectures).')
    values[path] = np.ascontiguousarray(value, dtype=np.float32)
    loaded.append(torch_key)
  unexpected = sorted(set(arrays) - set(loaded))
  if strict and (missing or unexpected):
    problems = []
    if missing:
      problems.append(f'missing keys ({len(missing)}): {_listing(missing)}')
    if unexpected:
      problems.append(f'unexpected keys ({len(unexpected)}): {_listing(unexpected)}')
    raise ValueError(
        f'State dict does not match the inferred {source!r} model: ' + '; '.join(problems)
        + '.' + _source_hint(unexpected, source)
        + ' Pass strict=False to load the matching keys anyway.')
  if missing or unexpected:
    _log.warning('Converted with strict=False: %d missing keys (freshly initialised): %s; '
                 '%d unexpected keys (ignored): %s', len(missing), _listing(missing),
                 len(unexpected), _listing(unexpected))

  if len(values) == len(flat):
    initial = None
  else:  # Fresh values for the variables PyTorch did not provide.
    initial = jax.jit(functools.partial(model.init, train=False))(key, dummy)
  treedef = jax.tree_util.tree_structure(dict(abstract))
  leaves = [jnp.asarray(values[path]) if path in values else None for path in flat]
  if initial is not None:
    fresh = jax.tree_util.tree_leaves(dict(initial))
    leaves = [fresh[i] if leaf is None else leaf for i, leaf in enumerate(leaves)]
  variables = jax.tree_util.tree_unflatten(treedef, leaves)
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  converted: tuple[Any, ...] = (model, variables)
  if api == 'nnx':
    from cbam_jax.nnx.transfer import from_linen  # NNX only when asked for.

    converted = (from_linen(model, variables),)
  if not return_report:
    return converted if len(converted) > 1 else converted[0]
  report = ConversionReport(
      source=source, config=model_config(model, in_channels=in_channels),
      loaded_keys=tuple(loaded), new_keys=tuple(new), missing_keys=tuple(missing),
      unexpected_keys=tuple(unexpected))
  return (*converted, report)


# ----------------------------------------------------------------------------------------------
# Model configs (JSON) and checkpoints on disk.


def _json_value(value: Any, what: str) -> Any:
  if isinstance(value, (bool, int, float, str)) or value is None:
    return value
  if isinstance(value, (tuple, list)):
    return [_json_value(v, what) for v in value]
  raise TypeError(f'{what} = {value!r} cannot be written to JSON; only plain values can.')


def _attention_config(spec: Any, what: str) -> Any:
  if spec is None or isinstance(spec, str):
    return spec
  factory, fields = spec, {}
  if isinstance(spec, functools.partial):
    if spec.args:
      raise TypeError(f'{what}: positional arguments of a partial cannot be saved.')
    factory, fields = spec.func, dict(spec.keywords)
  names = {cls: name for name, cls in _ATTENTION_CLASSES.items()}
  if factory not in names:
    raise TypeError(
        f'{what} factory {factory!r} cannot be saved; use a registry name or a partial of '
        f'{", ".join(_ATTENTION_CLASSES)}.')
  return {'class': names[factory],
          'fields': {k: _json_value(v, f'{what}.{k}') for k, v in sorted(fields.items())}}


def _attention_from_config(config: Any) -> Any:
  if config is None or isinstance(config, str):
    return config
  try:
    cls = _ATTENTION_CLASSES[config['class']]
  except (KeyError, TypeError):
    raise ValueError(f'Unknown attention config {config!r}; expected a name or '
                     f'{{"class": one of {list(_ATTENTION_CLASSES)}, "fields": {{...}}}}.'
                     ) from None
  fields = {k: tuple(v) if isinstance(v, list) else v
            for k, v in config.get('fields', {}).items()}
  return functools.partial(cls, **fields)


def model_config(model: ResNet, *, in_channels: int = 3) -> dict[str, Any]:
  """JSON-ready fields of ``model``; :func:`model_from_config` rebuilds it.

  Covers the architecture fields (not ``conv``/``norm``/``act``/``kernel_init``, which
  must be the defaults). Attention must be ``None``, a registry name or a
  ``functools.partial`` of a cbam_jax attention class with plain-valued fields.
  """
  if not isinstance(model, ResNet):
    raise TypeError(f'Expected a cbam_jax.models.ResNet, got {type(model).__name__}.')
  blocks = {cls: name for name, cls in _BLOCK_CLASSES.items()}
  if model.block_cls not in blocks:
    raise TypeError(f'block_cls {model.block_cls!r} cannot be saved.')
  return {
      'stage_sizes': [int(n) for n in model.stage_sizes],
      'block': blocks[model.block_cls],
      'num_filters': int(model.num_filters),
      'stem': model.stem,
      'num_classes': int(model.num_classes),
      'attention': _attention_config(model.attention, 'attention'),
      'stage_attention': _attention_config(model.stage_attention, 'stage_attention'),
      'zero_init_spatial_gate': bool(model.zero_init_spatial_gate),
      'zero_init_residual': bool(model.zero_init_residual),
      'shortcut': model.shortcut,
      'in_channels': int(in_channels),
  }


def model_from_config(config: Mapping[str, Any], **overrides: Any) -> ResNet:
  """The :class:`ResNet` described by a :func:`model_config` dict; ``overrides`` (e.g.
  ``dtype=jnp.bfloat16``) replace fields."""
  config = dict(config)
  config.pop('in_channels', None)
  block = config.pop('block')
  if block not in _BLOCK_CLASSES:
    raise ValueError(f'Unknown block {block!r}; use one of {tuple(_BLOCK_CLASSES)}.')
  for name in ('attention', 'stage_attention'):
    config[name] = _attention_from_config(config.get(name))
  config['stage_sizes'] = tuple(config['stage_sizes'])
  return ResNet(block_cls=_BLOCK_CLASSES[block], **{**config, **overrides})


def save_converted(out_dir: str | os.PathLike[str], model: ResNet,
                   variables: Mapping[str, Any], *, in_channels: int = 3,
                   extra: Mapping[str, Any] | None = None) -> None:
  """Writes ``out_dir/model.json`` and the orbax checkpoint ``out_dir/variables``.

  ``model.json``: ``{"format": "cbam_jax.convert/1", "model": model_config(model), ...extra}``.
  The checkpoint holds ``{'params': ..., 'batch_stats': ...}`` (orbax
  ``StandardCheckpointer``). Existing files are overwritten.
  """
  import orbax.checkpoint as ocp

  out_dir = os.path.abspath(os.fspath(out_dir))
  os.makedirs(out_dir, exist_ok=True)
  tree = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  tree = jax.tree_util.tree_map(np.asarray, tree)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(out_dir, VARIABLES_DIR), tree, force=True)
    checkpointer.wait_until_finished()
  meta = {'format': FORMAT, 'model': model_config(model, in_channels=in_channels),
          **(extra or {})}
  with open(os.path.join(out_dir, MODEL_JSON), 'w') as f:
    json.dump(meta, f, indent=2)
    f.write('\n')


def load_converted(out_dir: str | os.PathLike[str], *, num_classes: int | None = None,
                   rng: int | jax.Array = 0, **overrides: Any
                   ) -> tuple[ResNet, dict[str, Any]]:
  """``(model, variables)`` from a directory written by :func:`save_converted` / the CLI.

  Args:
    out_dir: the directory holding ``model.json`` and ``variables``.
    num_classes: a new head size for fine-tuning (e.g. 10 for CIFAR-10 from ImageNet
      weights); when it differs from the saved one, ``fc`` is freshly initialised from
      ``rng`` as :class:`cbam_jax.models.ResNet` initialises it. Everything else is loaded.
    rng: PRNG key or int seed for that new head.
    **overrides: other model fields to replace that keep the variables' shapes, e.g.
      ``dtype=jnp.bfloat16``.
  """
  import orbax.checkpoint as ocp

  out_dir = os.path.abspath(os.fspath(out_dir))
  meta_path = os.path.join(out_dir, MODEL_JSON)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(
        f'{meta_path} not found: {out_dir!r} is not a converted checkpoint directory. Create '
        'one with python -m cbam_jax.convert IN.pth OUT_DIR --source official.')
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get('format') != FORMAT:
    raise ValueError(f'{meta_path} has format {meta.get("format")!r}; expected {FORMAT!r}.')
  config = meta['model']
  model = model_from_config(config, **overrides)
  dummy = jnp.zeros((1, 8, 8, config.get('in_channels', 3)), jnp.float32)
  abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            dummy)
  target = {'params': abstract['params'], 'batch_stats': abstract.get('batch_stats', {})}
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(os.path.join(out_dir, VARIABLES_DIR), target)
  variables = jax.tree_util.tree_map(jnp.asarray, dict(restored))
  if num_classes is not None and num_classes != model.num_classes:
    if num_classes < 1:
      raise ValueError(f'num_classes must be positive, got {num_classes}.')
    model = model.clone(num_classes=num_classes)
    features = variables['params']['fc']['kernel'].shape[0]
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    head = nn.Dense(num_classes, param_dtype=model.param_dtype,
                    kernel_init=head_kernel_init).init(key, jnp.zeros((1, features)))
    variables['params'] = {**variables['params'], 'fc': head['params']}
  return model, variables


# ----------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m cbam_jax.convert',
      description='Convert a PyTorch ResNet(+CBAM/SE) checkpoint to a cbam_jax model: writes '
                  'OUT_DIR/model.json and an orbax checkpoint OUT_DIR/variables.')
  parser.add_argument('input', help='.pth/.pt file (state dict or {"state_dict": ...})')
  parser.add_argument('out_dir', help='output directory')
  parser.add_argument('--source', choices=SOURCES, default='official',
                      help='key layout of the input (default: official)')
  parser.add_argument('--attention', default='auto',
                      help="torchvision only: attention to add (default cbam; 'none' for a "
                           "plain ResNet)")
  parser.add_argument('--no-strict', dest='strict', action='store_false',
                      help='load matching keys; initialise missing ones, ignore the rest')
  parser.add_argument('--seed', type=int, default=0,
                      help='seed for variables PyTorch does not provide')
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns the exit code."""
  args = _parser().parse_args(argv)
  attention = None if args.attention.lower() == 'none' else args.attention
  state_dict = load_state_dict(args.input)
  model, variables, report = from_pytorch(
      state_dict, args.source, strict=args.strict, attention=attention, rng=args.seed,
      return_report=True)
  save_converted(args.out_dir, model, variables, in_channels=report.config['in_channels'],
                 extra={'source': report.source, 'input': os.path.abspath(args.input),
                        'new_keys': list(report.new_keys),
                        'missing_keys': list(report.missing_keys),
                        'unexpected_keys': list(report.unexpected_keys)})
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables['params']))
  print(f'Converted {len(report.loaded_keys)} tensors ({num_params:,} parameters) from '
        f'{args.input} ({args.source}) to {args.out_dir}.')
  print('Model: ' + json.dumps(report.config))
  for name in ('new_keys', 'missing_keys', 'unexpected_keys'):
    keys = getattr(report, name)
    if keys:
      print(f'{name.replace("_", " ").capitalize()} ({len(keys)}): {_listing(list(keys))}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
