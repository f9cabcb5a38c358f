"""Key mapping: the PyTorch key and layout change of each Flax variable."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from cbam_jax import attention as attention_registry
from cbam_jax.models import ResNet


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


def torch_key(path: tuple[str, ...], attention_layout: str | None
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


def attention_layout(source: str, model: ResNet) -> str | None:
  if source == 'torchvision' or model.attention is None:
    return None
  if source == 'official':
    return 'official'
  # The converter builds timm attention as a partial of a registered class.
  return f'timm_{attention_registry.name_of(model.attention)}'


def source_hint(unexpected: Sequence[str], source: str) -> str:
  if source != 'timm' and any('.se.' in k for k in unexpected):
    return ' The keys look like timm\'s (layerS.I.se.*): try source=\'timm\'.'
  if source != 'official' and any('.cbam.' in k for k in unexpected):
    return ' The keys look like the official CBAM code\'s: try source=\'official\'.'
  return ''


def listing(keys: Sequence[str], limit: int = 20) -> str:
  shown = ', '.join(keys[:limit])
  return shown + (f', ... ({len(keys) - limit} more)' if len(keys) > limit else '')

